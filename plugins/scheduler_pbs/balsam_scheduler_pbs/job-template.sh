#!/bin/bash
#PBS -N balsam-{{ batch_job_id }}
#PBS -l select={{ num_nodes }}{% if optional_params.get("select") %}:{{ optional_params["select"] }}{% endif %}
#PBS -l walltime={{ "%02d:%02d:00" | format(wall_time_min // 60, wall_time_min % 60) }}
{% if optional_params.get("filesystems") %}#PBS -l filesystems={{ optional_params["filesystems"] }}
{% endif %}{% if optional_params.get("place") %}#PBS -l place={{ optional_params["place"] }}
{% endif %}{% if project %}#PBS -A {{ project }}
{% endif %}{% if queue %}#PBS -q {{ queue }}
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
