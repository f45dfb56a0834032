#!/bin/bash
#SBATCH --job-name=balsam-{{ batch_job_id }}
#SBATCH --nodes={{ num_nodes }}
#SBATCH --time={{ wall_time_min }}
#SBATCH --account={{ project }}
#SBATCH --constraint={{ optional_params.get("constraint") or "@CONSTRAINT@" }}
{% if optional_params.get("reservation") %}#SBATCH --reservation={{ optional_params["reservation"] }}
{% endif %}# Rendered by balsam for BatchJob {{ batch_job_id }} on Perlmutter @CONSTRAINT@ nodes (job-template.sh in the
# site directory). NERSC queues are QOS names: sbatch gets --qos (scheduler.options.queue_flag).

# The allocation started now: the launcher counts its wall time from here, not from its own
# start after the set-up below (BALSAM_LAUNCHER_START_TIME).
export BALSAM_LAUNCHER_START_TIME=$(date +%s)
export BALSAM_SITE_PATH={{ balsam_site_path | shell_quote }}
export BALSAM_BATCH_JOB_ID={{ batch_job_id }}
cd "$BALSAM_SITE_PATH"

echo "balsam launcher starting at $(date)"
{{ launcher_cmd }} -j {{ job_mode }} -t {{ launcher_wall_time_min }}{{ tags }}{{ partitions }}
status=$?
echo "balsam launcher done at $(date) (exit status $status)"
exit $status
