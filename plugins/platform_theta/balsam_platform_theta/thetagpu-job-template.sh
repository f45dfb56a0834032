#!/bin/bash -l
#COBALT -n {{ num_nodes }}
#COBALT -t {{ wall_time_min }}
{% if project %}#COBALT -A {{ project }}
{% endif %}{% if queue %}#COBALT -q {{ queue }}
{% endif %}{#- The directives stay one block after the shebang (no blank line between them): Cobalt's qsub reads
    #COBALT lines from the top of the script, and the --attrs one is the only place mig-mode=true and
    the filesystems are asked for (the driver's qsub line has no --attrs on ThetaGPU). -#}
{% set mig_count = optional_params.get("mig_count", "0") | string -%}
{#- launcher.platform_options.mpirun, unquoted: bash splits it into the words the launcher gets from shlex.split -#}
{% set mpirun = platform_options.get("mpirun") or "mpirun" -%}
#COBALT --attrs pubnet=true:enable_ssh=1:filesystems=home,grand,eagle,theta-fs0{% if mig_count in ("2", "3", "7") %}:mig-mode=true{% endif %}

# Rendered by balsam for BatchJob {{ batch_job_id }} on ThetaGPU (job-template.sh in the site directory).
# The allocation started now: the launcher counts its wall time from here, not from its own
# start after the set-up below (BALSAM_LAUNCHER_START_TIME).
export BALSAM_LAUNCHER_START_TIME=$(date +%s)
export https_proxy=http://theta-proxy.tmi.alcf.anl.gov:3128

# -x mig_count=2|3|7 splits every A100 of every node into that many MIG instances (3g.20gb,
# 2g.10gb or 1g.5gb) and records each node's `nvidia-smi -L` where the launcher reads its GPU ids.
gpu_list_dir={{ (platform_options.get("gpu_list_dir") or "/var/tmp") | shell_quote }}  # where the launcher reads them
{% if mig_count in ("2", "3", "7") %}
mig_profile={{ {"2": 9, "3": 14, "7": 19}[mig_count] }}
echo "Creating {{ mig_count }} MIG instances per GPU (profile $mig_profile) on {{ num_nodes }} node(s)"
for i in $(seq 1 {{ mig_count }}); do
    {{ mpirun }} -hostfile "$COBALT_NODEFILE" -n {{ num_nodes }} -npernode 1 nvidia-smi_mig -cgi "$mig_profile" -C || exit 1
done
for host in $(cat "$COBALT_NODEFILE"); do
    {{ mpirun }} -hostfile "$COBALT_NODEFILE" --host "$host" -n 1 nvidia-smi -L > "$gpu_list_dir/balsam-$host-gpulist.txt" || exit 1
    echo "GPU list of $host recorded in $gpu_list_dir/balsam-$host-gpulist.txt"
done
{% else %}
{% if mig_count != "0" %}echo "mig_count={{ mig_count }} is not one of 2, 3, 7: not using MIG" >&2
{% endif %}
# No MIG in this job: an earlier MIG job's records (gpu_list_dir outlives it) would name instances
# that may be gone; the launcher ignores records older than the allocation, and they go here too.
for host in $(cat "$COBALT_NODEFILE"); do
    rm -f "$gpu_list_dir/balsam-$host-gpulist.txt"
done
{% endif %}

export BALSAM_SITE_PATH={{ balsam_site_path | shell_quote }}
export BALSAM_BATCH_JOB_ID={{ batch_job_id }}
cd "$BALSAM_SITE_PATH"

echo "balsam launcher starting at $(date)"
{{ launcher_cmd }} -j {{ job_mode }} -t {{ launcher_wall_time_min }}{{ tags }}{{ partitions }}
status=$?
echo "balsam launcher done at $(date) (exit status $status)"
exit $status
