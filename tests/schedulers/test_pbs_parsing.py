"""The PBS driver's render/parse pairs on PBS Pro 2022 outputs (Polaris formats)."""

from __future__ import annotations

import json

import pytest

from balsam.scheduler import SchedulerError, StatusPoll, SubmitRequest
from balsam.states import BatchJobState
from balsam_scheduler_pbs import PBS_STATES, PBSScheduler
from balsam_scheduler_pbs.scheduler import CLOCK_SLACK_SEC, job_project, max_queued_for, parse_pbs_time

from sched_helpers import ReplayRunner, recorded, result, utc

NOW = utc(2023, 11, 21, 18, 16, 13)
NO_POLL = StatusPoll(time=NOW)


@pytest.fixture
def pbs() -> PBSScheduler:
    return PBSScheduler(user="alice")


def test_every_job_state_letter_is_mapped():
    assert set("BEFHMQRSTUWX") == set(PBS_STATES)
    assert PBS_STATES["H"] is BatchJobState.queued and PBS_STATES["E"] is BatchJobState.running
    assert PBS_STATES["F"] is BatchJobState.finished


def test_render_submit(pbs, tmp_path):
    script = tmp_path / "qlaunch00003.sh"
    args = list(pbs.render_submit(SubmitRequest(
        script_path=script, project="datascience", queue="prod", num_nodes=10, wall_time_min=75,
        job_name="qlaunch00003", optional_params={"filesystems": "home:grand", "select": "system=polaris",
                                                   "mig_count": "3", "place": "", "qsub_flags": "-W depend=afterok:12"})).args)
    assert args[0] == "qsub" and args[-1] == str(script)
    assert "select=10:system=polaris" in args and "walltime=01:15:00" in args  # minutes mod 60 (0.7 quirk fixed)
    assert "filesystems=home:grand" in args and not any(a.startswith("place=") for a in args)
    assert args[args.index("-A") + 1] == "datascience" and args[args.index("-q") + 1] == "prod"
    assert args[args.index("-k") + 1] == "doe" and args[args.index("-o") + 1] == str(script.with_suffix(".output"))
    assert "-W" in args and "depend=afterok:12" in args and not any("mig_count" in a for a in args)


def test_parse_submit(pbs):
    assert pbs.parse_submit(result(stdout=recorded("pbs", "qsub_ok.txt"))) == 1196243
    with pytest.raises(SchedulerError) as info:
        pbs.parse_submit(result(stderr=recorded("pbs", "qsub_unknown_queue.stderr.txt"), returncode=172))
    assert "Unknown queue" in str(info.value) and info.value.permanent
    with pytest.raises(SchedulerError, match="Invalid filesystem specified: grnd"):
        pbs.parse_submit(result(stderr=recorded("pbs", "qsub_hook_reject.stderr.txt"), returncode=1))
    with pytest.raises(SchedulerError) as info:
        pbs.parse_submit(result(stderr=recorded("pbs", "qsub_no_server.stderr.txt"), returncode=111))
    assert not info.value.permanent
    with pytest.raises(SchedulerError, match="no job id"):
        pbs.parse_submit(result(stdout="\n"))


def test_ctime_dates_with_padded_days():
    assert parse_pbs_time("Mon Nov  6 16:43:39 2023") == utc(2023, 11, 6, 16, 43, 39)
    assert parse_pbs_time("Tue Nov 21 17:58:13 2023") == utc(2023, 11, 21, 17, 58, 13)
    assert parse_pbs_time(1700589493) == utc(2023, 11, 21, 17, 58, 13)
    assert parse_pbs_time("yesterday") is None and parse_pbs_time("") is None


def test_status_poll_is_json_and_filters_the_owner(pbs):
    command = pbs.render_status("alice")
    assert command.args == ("qstat", "-f", "-F", "json") and command.env["TZ"] == "UTC"
    statuses = pbs.parse_status(result(stdout=recorded("pbs", "qstat_f_json.txt")), NOW)
    assert set(statuses) == {1196243, 1196250, 1196251, 1196252}  # not bob's job, not the array
    running = statuses[1196243]
    assert running.state is BatchJobState.running and running.num_nodes == 2 and running.queue == "prod"
    assert running.wall_time_min == 60 and running.time_remaining_min == 42 and running.queued_time_min == 10
    assert running.project == "datascience"
    queued = statuses[1196250]
    assert queued.state is BatchJobState.queued and queued.time_remaining_min == 30 and queued.queued_time_min == 20
    assert statuses[1196251].state is BatchJobState.queued  # held
    assert statuses[1196252].state is BatchJobState.running  # exiting


