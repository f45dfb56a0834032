"""Slurm queue discovery reads each partition's job size limits (sinfo ``%s``: MinNodes-MaxNodes)
into ``AllowedQueue.min_nodes`` and ``max_nodes``; ``site_defaults()`` writes ``min_nodes`` only
where it is above 1.

``SINFO_MIN_NODES`` was recorded from the real Slurm 22.05.8 of the CI host
(shared/ci/start-slurm.sh) after ``scontrol create PartitionName=h3mn Nodes=node[1-4] MinNodes=2
MaxNodes=3 MaxTime=45 State=DOWN``, with ``TZ=UTC SLURM_TIME_FORMAT=standard sinfo --noheader
--noconvert --format '%R|%D|%l|%s'``, the command the driver renders. The last test does the same
against the real slurmctld.
"""

from __future__ import annotations

import getpass
import logging
import shutil
import subprocess
import uuid

import pytest

from balsam.models import AllowedQueue
from balsam_scheduler_slurm import SlurmScheduler

from sched_helpers import ReplayRunner, result

SINFO_MIN_NODES = "debug|4|infinite|1-infinite\nh3mn|4|45:00|2-3\n"


def test_the_command_asks_for_the_job_size_without_unit_suffixes():
    # Without --noconvert sinfo prints a MaxNodes of 2048 as "2K".
    argv = list(SlurmScheduler(user="me").render_discover_queues().args)
    assert argv[:2] == ["sinfo", "--noheader"] and "--noconvert" in argv
    assert argv[argv.index("--format") + 1] == "%R|%D|%l|%s"


def test_partition_min_and_max_nodes_are_read():
    queues = SlurmScheduler(user="me").parse_discover_queues(result(stdout=SINFO_MIN_NODES))
    assert queues["h3mn"] == AllowedQueue(max_nodes=3, max_walltime=45, max_queued_jobs=None, min_nodes=2)
    assert queues["debug"] == AllowedQueue(max_nodes=4, max_walltime=7 * 1440, max_queued_jobs=None)


def test_a_partition_on_several_lines_keeps_its_limits(caplog):
    """sinfo prints a partition once per node state (mixed, idle...): its nodes add up, its size
    limits are read once; an unreadable size skips that column (logged); a minimum above what the
    partition can give leaves it out (logged)."""
    stdout = ("big|1200|2-00:00:00|16-1024\nbig|300|2-00:00:00|16-1024\nexact|8|30:00|8\n"
              "garbled|4|30:00|2K-infinite\nsmall|4|30:00|8-infinite\n")
    with caplog.at_level(logging.INFO):
        queues = SlurmScheduler(user="me").parse_discover_queues(result(stdout=stdout))
    assert queues["big"] == AllowedQueue(max_nodes=1024, max_walltime=2880, max_queued_jobs=None, min_nodes=16)
    assert queues["exact"] == AllowedQueue(max_nodes=8, max_walltime=30, max_queued_jobs=None, min_nodes=8)
    assert queues["garbled"] == AllowedQueue(max_nodes=4, max_walltime=30, max_queued_jobs=None)
    assert set(queues) == {"big", "exact", "garbled"}
    messages = [r.getMessage() for r in caplog.records]
    assert any("2K-infinite" in m for m in messages) and any("small" in m for m in messages)


def test_site_defaults_write_min_nodes_only_above_one():
    runner = ReplayRunner({"sinfo": result(stdout=SINFO_MIN_NODES), "sacctmgr": result(stdout="root\n")})
    queues = SlurmScheduler(runner, user="me").site_defaults()["scheduler"]["allowed_queues"]
    assert queues["h3mn"] == {"max_nodes": 3, "max_walltime": 45, "max_queued_jobs": 20, "min_nodes": 2}
    assert queues["debug"] == {"max_nodes": 4, "max_walltime": 7 * 1440, "max_queued_jobs": 20}


@pytest.mark.slow
@pytest.mark.slurm
def test_real_slurm_partition_min_nodes_is_discovered():
    """Against the CI host's slurmctld: a partition created with MinNodes/MaxNodes/MaxTime is
    discovered with them. State=DOWN: no job can start in it, and backfill (idle nodes of partitions
    that are up) never reports it, so the Slurm tests running meanwhile see the cluster as before."""
    assert shutil.which("scontrol"), "the real Slurm of shared/ci/start-slurm.sh is needed"
    name = f"mn{uuid.uuid4().hex[:8]}"
    subprocess.run(["scontrol", "create", f"PartitionName={name}", "Nodes=ALL", "MinNodes=2", "MaxNodes=3",
                    "MaxTime=45", "State=DOWN"], check=True, capture_output=True, text=True, timeout=30)
    try:
        slurm = SlurmScheduler(user=getpass.getuser())
        queues = slurm.discover_queues()
        assert queues[name] == AllowedQueue(max_nodes=3, max_walltime=45, max_queued_jobs=None, min_nodes=2)
        assert queues["debug"].min_nodes == 1
        written = slurm.site_defaults()["scheduler"]["allowed_queues"]
        assert written[name]["min_nodes"] == 2 and "min_nodes" not in written["debug"]
    finally:
        subprocess.run(["scontrol", "delete", f"PartitionName={name}"], capture_output=True, timeout=30)
