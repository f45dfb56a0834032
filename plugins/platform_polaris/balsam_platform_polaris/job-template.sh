#!/bin/bash
#PBS -N balsam-{{ batch_job_id }}
#PBS -l select={{ num_nodes }}
#PBS -l walltime={{ "%02d:%02d:00" | format(wall_time_min // 60, wall_time_min % 60) }}
{% if optional_params.get("filesystems") %}#PBS -l filesystems={{ optional_params["filesystems"] }}
{% endif %}{% if optional_params.get("place") %}#PBS -l place={{ optional_params["place"] }}
{% endif %}#PBS -A {{ project }}
#PBS -q {{ queue }}
# The PBS plugin passes -l select=<nodes>[:<-x select value>] (and walltime, -A, -q, filesystems,
# place) on the qsub command line, which wins over these lines: add chunk resources such as
# system=... with `balsam queue submit -x select=system=...` (key select in optional_batch_job_params).
# Rendered by balsam for BatchJob {{ batch_job_id }} on Polaris (job-template.sh in the site directory).

# Compute nodes reach the Balsam server through the ALCF proxy.
# The allocation started now: the launcher counts its wall time from here, not from its own
# start after the set-up below (BALSAM_LAUNCHER_START_TIME).
export BALSAM_LAUNCHER_START_TIME=$(date +%s)
export HTTP_PROXY=http://proxy.alcf.anl.gov:3128
export HTTPS_PROXY=http://proxy.alcf.anl.gov:3128
export http_proxy=http://proxy.alcf.anl.gov:3128
export https_proxy=http://proxy.alcf.anl.gov:3128

export BALSAM_SITE_PATH={{ balsam_site_path | shell_quote }}
export BALSAM_BATCH_JOB_ID={{ batch_job_id }}
cd "$BALSAM_SITE_PATH"

echo "balsam launcher starting at $(date)"
{{ launcher_cmd }} -j {{ job_mode }} -t {{ launcher_wall_time_min }}{{ tags }}{{ partitions }}
status=$?
echo "balsam launcher done at $(date) (exit status $status)"
exit $status
