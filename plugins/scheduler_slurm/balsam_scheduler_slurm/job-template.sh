#!/bin/bash
#SBATCH --job-name=balsam-{{ batch_job_id }}
#SBATCH --nodes={{ num_nodes }}
#SBATCH --time={{ wall_time_min }}
{% if project %}#SBATCH --account={{ project }}
{% endif %}{% if optional_params.get("constraint") %}#SBATCH --constraint={{ optional_params["constraint"] }}
{% endif %}{% if optional_params.get("reservation") %}#SBATCH --reservation={{ optional_params["reservation"] }}
{% endif %}{% if optional_params.get("qos") %}#SBATCH --qos={{ optional_params["qos"] }}
{% endif %}
# Rendered by balsam from job-template.sh for queue "{{ queue }}". The sbatch command line carries
# every resource request (and any -x pass-through flags) and wins where it differs from the lines
# above; the queue goes there only, as --partition or --qos (settings.yml scheduler.options.queue_flag),
# so that a site whose queues are QOS names never gets a --partition it does not have.

# The allocation started now: the launcher counts its wall time from here, not from its own
# start after the set-up below (BALSAM_LAUNCHER_START_TIME).
export BALSAM_LAUNCHER_START_TIME=$(date +%s)
export BALSAM_SITE_PATH={{ balsam_site_path | shell_quote }}
export BALSAM_BATCH_JOB_ID={{ batch_job_id }}
cd "$BALSAM_SITE_PATH"

exec {{ launcher_cmd }} -j {{ job_mode }} -t {{ launcher_wall_time_min }}{{ tags }}{{ partitions }}
