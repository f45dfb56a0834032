"""Cobalt's qsub refusals as `balsam queue ls` shows them, and a qstat poll with a garbled line
(audit i4).

Cobalt's qsub parses its options (the command line, the script's ``#COBALT`` lines, ``-x
qsub_flags``) with Python's optparse, which prints the usage text before the error itself:
``Usage: qsub.py [options] ...``, ``Refer to man pages ...``, then ``qsub.py: error: no such
option: --dependecies``. The driver took the first three lines as the reason, so the BatchJob's
error, cut to 60 characters by `balsam queue ls`, read ``qsub refused the job: Usage: qsub.py
[options] <ex...`` and never named the bad option. The recorded outputs in ``i4_recorded/`` are
written by hand in optparse's format (``print_usage`` then ``prog: error: msg``).

A qstat line of which only the job id and state are readable (a column left empty, a garbled
count) is that job's status, with the unreadable columns 0 or empty: skipped, it read as "the job
left the queue", and the agent ended a BatchJob whose job still waited (audit i4 skipped it whenever
another line was readable; review r3). A line naming no job is skipped and logged, as the other
drivers do; the poll fails only when no line was readable.

A refusal of qsub is classed (transient, at the maxqueued limit) by every line it printed, not by
the lines picked to show: a warning's ``error:`` line beside the limit line made the limit a
permanent refusal, and beside a "connection timed out" line a lost connection too (review r3).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from balsam.cli.queue import waiting_reason
from balsam.scheduler import SchedulerError
from balsam.states import BatchJobState
from balsam_scheduler_cobalt import CobaltScheduler

from sched_helpers import recorded, result, utc

I4 = Path(__file__).parent / "i4_recorded"


@pytest.mark.parametrize("name,reason", [
    ("cobalt_qsub_bad_option.stderr.txt", "no such option: --dependecies"),
    ("cobalt_qsub_missing_value.stderr.txt", "-A option requires an argument"),
])
def test_a_qsub_usage_error_names_the_error_not_the_usage(name: str, reason: str) -> None:
    with pytest.raises(SchedulerError) as info:
        CobaltScheduler(user="alice").parse_submit(result(stderr=(I4 / name).read_text(), returncode=2))
    assert str(info.value) == f"qsub refused the job: {reason}"
    assert info.value.permanent and not info.value.at_queue_limit
    shown = waiting_reason("submit_failed", {"error": str(info.value)})
    assert reason[:20] in shown and "Usage" not in shown, shown


def test_cobalts_own_refusals_read_as_before() -> None:
    cobalt = CobaltScheduler(user="alice")
    cases = {
        "qsub_bad_project.stderr.txt": ("qsub refused the job: Project 'nosuchproject' is not valid for user alice. "
                                        "Projects available: datascience catalyst CSC249ADCD08", True, False),
        "qsub_bad_queue.stderr.txt": ("qsub refused the job: 'nosuch' is not a valid queue name", True, False),
        "qsub_maxqueued.stderr.txt": ("qsub refused the job: The limit of 20 jobs per user in the 'default' queue "
                                      "has been reached", False, True),
    }
    for name, (message, permanent, at_limit) in cases.items():
        with pytest.raises(SchedulerError) as info:
            cobalt.parse_submit(result(stderr=recorded("cobalt", name), returncode=1))
        assert (str(info.value), info.value.permanent, info.value.at_queue_limit) == (message, permanent, at_limit)
    with pytest.raises(SchedulerError, match=r"^qsub refused the job: exit code 1 and no output$"):
        cobalt.parse_submit(result(returncode=1))


def test_a_garbled_line_naming_a_queued_job_is_that_jobs_status(caplog) -> None:
    """498131's line lacks its last column; the only whole line is of a finished job (no status).
    Skipped, 498131 read as gone: its BatchJob ended submit_failed while the job still waited."""
    text = (I4 / "cobalt_qstat_finished_and_garbled.txt").read_text()
    with caplog.at_level("WARNING", logger="balsam.scheduler.cobalt"):
        statuses = CobaltScheduler(user="alice").parse_status(result(stdout=text), utc(2023, 11, 21, 18, 0, 0))
    assert list(statuses) == [498131]
    status = statuses[498131]
    assert (status.state, status.queue, status.num_nodes, status.wall_time_min, status.project) == (
        BatchJobState.queued, "debug-cache-quad", 8, 30, "datascience")
    assert status.queued_time_min == 0  # the column it lacks
    assert any("but for its job id and state" in r.getMessage() for r in caplog.records)
    alone = "\n".join(text.splitlines()[:2] + text.splitlines()[3:])  # the garbled line alone
    assert list(CobaltScheduler(user="alice").parse_status(result(stdout=alone), utc(2023, 11, 21))) == [498131]


@pytest.mark.parametrize("line,fields", [
    ("498131  user_hold", ("user_hold", "", 0, 0, "")),  # cut after the state
    ("498131  queued  00:30:00  debug-cache-quad  ²  datascience  N/A  00:01:00", ("", "debug-cache-quad", 0, 30,
                                                                                     "datascience")),
    ("498131  queued  00:30:00  debug cache quad  8  datascience  N/A  00:01:00", ("", "", 0, 0, "")),  # can't place
])
def test_only_what_can_be_placed_is_read_from_a_garbled_line(line: str, fields: tuple) -> None:
    header = recorded("cobalt", "qstat_header.txt").splitlines()[:2]
    statuses = CobaltScheduler(user="alice").parse_status(result(stdout="\n".join(header + [line])), utc(2023, 11, 21))
    status = statuses[498131]
    assert status.state is BatchJobState.queued
    assert (status.message, status.queue, status.num_nodes, status.wall_time_min, status.project) == fields


@pytest.mark.parametrize("garbled", [
    "Traceback (most recent call last):",
    "①  queued  00:30:00  debug  8  datascience  N/A  00:02:10",  # its job id unreadable
    "498131  qeued  00:30:00  debug  8  datascience  N/A",  # its state unreadable, a column short
])
def test_a_line_naming_no_job_is_skipped_beside_readable_ones(garbled: str, caplog) -> None:
    """Beside a readable line, such a line is skipped and logged (the driver contract: failure only
    when nothing is readable); alone, the poll fails (transient)."""
    lines = recorded("cobalt", "qstat_header.txt").splitlines()
    running = lines[2]
    read = CobaltScheduler(user="alice").parse_status(result(stdout="\n".join(lines[:2] + [running, garbled])),
                                                     utc(2023, 11, 21))
    assert set(read) == {int(running.split()[0])}
    assert "skipped unreadable line" in caplog.text
    with pytest.raises(SchedulerError, match="^qstat printed nothing readable") as info:
        CobaltScheduler(user="alice").parse_status(result(stdout="\n".join(lines[:2] + [garbled])), utc(2023, 11, 21))
    assert not info.value.permanent


@pytest.mark.parametrize("stderr,permanent,at_limit,shown", [
    # a warning's "error:" line beside Cobalt's maxqueued line: shown, the limit line hid; classed by
    # it, the refusal was a permanent one and the BatchJob failed instead of waiting for the queue
    ("WARNING: error: could not read ~/.cobaltrc\n"
     "The limit of 20 jobs per user in the 'default' queue has been reached\n",
     False, True, "The limit of 20 jobs per user in the 'default' queue has been reached"),
    ("Failed to connect to queue-manager: connection timed out\nERROR: submission aborted\n",
     False, False, "Failed to connect to queue-manager: connection timed out ERROR: submission aborted"),
    # nothing but the usage text: "exit code 1 and no output" was shown, though qsub said something
    ("Usage: qsub.py [options] <executable> [<excutable options>]\n",
     True, False, "Usage: qsub.py [options] <executable> [<excutable options>]"),
])
def test_a_qsub_refusal_is_classed_by_all_it_printed(stderr: str, permanent: bool, at_limit: bool,
                                                      shown: str) -> None:
    with pytest.raises(SchedulerError) as info:
        CobaltScheduler(user="alice").parse_submit(result(stderr=stderr, returncode=1))
    assert (info.value.permanent, info.value.at_queue_limit) == (permanent, at_limit)
    assert str(info.value).startswith(f"qsub refused the job: {shown}"), str(info.value)
