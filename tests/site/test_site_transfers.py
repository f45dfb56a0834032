"""The ``transfers`` agent module against a real API server, with the built-in ``local`` backend.

Jobs are created through the Python API with transfer slots; the module is run cycle by cycle;
stage-outs are released by driving the jobs to POSTPROCESSED as a launcher and the processing
module would (site_test_utils.finish_jobs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from balsam.site.modules.transfers import JOURNAL_NAME, TransfersModule, TransfersOptions
from site_test_utils import events, finish_jobs, job_rows, state_counts


def transfer_app(site_id: int):
    from balsam.api import ApplicationDefinition

    class Stager(ApplicationDefinition):
        site = site_id
        command_template = "cat input.txt > result.txt"
        transfers = {
            "input": {"required": True, "direction": "in", "local_path": "input.txt", "description": "input"},
            "tree": {"required": False, "direction": "in", "local_path": "tree", "recursive": True},
            "result": {"required": False, "direction": "out", "local_path": "result.txt", "description": "output"},
        }

    Stager.sync()
    return Stager


def make_module(site, client, **overrides) -> TransfersModule:
    values = {"transfer_locations": {"shared": "local://", "files": "file://"}, "service_period": 1,
              "retry_backoff_sec": 0, "max_attempts": 2, **overrides}
    return TransfersModule(site, TransfersOptions(**values), client)


def run_cycles(module: TransfersModule, predicate, cycles: int = 60) -> None:
    import time

    for _ in range(cycles):
        module.run_cycle()
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("transfers did not reach the expected states")


@pytest.fixture
def site(make_site):
    return make_site(overrides={"transfers": {"transfer_locations": {"shared": "local://", "files": "file://"}}})


def test_stage_in_then_stage_out_through_local(site, client, tmp_path) -> None:
    from balsam.api import Job

    app = transfer_app(site.site_id)
    remote = tmp_path / "remote"
    (remote / "in").mkdir(parents=True)
    (remote / "tree" / "sub").mkdir(parents=True)
    (remote / "tree" / "sub" / "leaf.txt").write_text("leaf")
    jobs = []
    for i in range(7):
        (remote / "in" / f"{i}.txt").write_text(f"input {i}\n")
        transfers = {"input": f"shared:{remote}/in/{i}.txt", "result": f"files:{remote}/out/{i}.txt"}
        if i == 0:
            transfers["tree"] = f"shared:{remote}/tree"
        jobs.append(Job(f"stage/{i}", app, transfers=transfers))
    jobs = Job.objects.bulk_create(jobs)
    ids = [j.id for j in jobs]
    module = make_module(site, client, transfer_batch_size=3, max_concurrent_transfers=2)
    data = Path(site.data_path)

    module.run_cycle()
    items = client.get("/transfers/", params={"job_id": ids})["results"]
    active = [i for i in items if i["state"] == "active"]
    # Groups by (direction, alias): 7 "shared" stage-ins + 1 tree -> batches of 3, at most 2 tasks.
    assert len({i["task_id"] for i in active}) == 2 and len(active) == 6
    assert all(i["task_id"].startswith("local:") for i in active)
    assert module.last_cycle_calls == 3  # GET items, GET the jobs' workdirs, one PATCH

    run_cycles(module, lambda: state_counts(client, site_id=site.site_id)["STAGED_IN"] == 7)
    for i in range(7):
        assert (data / f"stage/{i}/input.txt").read_text() == f"input {i}\n"
    assert (data / "stage/0/tree/sub/leaf.txt").read_text() == "leaf"
    assert not list(data.rglob("*.balsam-partial-*"))

    for i in range(7):
        (data / f"stage/{i}/result.txt").write_text(f"result {i}\n")
    finish_jobs(client, site.site_id, ids)
    assert state_counts(client, site_id=site.site_id)["POSTPROCESSED"] == 7
    run_cycles(module, lambda: state_counts(client, site_id=site.site_id)["JOB_FINISHED"] == 7)
    for i in range(7):
        assert (remote / "out" / f"{i}.txt").read_text() == f"result {i}\n"
    history = [(e["from_state"], e["to_state"]) for e in events(client, job_id=ids[0])]
    assert ("READY", "STAGED_IN") in history and history[-1] == ("POSTPROCESSED", "JOB_FINISHED")
    items = client.get("/transfers/", params={"job_id": ids})["results"]
    assert {i["state"] for i in items} == {"done"}
    assert all(i["transfer_info"].get("completed") for i in items)
    module.close()


def test_missing_file_fails_its_job_after_the_retries(site, client, tmp_path) -> None:
    from balsam.api import Job

    app = transfer_app(site.site_id)
    (tmp_path / "ok.txt").write_text("fine")
    good, bad = Job.objects.bulk_create([
        Job("good/0", app, transfers={"input": f"shared:{tmp_path}/ok.txt"}),
        Job("bad/0", app, transfers={"input": f"shared:{tmp_path}/missing.txt"}),
    ])
    module = make_module(site, client, max_attempts=3)
    run_cycles(module, lambda: {r["id"]: r["state"] for r in job_rows(client, site_id=site.site_id)}[bad.id] == "FAILED")
    rows = {r["id"]: r["state"] for r in job_rows(client, site_id=site.site_id)}
    assert rows[good.id] == "STAGED_IN"
    item = client.get("/transfers/", params={"job_id": [bad.id]})["results"][0]
    assert item["state"] == "error" and item["transfer_info"]["attempts"] == 3
    assert "no such file or directory" in item["transfer_info"]["error"]
    last = events(client, job_id=bad.id)[-1]
    assert (last["from_state"], last["to_state"]) == ("READY", "FAILED")
    assert last["data"]["message"].startswith(f"Transfer failed: stage-in of shared:{tmp_path}/missing.txt to input.txt")
    module.close()


def test_retry_waits_for_its_backoff(site, client, tmp_path) -> None:
    from balsam.api import Job

    app = transfer_app(site.site_id)
    (job,) = Job.objects.bulk_create([Job("late/0", app, transfers={"input": f"shared:{tmp_path}/late.txt"})])
    module = make_module(site, client, max_attempts=5, retry_backoff_sec=3600)
    run_cycles(module, lambda: client.get("/transfers/", params={"job_id": [job.id]})["results"][0]["transfer_info"].get("attempts"))
    item = client.get("/transfers/", params={"job_id": [job.id]})["results"][0]
    assert item["state"] == "pending" and item["transfer_info"]["retry_after"]
    (tmp_path / "late.txt").write_text("arrived")
    for _ in range(3):
        module.run_cycle()  # not due for an hour: not submitted again
    assert client.get("/transfers/", params={"job_id": [job.id]})["results"][0]["state"] == "pending"
    module.close()


def test_bad_locations_and_paths_fail_at_once_with_a_reason(make_site, client, tmp_path) -> None:
    """A slot leading out of the workdir is refused as the app registers (an app stored before
    that rule fails such an item at stage time: tests/transfers/test_local_backend_and_app_paths.py);
    an alias whose protocol has no backend fails its job at once."""
    from balsam.api import ApplicationDefinition, Job

    site = make_site(overrides={"transfers": {"transfer_locations": {"shared": "local://", "gone": "nosuch://x"}}})
    site_id = site.site_id

    class Escaper(ApplicationDefinition):
        site = site_id
        command_template = "true"
        transfers = {
            "input": {"required": False, "direction": "in", "local_path": "../../outside.txt"},
            "other": {"required": False, "direction": "in", "local_path": "x.txt"},
        }

    with pytest.raises(Exception, match=r"transfers\.input\.local_path: '\.\./\.\./outside\.txt' has a '\.\.' part"):
        Escaper.sync()

    class Unknown(ApplicationDefinition):
        site = site_id
        command_template = "true"
        transfers = {"other": {"required": False, "direction": "in", "local_path": "x.txt"}}

    Unknown.sync()
    (tmp_path / "f").write_text("x")
    (unknown,) = Job.objects.bulk_create([Job("unk/0", Unknown, transfers={"other": f"gone:{tmp_path}/f"})])
    module = make_module(site, client, transfer_locations={"shared": "local://", "gone": "nosuch://x"})
    module.run_cycle()
    rows = {r["id"]: r["state"] for r in job_rows(client, site_id=site_id)}
    assert rows == {unknown.id: "FAILED"}
    assert "no transfer backend for protocol 'nosuch'" in events(client, job_id=unknown.id)[-1]["data"]["error"]
    assert not (Path(site.data_path).parent / "outside.txt").exists()
    module.close()


def test_journal_resumes_polling_instead_of_resubmitting(site, client, tmp_path) -> None:
    """An agent killed between submitting a task and recording it: the next one finds the task id
    in the journal and polls it; a local task id from a dead process is unknown, so the items are
    submitted again (harmless: copies are atomic)."""
    from balsam.api import Job

    app = transfer_app(site.site_id)
    (tmp_path / "in.txt").write_text("data")
    (job,) = Job.objects.bulk_create([Job("j/0", app, transfers={"input": f"shared:{tmp_path}/in.txt"})])
    item = client.get("/transfers/", params={"job_id": [job.id]})["results"][0]
    journal = Path(site.site_path) / JOURNAL_NAME
    journal.write_text(json.dumps({"task_id": "local:deadbeef", "item_ids": [item["id"]]}) + "\n{\"task_id\": \"loc")

    module = make_module(site, client)
    polled: list[list[str]] = []
    backend = module.backend("local")
    original = backend.poll_tasks
    backend.poll_tasks = lambda ids: polled.append(list(ids)) or original(ids)  # type: ignore[method-assign]
    module.run_cycle()
    assert polled == [["deadbeef"]]  # resumed, not resubmitted
    assert not journal.exists()
    after = client.get("/transfers/", params={"job_id": [job.id]})["results"][0]
    assert after["state"] == "pending" and after["task_id"] == ""  # unknown -> submitted again next cycle
    run_cycles(module, lambda: job_rows(client, id=[job.id])[0]["state"] == "STAGED_IN")
    assert (Path(site.data_path) / "j/0/input.txt").read_text() == "data"
    module.close()


def test_a_token_batch_whose_submission_failed_is_sent_again_with_its_token(site, client, tmp_path) -> None:
    """A submission with a token (Globus' submission id) that times out may have started a task:
    the journal keeps the token past the cycle and the next cycle sends the batch again with the
    same token, which the service answers with the task it has. The journal used to be cleared at
    the end of the cycle, and the batch went again under a new token: a second task."""
    from balsam.api import Job
    from balsam.transfer import TransferError

    app = transfer_app(site.site_id)
    (tmp_path / "in.txt").write_text("data")
    (job,) = Job.objects.bulk_create([Job("tok/0", app, transfers={"input": f"shared:{tmp_path}/in.txt"})])
    module = make_module(site, client)
    backend = module.backend("local")
    tokens = iter(["token-1", "token-2"])
    sent: list = []
    original = backend.submit

    def submit(location, direction, files, token=None):
        sent.append(token)
        if len(sent) == 1:
            raise TransferError("read timed out (the service may have it)", retryable=True)
        return original(location, direction, files)  # the local backend takes no token

    backend.submission_token = lambda: next(tokens)  # type: ignore[method-assign]
    backend.submit = submit  # type: ignore[method-assign]
    module.run_cycle()
    assert sent == ["token-1"]
    assert (Path(site.site_path) / JOURNAL_NAME).exists()  # the token is kept
    run_cycles(module, lambda: job_rows(client, id=[job.id])[0]["state"] == "STAGED_IN")
    assert sent == ["token-1", "token-1"]  # the same token again, never a new one
    assert not (Path(site.site_path) / JOURNAL_NAME).exists()
    module.close()


def test_cli_lists_items_and_job_ls_shows_progress(site, client, tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from balsam._api.model import reset_default_client
    from balsam.api import Job
    from balsam.cli import main

    reset_default_client()
    app = transfer_app(site.site_id)
    (tmp_path / "a.txt").write_text("a")
    ok, bad = Job.objects.bulk_create([
        Job("cli/ok", app, transfers={"input": f"shared:{tmp_path}/a.txt", "result": f"shared:{tmp_path}/out/ok.txt"}),
        Job("cli/bad", app, transfers={"input": f"shared:{tmp_path}/nope.txt"}),
    ])
    module = make_module(site, client, max_attempts=1)
    run_cycles(module, lambda: {r["state"] for r in job_rows(client, site_id=site.site_id)} == {"STAGED_IN", "FAILED"})
    module.close()

    def balsam(*args: str) -> str:
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    listing = balsam("transfer", "ls", "--site", str(site.site_id))
    lines = {(line.split()[1], line.split()[2]): line for line in listing.splitlines()[1:]}
    assert " done " in lines[(str(ok.id), "in")] and "task: 1/2 files" in lines[(str(ok.id), "in")]
    assert " awaiting_job " in lines[(str(ok.id), "out")]  # waits for its job to run
    assert " error " in lines[(str(bad.id), "in")] and "no such file or directory" in lines[(str(bad.id), "in")]
    counts = balsam("transfer", "ls", "--job", str(ok.id), "--by-state")
    assert [line.split() for line in counts.splitlines()[1:]] == [["in", "done", "1"], ["out", "awaiting_job", "1"]]
    # --job with an explicit --site of another site: narrowed to nothing (the --site was ignored).
    other = client.post("/sites/", json={"name": "cli-other", "path": str(tmp_path / "other")})
    assert balsam("transfer", "ls", "--job", str(ok.id), "--site", str(other["id"])).strip() == "No matching transfer items."
    import balsam.cli.transfer as transfer_cli

    for many in (2000, 1):  # by job ids, then (many jobs) by site
        monkeypatch.setattr(transfer_cli, "MANY_JOBS", many)
        jobs = balsam("job", "ls", "--site", str(site.site_id))
        assert "Transfers" in jobs
        rows = {line.split()[0]: line for line in jobs.splitlines()[1:]}
        assert "in 1/1 out 0/1" in rows[str(ok.id)] and "in 0/1!" in rows[str(bad.id)]


def test_bad_backend_options_make_items_wait_with_the_reason(site, client, tmp_path, monkeypatch) -> None:
    """An operator's mistake in backend_options must not fail jobs: a value its options refuse stops
    the module from starting (as settings.yml's check does); one the backend only refuses when it is
    built makes the items wait, saying why."""
    from balsam.api import Job
    from balsam.builtin.local_transfer import LocalTransfer
    from balsam.options import OptionsError
    from balsam.transfer import TransferError

    with pytest.raises(OptionsError, match="transfers.backend_options.local.threads: must be at least 1"):
        make_module(site, client, backend_options={"local": {"threads": 0}})

    def refuse(self, options=None, *, site_path=None):
        raise TransferError("transfers.backend_options.local: no thread may start here", retryable=False)

    monkeypatch.setattr(LocalTransfer, "__init__", refuse)
    app = transfer_app(site.site_id)
    (tmp_path / "a.txt").write_text("a")
    (job,) = Job.objects.bulk_create([Job("wait/0", app, transfers={"input": f"shared:{tmp_path}/a.txt"})])
    module = make_module(site, client, backend_options={"local": {"threads": 2}})
    for _ in range(2):
        module.run_cycle()
    item = client.get("/transfers/", params={"job_id": [job.id]})["results"][0]
    assert item["state"] == "pending" and "attempts" not in item["transfer_info"]
    assert "transfers.backend_options.local: no thread may start here" in item["transfer_info"]["reason"]
    assert job_rows(client, id=[job.id])[0]["state"] == "READY"
    module.close()
    with pytest.raises(OptionsError, match="transfers.max_attempts: must be at least 1"):
        make_module(site, client, max_attempts=0)


def test_settings_refuse_unknown_backends_and_their_unknown_options() -> None:
    """A typo in backend_options fails when settings.yml is read (agent start, `balsam site
    check-settings`), with its line, not when the backend is first used."""
    from balsam.config import SettingsError, loads_settings
    from balsam.plugins.manager import get_plugin_manager

    available = ", ".join(sorted(get_plugin_manager().list_drivers("transfer", resolve=False)))
    text = ("transfers:\n  backend_options:\n    local: {threads: 2}\n    rsnyc: {threads: 2}\n"
            "    rsync:\n      thread: 2\n")
    with pytest.raises(SettingsError) as info:
        loads_settings(text)
    assert info.value.errors == [
        f"settings.yml:4 transfers.backend_options.rsnyc: unknown transfer backend 'rsnyc' (available: {available})",
        "settings.yml:6 transfers.backend_options.rsync.thread: unknown option (known: extra_args, "
        "local_mode_for_localhost, rsync, skip_unchanged, ssh_command, threads, timeout_sec)",
    ]
    settings = loads_settings("transfers:\n  backend_options:\n    local: {threads: 8}\n    rsync: {threads: 2}\n")
    assert settings.transfers.backend_options == {"local": {"threads": 8}, "rsync": {"threads": 2}}


def test_a_directory_slot_into_the_workdir_keeps_the_other_inputs(site, client, tmp_path) -> None:
    from balsam.api import ApplicationDefinition, Job

    site_id = site.site_id

    class Both(ApplicationDefinition):
        site = site_id
        command_template = "true"
        transfers = {
            "config": {"required": True, "direction": "in", "local_path": "config.yml"},
            "dataset": {"required": True, "direction": "in", "local_path": ".", "recursive": True},
        }

    Both.sync()
    (tmp_path / "dataset" / "part").mkdir(parents=True)
    (tmp_path / "dataset" / "part" / "a.dat").write_text("a")
    (tmp_path / "config.yml").write_text("k: v")
    (job,) = Job.objects.bulk_create([Job("both/0", Both, transfers={
        "config": f"shared:{tmp_path}/config.yml", "dataset": f"files:{tmp_path}/dataset"})])
    module = make_module(site, client)
    run_cycles(module, lambda: job_rows(client, id=[job.id])[0]["state"] == "STAGED_IN")
    workdir = Path(site.data_path) / "both/0"
    assert sorted(p.relative_to(workdir).as_posix() for p in workdir.rglob("*")) == ["config.yml", "part", "part/a.dat"]
    module.close()


def test_a_failed_stage_out_to_a_prefixed_local_location_fails_its_job(make_site, client, tmp_path) -> None:
    """local:///prefix: the backend filed the error under the prefixed destination, the agent found
    no item with that dest, and the job reached JOB_FINISHED with nothing copied."""
    from balsam.api import Job

    prefix = tmp_path / "prefix"
    prefix.mkdir()
    locations = {"proj": f"local://{prefix}"}
    site = make_site(overrides={"transfers": {"transfer_locations": locations}})
    app = transfer_app(site.site_id)
    (prefix / "in.txt").write_text("x")
    made, lost = Job.objects.bulk_create([
        Job(f"pre/{i}", app, transfers={"input": "proj:/in.txt", "result": f"proj:/out/{i}.txt"})
        for i in range(2)])
    module = make_module(site, client, transfer_locations=locations)
    run_cycles(module, lambda: {r["state"] for r in job_rows(client, site_id=site.site_id)} == {"STAGED_IN"})
    (Path(site.data_path) / "pre/0/result.txt").write_text("result 0")  # job 1 "ran" but wrote nothing
    finish_jobs(client, site.site_id, [made.id, lost.id])
    run_cycles(module, lambda: {r["state"] for r in job_rows(client, site_id=site.site_id)} == {"JOB_FINISHED", "FAILED"})
    rows = {r["id"]: r["state"] for r in job_rows(client, site_id=site.site_id)}
    assert rows == {made.id: "JOB_FINISHED", lost.id: "FAILED"}
    assert (prefix / "out/0.txt").read_text() == "result 0" and not (prefix / "out/1.txt").exists()
    assert "no such file or directory" in events(client, job_id=lost.id)[-1]["data"]["error"]
    module.close()


def test_an_item_whose_task_failed_is_not_reattached_while_the_journal_is_kept(site, client, tmp_path) -> None:
    """While the journal was kept (another batch's token submission kept failing), the lines of
    tasks already recorded stayed in it: an item whose task failed was re-attached to that dead
    task every cycle, its tries used up in consecutive cycles without a retry or a backoff."""
    from balsam.api import Job
    from balsam.transfer import TaskState, TaskStatus, TransferError

    app = transfer_app(site.site_id)
    (tmp_path / "x").write_text("x")
    job_a, job_b = Job.objects.bulk_create([Job("ja", app, transfers={"input": f"shared:{tmp_path}/x"}),
                                            Job("jb", app, transfers={"input": f"files:{tmp_path}/x"})])
    module = make_module(site, client, max_attempts=3, retry_backoff_sec=3600)
    backend = module.backend("local")
    counter = iter(range(1000))
    backend.submission_token = lambda: f"tok-{next(counter)}"  # type: ignore[method-assign]
    submits: list = []

    def submit(location, direction, files, token=None):
        submits.append((location.alias, token))
        if location.alias == "files":
            raise TransferError("HTTP 502 (the service may have it)", retryable=True)
        return f"T{len(submits)}"

    backend.submit = submit  # type: ignore[method-assign]
    backend.poll = lambda ids: {i: TaskStatus(TaskState.failed, "endpoint hiccup", retryable=True) for i in ids}  # type: ignore[method-assign]
    history = []
    for _ in range(5):
        module.run_cycle()
        item = client.get("/transfers/", params={"job_id": [job_a.id]})["results"][0]
        history.append((item["state"], item["transfer_info"].get("attempts"), item["task_id"]))
    assert history[0] == ("active", None, "local:T1")
    assert history[1:] == [("pending", 1, "")] * 4  # waiting for its backoff, not re-attached to T1
    assert [s for s in submits if s[0] == "shared"] == [("shared", "tok-0")]
    assert {s for s in submits if s[0] == "files"} == {("files", "tok-1")}  # resent with its token
    journal = [json.loads(line) for line in (Path(site.site_path) / JOURNAL_NAME).read_text().splitlines()]
    assert [record.get("token") for record in journal] == ["tok-1"]
    assert job_rows(client, id=[job_a.id])[0]["state"] == "READY"
    module.close()


def test_items_left_when_transfer_locations_are_emptied_are_polled_or_failed(site, client, tmp_path) -> None:
    """With transfer_locations emptied the cycle returned at once: pending items never got a reason
    and in-flight tasks were never polled, their jobs READY forever."""
    from balsam.api import Job

    app = transfer_app(site.site_id)
    (tmp_path / "x").write_text("x")
    Job.objects.bulk_create([Job(f"e/{i}", app, transfers={"input": f"shared:{tmp_path}/x"}) for i in range(2)])
    before = make_module(site, client, transfer_batch_size=1, max_concurrent_transfers=1)
    before.run_cycle()  # one item in flight, the other pending
    items = {i["state"]: i for i in client.get("/transfers/", params={"site_id": site.site_id})["results"]}
    assert sorted(items) == ["active", "pending"]
    flying, waiting = items["active"]["job_id"], items["pending"]["job_id"]
    after = make_module(site, client, transfer_locations={})
    after.backends["local"] = before.backend("local")  # the same process: its task is still known
    run_cycles(after, lambda: {r["state"] for r in job_rows(client, site_id=site.site_id)} == {"STAGED_IN", "FAILED"})
    rows = {r["id"]: r["state"] for r in job_rows(client, site_id=site.site_id)}
    assert rows == {flying: "STAGED_IN", waiting: "FAILED"}
    assert "unknown transfer location 'shared'" in events(client, job_id=waiting)[-1]["data"]["error"]
    before.close()


def test_a_small_copy_is_seen_done_well_before_the_next_period(site, client, tmp_path) -> None:
    """The cycle after a submission comes QUICK_POLL_SEC later, not a whole period (5 s by default):
    a small local copy, over in milliseconds, had its job wait that period on each stage-in and
    stage-out. The agent waits what run_cycle returns; so does this test."""
    import time

    from balsam.api import Job

    app = transfer_app(site.site_id)
    remote = tmp_path / "remote"
    (remote / "in").mkdir(parents=True)
    (remote / "in" / "0.txt").write_text("input 0\n")
    [job] = Job.objects.bulk_create([Job("quick/0", app, transfers={"input": f"shared:{remote}/in/0.txt"})])
    module = make_module(site, client, service_period=5)
    delay = module.run_cycle()
    assert delay is not None and delay < 1, delay  # submitted: look again soon (QUICK_POLL_SEC)
    began = time.monotonic()
    while state_counts(client, site_id=site.site_id).get("STAGED_IN", 0) < 1:
        assert delay is not None and time.monotonic() - began < 5, "waited a whole period"
        time.sleep(delay)
        delay = module.run_cycle()
    assert time.monotonic() - began < 3
    assert (Path(site.data_path) / "quick/0/input.txt").read_text() == "input 0\n"
    assert delay is None  # nothing in flight: the module's period again
    module.close()
