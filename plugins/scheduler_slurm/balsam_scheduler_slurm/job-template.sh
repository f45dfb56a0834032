#!/bin/bash
#SBATCH --job-name=balsam-{{ batch_job_id }}
#SBATCH --nodes={{ num_nodes }}
#SBATCH --time={{ wall_time_min }}
{% if project %}#SBATCH --account={{ project }}
{% endif %}{% if queue %}#SBATCH --partition={{ queue }}
{% endif %}{% if optional_params.get("constraint") %}#SBATCH --constraint={{ optional_params["constraint"] }}
{% endif %}{% if optional_params.get("reservation") %}#SBATCH --reservation={{ optional_params["reservation"] }}
{% endif %}{% if optional_params.get("qos") %}#SBATCH --qos={{ optional_params["qos"] }}
{% endif %}
# Rendered by balsam from job-template.sh. The sbatch command line repeats the resource
# requests above (and any -x pass-through flags); the command line wins where they differ.

export BALSAM_SITE_PATH={{ balsam_site_path | shell_quote }}
export BALSAM_BATCH_JOB_ID={{ batch_job_id }}
cd "$BALSAM_SITE_PATH"

exec {{ launcher_cmd }} -j {{ job_mode }} -t {{ launcher_wall_time_min }}{{ tags }}{{ partitions }}
