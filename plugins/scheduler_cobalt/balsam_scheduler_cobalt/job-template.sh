#!/bin/bash
#COBALT -n {{ num_nodes }}
#COBALT -t {{ wall_time_min }}
{% if project %}#COBALT -A {{ project }}
{% endif %}{% if queue %}#COBALT -q {{ queue }}
{% endif %}{% if optional_params.get("attrs") %}#COBALT --attrs {{ optional_params["attrs"] }}
{% endif %}
# Rendered by balsam from job-template.sh. The qsub command line repeats the resource requests
# above (and any -x pass-through flags); the command line wins where they differ.

export BALSAM_SITE_PATH={{ balsam_site_path }}
export BALSAM_BATCH_JOB_ID={{ batch_job_id }}
cd "$BALSAM_SITE_PATH"

{{ launcher_cmd }} -j {{ job_mode }} -t {{ [wall_time_min - 2, 1] | max }}{% for key, value in filter_tags.items() %} --tag {{ key }}={{ value }}{% endfor %}{{ partitions }}