def test_waiting_jobs_carry_the_scheduler_comment(pbs):
    statuses = pbs.parse_status(result(stdout=recorded("pbs", "qstat_f_json_reasons.txt")), NOW)
    assert {i: s.message for i, s in statuses.items()} == {
        1196270: "Can Never Run: Insufficient amount of queue resource: nodect (R: 8 A: 2 T: 2)",
        1196271: "Not Running: Insufficient amount of resource: ncpus (R: 4096 A: 1024 T: 35840)",
        1196272: "held (Hold_Types u)",
        1196273: "",  # "Job run at ..." is no reason to wait
    }
    assert statuses[1196273].state is BatchJobState.running
    assert statuses[1196270].state is BatchJobState.queued and statuses[1196270].num_nodes == 8
    polaris = pbs.parse_status(result(stdout=recorded("pbs", "qstat_f_json.txt")), NOW)
    assert polaris[1196250].message == "Not Running: Job would conflict with reservation or top job"
    assert polaris[1196243].message == ""  # running
    assert polaris[1196251].message == "held (Hold_Types u)"


def test_known_json_slips_are_repaired(pbs, caplog):
    statuses = pbs.parse_status(result(stdout=recorded("pbs", "qstat_f_json_bad_escapes.txt")), NOW)
    assert set(statuses) == {1196243, 1196250, 1196251, 1196252}
    assert "malformed JSON" in caplog.text


ALICE = {1196243: BatchJobState.running, 1196250: BatchJobState.queued, 1196251: BatchJobState.queued,
         1196252: BatchJobState.running}


def test_another_users_numeric_environment_values_do_not_break_the_poll(pbs, caplog):
    """PBS 2022 (before openpbs PR #2603) prints bob's `-v FOO3=00,FOO1=.123,...` as bare invalid
    JSON numbers in the every-user listing: they are quoted and alice's jobs come back."""
    stdout = recorded("pbs", "qstat_f_json_numeric_env.txt")
    with pytest.raises(json.JSONDecodeError):
        json.loads(stdout)
    statuses = pbs.parse_status(result(stdout=stdout), NOW)
    assert {i: s.state for i, s in statuses.items()} == ALICE
    assert "malformed JSON" in caplog.text
    bob = PBSScheduler(user="bob").parse_status(result(stdout=stdout), NOW)
    assert set(bob) == {1196190, 1196191} and bob[1196191].state is BatchJobState.queued


NUMERIC_ENV = '"FOO1":.123,'


def test_another_users_unrepairable_record_is_skipped(pbs, caplog):
    """A slip no repair knows (here a missing comma) in bob's record: the listing is read record by
    record, bob's record is skipped with one log line, alice's statuses come back."""
    stdout = recorded("pbs", "qstat_f_json_numeric_env.txt").replace(NUMERIC_ENV, '"FOO1":"a" "FOOX":"b",')
    statuses = pbs.parse_status(result(stdout=stdout), NOW)
    assert {i: s.state for i, s in statuses.items()} == ALICE
    skipped = [r.getMessage() for r in caplog.records if "of other users" in r.getMessage()]
    assert len(skipped) == 1 and "1196191" in skipped[0] and "bob" in skipped[0]


def test_our_unreadable_record_fails_the_poll(pbs):
    stdout = recorded("pbs", "qstat_f_json_numeric_env.txt").replace('"Hold_Types":"u",', '"Hold_Types":"u" "X":1,', 1)
    with pytest.raises(SchedulerError, match=r"record of job 1196251\S* \(alice\) is invalid JSON"):
        pbs.parse_status(result(stdout=stdout), NOW)


def test_cut_off_listing_is_not_read_record_by_record(pbs):
    """Read record by record, a listing cut off after bob's broken record would look like a
    shorter queue: it is a failed poll."""
    stdout = recorded("pbs", "qstat_f_json_numeric_env.txt").replace(NUMERIC_ENV, '"FOO1":"a" "FOOX":"b",')
    with pytest.raises(SchedulerError, match="invalid JSON"):
        pbs.parse_status(result(stdout=stdout[:stdout.index('"1196300[]')]), NOW)


@pytest.mark.parametrize("stdout", [
    '{"Jobs":{"1.s":{"Job_Owner":"alice@h","job_state":"R","Resource_List":{"nodect":"two"}}}}',
    '{"Jobs":{"1.s":"garbage"}}',
    '{"Jobs":[]}',
    '{"Jobs":null}',
])
def test_none_of_our_records_readable_is_a_failed_poll(pbs, stdout):
    """Not an empty queue: read as one, every queued BatchJob would be declared gone."""
    with pytest.raises(SchedulerError, match="none of the user's|'Jobs' is not an object"):
        pbs.parse_status(result(stdout=stdout), NOW)


