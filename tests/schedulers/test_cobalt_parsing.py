"""The Cobalt driver's render/parse pairs on Cobalt outputs (Theta formats)."""

from __future__ import annotations

import shutil

import pytest

from balsam.scheduler import SchedulerError, SubmitRequest
from balsam.states import BatchJobState
from balsam_scheduler_cobalt import COBALT_STATES, CobaltScheduler
from balsam_scheduler_cobalt.scheduler import cobalt_duration_min, parse_cobaltlog

from sched_helpers import DATA, recorded, result, utc

NOW = utc(2023, 11, 21, 18, 0, 0)


@pytest.fixture
def cobalt() -> CobaltScheduler:
    return CobaltScheduler(user="alice")


def test_states_mapped():
    for state in ("queued", "user_hold", "admin_hold", "dep_hold", "maxrun_hold", "starting", "running", "exiting",
                  "killing", "dep_fail", "failed", "finished"):
        assert state in COBALT_STATES
    assert COBALT_STATES["dep_fail"] is BatchJobState.submit_failed


def test_render_submit(cobalt, tmp_path):
    script = tmp_path / "qlaunch00012.sh"
    command = cobalt.render_submit(SubmitRequest(
        script_path=script, project="datascience", queue="default", num_nodes=128, wall_time_min=60,
        optional_params={"attrs": "mcdram=cache:numa=quad", "singularity_prime_cache": "no"}))
    args = list(command.args)
    assert args[:3] == ["qsub", "-O", str(tmp_path / "qlaunch00012")]
    assert args[args.index("-n") + 1] == "128" and args[args.index("-t") + 1] == "60"
    assert args[args.index("--attrs") + 1] == "mcdram=cache:numa=quad" and args[-1] == str(script)
    assert "singularity_prime_cache" not in " ".join(args)


def test_parse_submit(cobalt):
    assert cobalt.parse_submit(result(stdout=recorded("cobalt", "qsub_ok.txt"))) == 498131
    with pytest.raises(SchedulerError, match="not valid for user alice") as info:
        cobalt.parse_submit(result(stderr=recorded("cobalt", "qsub_bad_project.stderr.txt"), returncode=1))
    assert info.value.permanent
    with pytest.raises(SchedulerError, match="not a valid queue name"):
        cobalt.parse_submit(result(stderr=recorded("cobalt", "qsub_bad_queue.stderr.txt"), returncode=1))
    with pytest.raises(SchedulerError):
        cobalt.parse_submit(result(stdout="", returncode=0))


def test_status_with_our_header(cobalt):
    command = cobalt.render_status("alice")
    assert command.env["QSTAT_HEADER"] == "JobID:State:WallTime:Queue:Nodes:Project:TimeRemaining:QueuedTime"
    statuses = cobalt.parse_status(result(stdout=recorded("cobalt", "qstat_header.txt")), NOW)
    assert set(statuses) == {498110, 498131, 498132, 498140, 498141, 498142}
    assert statuses[498110].state is BatchJobState.running and statuses[498110].time_remaining_min == 41
    assert statuses[498131].state is BatchJobState.queued and statuses[498131].time_remaining_min == 30
    assert statuses[498140].state is BatchJobState.submit_failed and statuses[498140].queued_time_min == 1514
    assert statuses[498142].state is BatchJobState.running and statuses[498142].num_nodes == 2


def test_hold_states_are_the_only_reason_cobalt_gives(cobalt):
    statuses = cobalt.parse_status(result(stdout=recorded("cobalt", "qstat_header.txt")), NOW)
    assert statuses[498132].message == "user_hold" and statuses[498132].state is BatchJobState.queued
    assert statuses[498131].message == "" and statuses[498110].message == ""  # plain queued, running


def test_status_in_another_header_is_an_error(cobalt):
    with pytest.raises(SchedulerError, match="requested columns"):
        cobalt.parse_status(result(stdout=recorded("cobalt", "qstat_default_header.txt")), NOW)


def test_garbled_lines_skipped(cobalt, caplog):
    """The traceback's line is skipped; the two lines with a cut or garbled column name their job
    and state, and are those jobs' statuses (skipped, their queued jobs read as gone)."""
    statuses = cobalt.parse_status(result(stdout=recorded("cobalt", "qstat_garbled.txt")), NOW)
    assert set(statuses) == {498110, 498131, 498133}
    assert caplog.text.count("skipped unreadable line") == 3


def test_empty_and_failed_polls(cobalt):
    assert cobalt.parse_status(result(stdout=""), NOW) == {}
    with pytest.raises(SchedulerError):
        cobalt.parse_status(result(stderr="Failed to connect to queue manager", returncode=1), NOW)


