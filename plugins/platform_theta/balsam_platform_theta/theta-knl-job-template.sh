#!/bin/bash -l
#COBALT -n {{ num_nodes }}
#COBALT -t {{ wall_time_min }}
{% if project %}#COBALT -A {{ project }}
{% endif %}{% if queue %}#COBALT -q {{ queue }}
{% endif %}{% if optional_params.get("attrs") %}#COBALT --attrs {{ optional_params["attrs"] }}
{% endif %}# Rendered by balsam for BatchJob {{ batch_job_id }} on Theta KNL (job-template.sh in the site directory).

# The allocation started now: the launcher counts its wall time from here, not from its own
# start after the set-up below (BALSAM_LAUNCHER_START_TIME).
export BALSAM_LAUNCHER_START_TIME=$(date +%s)
{% if optional_params.get("singularity_prime_cache", "no") | lower in ("yes", "true", "1") %}
# -x singularity_prime_cache=yes: warm the Singularity image cache on every node first.
{{ platform_options.get("aprun") or "aprun" }} -N 1 -n "$COBALT_JOBSIZE" /soft/tools/prime-cache
sleep 10
{% endif %}
# Tools that wrap every aprun'd process would slow each task down.
module unload trackdeps darshan xalt 2>/dev/null
export PMI_NO_FORK=1
# With a Balsam server outside ALCF, uncomment (http:// even for https_proxy; set nothing else):
# export https_proxy=http://theta-proxy.tmi.alcf.anl.gov:3128

export BALSAM_SITE_PATH={{ balsam_site_path | shell_quote }}
export BALSAM_BATCH_JOB_ID={{ batch_job_id }}
cd "$BALSAM_SITE_PATH"

echo "balsam launcher starting at $(date)"
{{ launcher_cmd }} -j {{ job_mode }} -t {{ launcher_wall_time_min }}{{ tags }}{{ partitions }}
status=$?
echo "balsam launcher done at $(date) (exit status $status)"
exit $status
