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

from balsam.scheduler import BackfillWindow
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


#: The format before %q (11 columns), as recorded in tests/schedulers/data/slurm: job 8's reason
#: holds a '|' (free text: an admin's hold comment), which made its line as long as one with a QOS.
SQUEUE_OLD_PIPE_REASON = """\
4|PENDING|debug|2|5:00|root|5:00|2026-12-06T09:01:59|N/A|N/A|JobHeldUser
8|PENDING|debug|1|5:00|root|5:00|2026-12-06T09:01:59|N/A|N/A|JobHeldAdmin|by admin
3|RUNNING|debug|1|2:00|root|1:57|2026-12-06T09:01:59|2026-12-06T09:01:59|2026-12-06T09:03:59|None
"""


@pytest.mark.parametrize("options", [{}, {"queue_flag": "--qos"}], ids=["partition", "qos"])
def test_an_old_format_line_with_a_pipe_in_its_reason_is_read_in_the_old_format(options):
    """The format is decided once per poll: a line of exactly 11 fields says the old one. Read
    alone, job 8's line had 12 fields: its QOS was 'JobHeldAdmin' (its queue under --qos, so the
    user's job counted toward no queue) and its reason 'by admin'."""
    statuses = SlurmScheduler(user="root", options=options).parse_status(
        result(stdout=SQUEUE_OLD_PIPE_REASON), NOW).statuses
    assert {i: s.queue for i, s in statuses.items()} == {3: "debug", 4: "debug", 8: "debug"}
    assert statuses[8].message == "JobHeldAdmin|by admin"


def test_an_old_format_header_says_the_format_of_a_poll_of_named_clusters():
    """With --clusters squeue prints the header: 11 titles, the old format, whatever a line's length."""
    lines = SQUEUE_OLD_PIPE_REASON.splitlines()
    stdout = "CLUSTER: ci\n" + recorded("slurm", "squeue_clusters.txt").splitlines()[1] + "\n" + lines[1] + "\n"
    statuses = _qos(clusters=["ci"]).parse_status(result(stdout=stdout), NOW).statuses
    assert statuses[8].queue == "debug" and statuses[8].message == "JobHeldAdmin|by admin"


def test_a_poll_with_the_qos_column_keeps_a_pipe_in_a_reason():
    """A line of the QOS format whose reason holds a '|' among others: read with its QOS."""
    line = SQUEUE_QOS.splitlines()[2].replace("|JobHeldUser", "|JobHeldAdmin|by admin").replace("4|", "8|", 1)
    statuses = _qos().parse_status(result(stdout=SQUEUE_QOS + line + "\n"), NOW).statuses
    assert statuses[8].queue == "normal" and statuses[8].message == "JobHeldAdmin|by admin"


def test_with_queue_flag_qos_the_poll_gives_each_jobs_partition_as_its_node_pool():
    """Under --qos a job's queue is its QOS; its partition says whose idle nodes it may take
    (StatusPoll.node_pools, read by the elastic queue). A pending job asked for two lists both."""
    two = SQUEUE_QOS.splitlines()[2].replace("|debug|", "|debug,gpu|").replace("4|", "9|", 1)
    poll = _qos().parse_status(result(stdout=SQUEUE_QOS + two + "\n"), NOW)
    assert dict(poll.node_pools) == {3: ("debug",), 4: ("debug",), 9: ("debug", "gpu")}
    assert dict(SlurmScheduler(user="root").parse_status(result(stdout=SQUEUE_QOS), NOW).node_pools) == {}


def test_with_queue_flag_qos_the_windows_say_their_partitions():
    sinfo = "regular_milan_ss11|up|idle|8|2:00:00\ngpu_ss11|up|allocated|16|2:00:00\ndebug|up|idle|2|30:00\n"
    windows = _qos().parse_backfill(result(stdout=sinfo))
    assert windows == {"*": [BackfillWindow(num_nodes=2, wall_time_min=30),
                             BackfillWindow(num_nodes=8, wall_time_min=120)]}
    assert set(windows.node_pools) == {"debug", "regular_milan_ss11"}


def test_a_line_cut_short_in_its_qos_does_not_make_the_poll_old_format():
    """The last line of an output cut in its QOS column has the old count of fields: the other
    lines still say the format (read as the old one, every job's QOS went into its reason)."""
    cut = SQUEUE_QOS.splitlines()[3].rsplit("|", 1)[0][:-2]  # 3|RUNNING|...|2026-12-06T09:03:59|norm
    statuses = _qos().parse_status(result(stdout=SQUEUE_QOS.replace(SQUEUE_QOS.splitlines()[3], cut)), NOW).statuses
    assert statuses[4].queue == "normal" and statuses[4].message == "JobHeldUser"