def test_another_users_odd_record_alone_is_an_empty_queue(pbs):
    stdout = '{"Jobs":{"1.s":{"Job_Owner":"bob@h","job_state":"R","Resource_List":{"nodect":"two"}}}}'
    assert pbs.parse_status(result(stdout=stdout), NOW) == {}


def test_truncated_json_is_a_failed_poll(pbs):
    with pytest.raises(SchedulerError, match="invalid JSON"):
        pbs.parse_status(result(stdout=recorded("pbs", "qstat_f_json_truncated.txt")), NOW)


@pytest.mark.parametrize("stdout", ["", recorded("pbs", "qstat_f_json_no_jobs.txt")])
def test_empty_queue(pbs, stdout):
    assert pbs.parse_status(result(stdout=stdout), NOW) == {}


def test_garbage_instead_of_json(pbs):
    with pytest.raises(SchedulerError, match="printed no JSON"):
        pbs.parse_status(result(stdout="pbs_iff: cannot read reply from pbs_server\n"), NOW)
    with pytest.raises(SchedulerError, match="status poll failed"):
        pbs.parse_status(result(stderr="qstat: cannot connect to server polaris-pbs-01 (errno=111)", returncode=2), NOW)


def test_one_strange_record_does_not_spoil_the_poll(pbs, caplog):
    stdout = recorded("pbs", "qstat_f_json.txt").replace('"nodect":4,', '"nodect":"four",')
    statuses = pbs.parse_status(result(stdout=stdout), NOW)
    assert set(statuses) == {1196243, 1196251, 1196252}
    assert "skipped unreadable record" in caplog.text


def test_history_from_qstat_x(pbs, tmp_path):
    ids = {1196243: None, 1196250: None, 1196251: None, 1196253: None, 1196260: None}
    histories = pbs.parse_histories(result(stdout=recorded("pbs", "qstat_x_f_json.txt")), ids, NO_POLL)
    done = histories[1196243]
    assert done.state is BatchJobState.finished and done.native_state == "F (Exit_status 0)"
    assert done.start_time == utc(2023, 11, 21, 17, 58, 13) and done.end_time == utc(2023, 11, 21, 18, 39, 15)
    assert "walltime 1804 exceeded limit 1800" in histories[1196250].message
    assert histories[1196250].state is BatchJobState.finished
    assert histories[1196251].state is BatchJobState.finished and histories[1196251].start_time is None  # deleted
    assert histories[1196253].state is BatchJobState.submit_failed  # Exit_status -3, never started
    assert histories[1196260].state is BatchJobState.running  # still running: the status poll missed it
    assert histories[1196260].end_time is None


def test_unknown_job_id_checks_the_output_file(pbs, tmp_path):
    ran, never = tmp_path / "qlaunch00001.sh", tmp_path / "qlaunch00002.sh"
    ran.with_suffix(".output").write_text("launcher output\n")
    stderr = "qstat: Unknown Job Id 1196180.polaris-pbs-01\nqstat: Unknown Job Id 1196181.polaris-pbs-01\n"
    histories = pbs.parse_histories(result(stderr=stderr, returncode=153), {1196180: ran, 1196181: never, 1196182: None}, NO_POLL)
    assert histories[1196180].state is BatchJobState.finished and histories[1196180].end_time is not None
    assert histories[1196181].state is BatchJobState.submit_failed and "no output file" in histories[1196181].message
    assert histories[1196182] is None


def test_bulk_history_is_one_command(pbs):
    runner = ReplayRunner({"qstat": result(stdout=recorded("pbs", "qstat_x_f_json.txt"),
                                           stderr=recorded("pbs", "qstat_x_unknown.stderr.txt"), returncode=153)})
    histories = PBSScheduler(runner, user="alice").get_histories({1196243: None, 1196250: None, 1196180: None})
    assert len(runner.calls) == 1 and runner.calls[0].args[:5] == ("qstat", "-x", "-f", "-F", "json")
    assert histories[1196243].state is BatchJobState.finished
    assert histories[1196180].state is BatchJobState.submit_failed


