#!/bin/bash
#COBALT -n {{ num_nodes }}
#COBALT -t {{ wall_time_min }}
{% if project %}#COBALT -A {{ project }}
{% endif %}{% if queue %}#COBALT -q {{ queue }}
{% endif %}{% if optional_params.get("attrs") %}#COBALT --attrs {{ optional_params["attrs"] }}
{% endif %}
# Rendered by balsam from job-template.sh. The qsub command line repeats the resource requests
# above (and any -x pass-through flags); the command line wins where they differ.

# The allocation started now: the launcher counts its wall time from here, not from its own
# start after the set-up below (BALSAM_LAUNCHER_START_TIME).
export BALSAM_LAUNCHER_START_TIME=$(date +%s)
export BALSAM_SITE_PATH={{ balsam_site_path | shell_quote }}
export BALSAM_BATCH_JOB_ID={{ batch_job_id }}
cd "$BALSAM_SITE_PATH"

exec {{ launcher_cmd }} -j {{ job_mode }} -t {{ launcher_wall_time_min }}{{ tags }}{{ partitions }}