def test_durations():
    assert cobalt_duration_min("25:14:00") == 1514 and cobalt_duration_min("N/A") == 0
    assert cobalt_duration_min("0:31:00") == 31 and cobalt_duration_min("45") == 45


def test_history_from_cobaltlog(cobalt, tmp_path):
    def history(name: str, jobid: int):
        script = tmp_path / f"q{jobid}.sh"
        shutil.copy(DATA / "cobalt" / name, script.with_suffix(".cobaltlog"))
        return cobalt.get_history(jobid, script)

    done = history("qlaunch00012.cobaltlog", 498110)
    assert done.state is BatchJobState.finished
    assert done.start_time == utc(2023, 11, 21, 17, 51, 6) and done.end_time == utc(2023, 11, 21, 18, 49, 58)
    assert "exit code of 0" in done.message
    running = history("qlaunch00013_running.cobaltlog", 498111)  # started, not ended: still running
    assert running.state is BatchJobState.running and running.start_time == utc(2023, 11, 21, 17, 51, 6)
    assert running.end_time is None
    deleted = history("qlaunch00014_deleted.cobaltlog", 498131)
    assert deleted.state is BatchJobState.finished and deleted.start_time is None
    assert history("qlaunch00015_depfail.cobaltlog", 498140).state is BatchJobState.submit_failed
    assert history("qlaunch00016_garbage.cobaltlog", 498150) is None
    assert cobalt.get_history(1, tmp_path / "missing.sh") is None


def test_backfill_windows_cumulative_per_queue(cobalt):
    windows = cobalt.parse_backfill(result(stdout=recorded("cobalt", "nodelist.txt")))
    assert {q: [(w.num_nodes, w.wall_time_min) for w in ws] for q, ws in windows.items()} == {
        "backfill": [(1, 75), (3, 31)], "default": [(1, 75), (3, 31)], "debug-cache-quad": [(1, 58)]}
    with pytest.raises(SchedulerError, match="lacks"):
        cobalt.parse_backfill(result(stdout="Name State\nx idle\n"))


def test_delete_and_projects(cobalt):
    cobalt.parse_delete(result(stdout=recorded("cobalt", "qdel_ok.txt")), 498131)
    with pytest.raises(SchedulerError):
        cobalt.parse_delete(result(stderr="qdel: permission denied", returncode=1), 1)
    projects = cobalt.parse_discover_projects(result(stderr=recorded("cobalt", "qsub_bad_project.stderr.txt"), returncode=1))
    assert projects == ["datascience", "catalyst", "CSC249ADCD08"]


def test_qsub_that_exits_0_without_a_job_id_is_not_a_refusal(cobalt):
    """qsub accepted the job (exit 0) but its id line was lost: the job may be queued. A permanent
    refusal made the agent drop the submission's marker and fail the BatchJob while the job ran."""
    for stdout in (recorded("cobalt", "qsub_no_jobid.txt"), ""):
        with pytest.raises(SchedulerError, match="^qsub printed no job id") as info:
            cobalt.parse_submit(result(stdout=stdout, returncode=0))
        assert not info.value.permanent


def test_status_with_nothing_readable_is_a_failed_poll_not_an_empty_queue(cobalt, caplog):
    """As Slurm's: lines under the header, none readable, used to read as "no jobs", and every
    queued BatchJob was declared gone after three polls."""
    with pytest.raises(SchedulerError, match=r"^qstat printed nothing readable \(first line: 'Traceback"):
        cobalt.parse_status(result(stdout=recorded("cobalt", "qstat_nothing_readable.txt")), NOW)
    assert caplog.text.count("skipped unreadable line") == 2
    assert cobalt.parse_status(result(stdout=recorded("cobalt", "qstat_header.txt").splitlines(True)[0]), NOW) == {}


def test_an_earlier_submission_is_found_in_its_cobaltlog(cobalt, tmp_path):
    """qstat cannot look jobs up by name; qsub writes the job's .cobaltlog (``Jobid: N``) as it
    accepts it, so a submission whose output was lost is found there, not submitted twice."""
    import os

    script = tmp_path / "qlaunch00014.sh"
    script.write_text("#!/bin/bash\n")
    request = SubmitRequest(script_path=script, project="datascience", queue="debug-cache-quad", num_nodes=8,
                            wall_time_min=30, job_name="qlaunch00014")
    assert cobalt.find_submitted(request) is None  # no log: cannot tell
    log = script.with_suffix(".cobaltlog")
    shutil.copy(DATA / "cobalt" / "qlaunch00014_deleted.cobaltlog", log)
    assert cobalt.find_submitted(request) == [498131]
    os.utime(log, (script.stat().st_mtime - 60,) * 2)  # a log older than the script is another BatchJob's
    assert cobalt.find_submitted(request) is None