def test_delete(pbs):
    pbs.parse_delete(result(), 1)
    pbs.parse_delete(result(stderr=recorded("pbs", "qdel_unknown.stderr.txt"), returncode=153), 1196240)
    with pytest.raises(SchedulerError, match="Unauthorized Request"):
        pbs.parse_delete(result(stderr=recorded("pbs", "qdel_unauthorized.stderr.txt"), returncode=159), 1196190)
    # a job exiting (state E) cannot be deleted: it is leaving the queue, as deletion wanted
    pbs.parse_delete(result(stderr="qdel: Request invalid for state of job 1196243.polaris-pbs-01\n", returncode=168),
                     1196243)


def test_backfill_from_pbsnodes(pbs):
    windows = pbs.parse_backfill(result(stdout=recorded("pbs", "pbsnodes_a_json.txt")))
    # two free nodes tied to no queue, one free node of the debug queue; the reserved, busy and
    # down nodes do not count
    assert {q: [(w.num_nodes, w.wall_time_min) for w in ws] for q, ws in windows.items()} == {
        "*": [(2, 60)], "debug": [(1, 60)]}
    with pytest.raises(SchedulerError):
        pbs.parse_backfill(result(stdout="{\"nodes\": {", returncode=0))


def test_queue_discovery_keeps_the_queues_users_submit_to(pbs):
    queues = pbs.parse_discover_queues(result(stdout=recorded("pbs", "qstat_Qf_json.txt")))
    # maintenance is disabled, small is route-only, preemptable states no node limit
    assert sorted(queues) == ["debug", "debug-scaling", "prod"]
    assert (queues["debug"].max_nodes, queues["debug"].max_walltime, queues["debug"].max_queued_jobs) == (2, 60, 1)
    assert (queues["prod"].max_nodes, queues["prod"].max_walltime, queues["prod"].max_queued_jobs) == (496, 1440, 100)
    with pytest.raises(SchedulerError, match="cannot connect"):
        pbs.parse_discover_queues(result(stderr="qstat: cannot connect to server polaris-pbs-01 (errno=111)", returncode=2))


def test_routed_jobs_show_their_execution_queue_and_account(pbs):
    """Polaris: `-q prod` is a routing queue; qstat shows the execution queue (small) and, without
    `-P`, project `_pbs_project_default`: the project is the job's Account_Name (`-A`)."""
    statuses = pbs.parse_status(result(stdout=recorded("pbs", "qstat_f_json_routed.txt")), NOW)
    assert {i: (s.queue, s.project) for i, s in statuses.items()} == {
        1196400: ("small", "datascience"), 1196401: ("small", "datascience")}
    assert job_project({"project": "_pbs_project_default"}) == ""
    assert job_project({"project": "CSC249ADCD08"}) == "CSC249ADCD08"  # no Account_Name: -P's project


REPEATED_MAX_QUEUED = """{
    "timestamp":1700590573,
    "pbs_version":"2022.1.3.20230614134139",
    "pbs_server":"polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov",
    "Queue":{
        "debug":{
            "queue_type":"Execution",
            "max_queued":"[o:PBS_ALL=10]",
            "max_queued":"[u:PBS_GENERIC=1]",
            "max_queued":"[u:tom=15]",
            "resources_max":{"nodect":2, "walltime":"01:00:00"},
            "enabled":"True",
            "started":"True"
        }
    }
}
"""


@pytest.mark.parametrize("user, expected", [("alice", 1), ("tom", 10)])
def test_repeated_max_queued_keys_are_all_read(user, expected):
    """qstat -Q -f -F json prints max_queued once per restriction (openpbs #2677): the user's own
    limit, else the generic one, no more than the limit of all users together."""
    queues = PBSScheduler(user=user).parse_discover_queues(result(stdout=REPEATED_MAX_QUEUED))
    assert queues["debug"].max_queued_jobs == expected


def test_max_queued_that_applies_to_the_user():
    assert max_queued_for("[u:PBS_GENERIC=5]", "alice", 20) == 5
    assert max_queued_for(["[u:PBS_GENERIC=5]", "[u:alice=8]"], "alice", 20) == 8
    assert max_queued_for("[o:PBS_ALL=10]", "alice", 20) == 10
    assert max_queued_for(["[o:PBS_ALL=100]", "[g:staff=2]"], "alice", 20) == 20  # group limits left out
    assert max_queued_for(None, "alice", 20) == 20
    zero = REPEATED_MAX_QUEUED.replace("[u:PBS_GENERIC=1]", "[u:PBS_GENERIC=0]")
    assert PBSScheduler(user="alice").parse_discover_queues(result(stdout=zero)) == {}  # 0 would mean "no limit"


def _history(jobs: dict) -> str:
    return json.dumps({"timestamp": 1700590573, "Jobs": jobs}, indent=4)


