"""squeue's QOS column (``%q``): with ``queue_flag: --qos`` a job's queue is its QOS.

A BatchJob's queue at a ``queue_flag: --qos`` site is a QOS name (``sbatch --qos regular``), but the
status poll reported each job's partition (``%P``) as its queue, so the user's other jobs of the
site's QOS (another site's requests) were never counted under that QOS (docs/elastic.md, Limits).
squeue prints the QOS with ``%q`` (``man squeue`` of Slurm 22.05 here: "%q Quality of service
associated with the job"). Outputs recorded from the CI host's real Slurm 22.05.8; the older
11-column recordings (tests/schedulers/data/slurm) must still read as before."""

from __future__ import annotations

import logging

import pytest

from balsam.states import BatchJobState
from balsam_scheduler_slurm import SlurmScheduler
from balsam_scheduler_slurm.scheduler import SQUEUE_FORMAT, parse_squeue_line

from sched_helpers import recorded, result, utc

NOW = utc(2026, 12, 6, 9, 2, 2)

#: Recorded here: `TZ=UTC SLURM_TIME_FORMAT=standard squeue --noheader --states=all --user root
#: --format '%i|%T|%P|%D|%l|%a|%L|%V|%S|%e|%q|%r'` (jobs 1, 2 cancelled while held; 4 held with
#: `sbatch --hold --qos normal`; 3 running, submitted without --qos: the QOS the association gives).
SQUEUE_QOS = """\
1|CANCELLED|debug|1|2:00|root|2:00|2026-12-06T09:01:00|2026-12-06T09:01:03|2026-12-06T09:01:03|normal|JobHeldUser
2|CANCELLED|debug|1|2:00|root|2:00|2026-12-06T09:01:03|2026-12-06T09:01:03|2026-12-06T09:01:03|normal|JobHeldUser
4|PENDING|debug|2|5:00|root|5:00|2026-12-06T09:01:59|N/A|N/A|normal|JobHeldUser
3|RUNNING|debug|1|2:00|root|1:57|2026-12-06T09:01:59|2026-12-06T09:01:59|2026-12-06T09:03:59|normal|None
"""

#: The same jobs, `squeue --states=all --user root --clusters=ci --format '...|%q|%r'` (with a header).
SQUEUE_QOS_CLUSTERS = """\
CLUSTER: ci
JOBID|STATE|PARTITION|NODES|TIME_LIMIT|ACCOUNT|TIME_LEFT|SUBMIT_TIME|START_TIME|END_TIME|QOS|REASON
1|CANCELLED|debug|1|2:00|root|2:00|2026-12-06T09:01:00|2026-12-06T09:01:03|2026-12-06T09:01:03|normal|JobHeldUser
2|CANCELLED|debug|1|2:00|root|2:00|2026-12-06T09:01:03|2026-12-06T09:01:03|2026-12-06T09:01:03|normal|JobHeldUser
4|PENDING|debug|2|5:00|root|5:00|2026-12-06T09:01:59|N/A|N/A|normal|JobHeldUser
3|RUNNING|debug|1|2:00|root|1:57|2026-12-06T09:01:59|2026-12-06T09:01:59|2026-12-06T09:03:59|normal|None
"""


def _qos(**more) -> SlurmScheduler:
    return SlurmScheduler(user="root", options={"queue_flag": "--qos", **more})


def test_the_status_poll_asks_squeue_for_the_qos():
    args = SlurmScheduler(user="root").render_status("root").args
    assert "%q" in args[args.index("--format") + 1].split("|")


@pytest.mark.parametrize("stdout, options", [(SQUEUE_QOS, {}), (SQUEUE_QOS_CLUSTERS, {"clusters": ["ci"]})],
                         ids=["noheader", "clusters"])
def test_with_queue_flag_qos_a_jobs_queue_is_its_qos(stdout, options, caplog):
    caplog.set_level(logging.WARNING)
    statuses = _qos(**options).parse_status(result(stdout=stdout), NOW).statuses
    assert set(statuses) == {3, 4} and {s.queue for s in statuses.values()} == {"normal"}
    assert statuses[4].state is BatchJobState.queued and statuses[4].num_nodes == 2
    assert statuses[4].message == "JobHeldUser" and statuses[3].message == ""
    assert statuses[3].state is BatchJobState.running and statuses[3].time_remaining_min == 2
    assert "skipped" not in caplog.text


def test_with_queue_flag_partition_a_jobs_queue_stays_its_partition():
    statuses = SlurmScheduler(user="root").parse_status(result(stdout=SQUEUE_QOS), NOW).statuses
    assert {i: s.queue for i, s in statuses.items()} == {3: "debug", 4: "debug"}


def test_a_qos_column_the_scheduler_left_empty_keeps_the_partition():
    """A site without accounting storage gives jobs no QOS: squeue prints ``(null)``."""
    lines = (SQUEUE_QOS.splitlines()[2].replace("|normal|", "|(null)|") + "\n"
             + SQUEUE_QOS.splitlines()[3].replace("|normal|", "||") + "\n")
    statuses = _qos().parse_status(result(stdout=lines), NOW).statuses
    assert {i: s.queue for i, s in statuses.items()} == {3: "debug", 4: "debug"}


@pytest.mark.parametrize("name", ["squeue_all.txt", "squeue_reasons.txt", "squeue_clusters.txt"])
def test_older_recordings_without_the_qos_column_still_read(name, caplog):
    """Recorded before %q was asked for (11 columns): every line reads, the queue is the partition."""
    caplog.set_level(logging.WARNING)
    stdout = recorded("slurm", name)
    by_partition = SlurmScheduler(user="root", options={"clusters": ["ci"]}).parse_status(result(stdout=stdout), NOW)
    by_qos = _qos(clusters=["ci"]).parse_status(result(stdout=stdout), NOW)
    assert by_qos.statuses == by_partition.statuses and by_qos.statuses
    assert {s.queue for s in by_qos.statuses.values()} == {"debug"}
    assert "skipped" not in caplog.text


def test_a_pipe_in_the_reason_stays_in_the_reason():
    row = parse_squeue_line("7|PENDING|debug|2|5:00|p|5:00|2026-12-06T09:00:00|N/A|N/A|regular|Held|by admin")
    assert row.qos == "regular" and row.reason == "Held|by admin"


def test_the_format_and_the_parser_agree_on_the_columns():
    assert len(SQUEUE_FORMAT.split("|")) == len(SQUEUE_QOS.splitlines()[0].split("|"))