def test_find_keeps_the_newest_job_of_this_script_since_it_was_written(pbs, tmp_path):
    script = tmp_path / "qsubmit" / "qlaunch00001.sh"
    request = SubmitRequest(script_path=script, project="p", queue="debug", num_nodes=1, wall_time_min=5,
                            job_name="qlaunch00001")
    output = f"login-01:{script.with_suffix('.output')}"
    records = {
        "101.s": {"ctime": "Tue Nov 21 17:00:00 2023", "Output_Path": output, "job_state": "F"},  # before the script
        "102.s": {"ctime": "Tue Nov 21 18:00:00 2023", "Output_Path": "login-01:/elsewhere/qlaunch00001.output"},
        "103.s": {"ctime": "Tue Nov 21 18:00:01 2023", "Output_Path": output, "job_state": "Q"},
        "104.s": {"ctime": "Tue Nov 21 18:05:00 2023", "Output_Path": output, "job_state": "Q"},
    }
    written = utc(2023, 11, 21, 18, 0, 0)
    assert pbs.parse_find_records(result(stdout=_history(records)), request, written) == [104]
    del records["104.s"]
    assert pbs.parse_find_records(result(stdout=_history(records)), request, written) == [103]
    del records["103.s"]
    assert pbs.parse_find_records(result(stdout=_history(records)), request, written) == []
    forgotten = result(stderr="qstat: Unknown Job Id 101.s\n", returncode=153)
    assert pbs.parse_find_records(forgotten, request, written) == []
    with pytest.raises(SchedulerError, match="cannot connect"):
        pbs.parse_find_records(result(stderr="qstat: cannot connect to server s (errno=111)", returncode=2),
                               request, written)


def test_find_adopts_its_job_dated_before_the_script_by_a_server_clock_behind(pbs, tmp_path):
    """The reviewer's case: the script written at ...:20.1 (login node), qsub'ed 0.3 s later on a PBS
    server whose clock is 0.8 s behind: ctime ...:19, a second before the script's mtime ...:20."""
    script = tmp_path / "qsubmit" / "qlaunch00007.sh"
    request = SubmitRequest(script_path=script, project="p", queue="debug", num_nodes=1, wall_time_min=5,
                            job_name="qlaunch00007")
    output = f"login-01:{script.with_suffix('.output')}"
    written = utc(2023, 11, 21, 18, 0, 20)
    skewed = {"123.s": {"ctime": "Tue Nov 21 18:00:19 2023", "Output_Path": output, "job_state": "Q"}}
    assert pbs.parse_find_records(result(stdout=_history(skewed)), request, written) == [123]
    # the slack is the remaining window: an earlier job of this script submitted within it is taken,
    # one submitted before it, or one writing another file (even one ending alike), is not
    edge = {"124.s": {"ctime": "Tue Nov 21 17:58:20 2023", "Output_Path": output, "job_state": "F"}}
    assert CLOCK_SLACK_SEC == 120
    assert pbs.parse_find_records(result(stdout=_history(edge)), request, written) == [124]
    edge["124.s"]["ctime"] = "Tue Nov 21 17:58:19 2023"
    assert pbs.parse_find_records(result(stdout=_history(edge)), request, written) == []
    elsewhere = {"125.s": {"ctime": "Tue Nov 21 18:00:19 2023", "job_state": "Q",
                           "Output_Path": f"login-01:/other{script.with_suffix('.output')}"}}
    assert pbs.parse_find_records(result(stdout=_history(elsewhere)), request, written) == []


def test_find_runs_qselect_then_one_qstat(tmp_path):
    script = tmp_path / "qlaunch00001.sh"
    script.write_text("#!/bin/bash\n")
    request = SubmitRequest(script_path=script, project="p", queue="debug", num_nodes=1, wall_time_min=5,
                            job_name="qlaunch00001")
    runner = ReplayRunner({"qselect": result(stdout="101.s\n102.s\n"), "qstat": result(stdout=_history({}))})
    assert PBSScheduler(runner, user="alice").find_submitted(request) == []
    assert [c.args for c in runner.calls] == [("qselect", "-x", "-u", "alice", "-N", "qlaunch00001"),
                                              ("qstat", "-x", "-f", "-F", "json", "101", "102")]
    nothing = ReplayRunner({"qselect": result(stdout="")})
    assert PBSScheduler(nothing, user="alice").find_submitted(request) == [] and len(nothing.calls) == 1
    script.unlink()  # jobs of that name, but no script to date them: cannot tell
    assert PBSScheduler(runner, user="alice").find_submitted(request) is None
