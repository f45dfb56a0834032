"""The processing agent module against a real API server.

Jobs are driven through RUNNING and RUN_DONE / RUN_ERROR / RUN_TIMEOUT exactly as a launcher does
(a Session acquires them, bulk PATCHes report the states); the module then runs the hooks.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from balsam._api import codec
from balsam.site.modules.processing import FOLLOW_UP_SEC, ProcessingModule
from site_test_utils import events, job_rows, state_path
from site_test_utils import process_until as run_until  # test_site_processing_results imports it by this name


def define_apps(site_id: int) -> dict:
    from balsam.api import ApplicationDefinition

    class Echo(ApplicationDefinition):
        site = site_id
        command_template = "echo {{ word }}"

    class Adder(ApplicationDefinition):
        site = site_id

        def run(self, x, y):
            return x + y

    class Custom(ApplicationDefinition):
        site = site_id
        command_template = "echo custom"

        def preprocess(self):
            print("preprocessing job", self.job.id)
            self.job.data = {**self.job.data, "pre": "ok"}
            self.job.state = "PREPROCESSED"

        def postprocess(self):
            print("postprocessing job", self.job.id)
            self.job.data = {**self.job.data, "post": "ok"}
            self.job.state = "POSTPROCESSED"

        def handle_error(self):
            retries = self.job.data.get("retries", 0)
            print("handling error, retries so far:", retries)
            self.job.data = {**self.job.data, "retries": retries + 1}
            self.job.state = "RESTART_READY"

        def handle_timeout(self):
            print("giving up after a timeout")
            self.job.state = "FAILED"
            self.job.state_data = {"reason": "no retries for timeouts"}

    class Broken(ApplicationDefinition):
        site = site_id
        command_template = "echo broken"

        def postprocess(self):
            raise ValueError("postprocess exploded")

    apps = {"echo": Echo, "adder": Adder, "custom": Custom, "broken": Broken}
    for cls in apps.values():
        cls.sync()
    return apps


class FakeLauncher:
    """Does what a launcher does to jobs, through the same API calls (session acquire + bulk PATCH)."""

    def __init__(self, client, site_id: int) -> None:
        self.client = client
        self.session = client.post("/sessions/", json={"site_id": site_id})["id"]

    def run(self, outcomes: dict[int, tuple[str, dict]], data_path: Path, outputs: dict[int, str]) -> None:
        acquired = self.client.post(f"/sessions/{self.session}", json={"max_num_jobs": 100, "filter_tags": {}})
        jobs = {j["id"]: j for j in (acquired if isinstance(acquired, list) else acquired["results"])}
        assert set(outcomes) <= set(jobs), f"could not acquire {set(outcomes) - set(jobs)}"
        self.client.patch("/jobs/", json=[{"id": i, "state": "RUNNING"} for i in outcomes])
        for job_id, text in outputs.items():
            workdir = data_path / jobs[job_id]["workdir"]
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "job.out").write_text(text)
        self.client.patch(
            "/jobs/", json=[{"id": i, "state": state, "state_data": data} for i, (state, data) in outcomes.items()]
        )


@pytest.fixture
def processing(make_site, client):
    site = make_site()
    module = ProcessingModule(site, site.settings.processing, client)
    yield site, module
    module.close()


def test_default_hooks_move_jobs_in_bulk(processing, client, monkeypatch) -> None:
    from balsam.api import Job
    from balsam.site.modules import processing as processing_module

    site, module = processing
    # The follow-up window outlasts any stall of a busy test machine; its end is simulated below.
    monkeypatch.setattr(processing_module, "FOLLOW_UP_WINDOW_SEC", 3600.0)
    apps = define_apps(site.site_id)
    jobs = Job.objects.bulk_create(
        [Job(f"echo/{i}", apps["echo"], parameters={"word": f"w{i}"}) for i in range(6)]
        + [Job("adder/ok", apps["adder"], parameters={"x": 2, "y": 3}),
           Job("adder/bad", apps["adder"], parameters={"x": 2, "y": "a"})]
    )
    ids = [j.id for j in jobs]
    # Jobs found at once: more may follow soon (the sleep is what is left of the follow-up delay
    # after the acquire's own time, 0 where a loaded machine made that longer: so the delay itself
    # is checked too, not only the sleep).
    assert 0.0 <= module.run_cycle() <= min(module.period, FOLLOW_UP_SEC)
    assert module._delay(time.monotonic()) == min(module.period, FOLLOW_UP_SEC)
    module.flush()
    assert {r["state"] for r in job_rows(client, id=ids)} == {"PREPROCESSED"}
    # The default preprocess made each workdir (as 0.7's did) and an empty job.out in it, so a
    # launcher need not (file system metadata operations, off the allocation).
    assert all((Path(site.data_path) / job.workdir).is_dir() for job in jobs)
    assert all((Path(site.data_path) / job.workdir / "job.out").read_bytes() == b"" for job in jobs)
    # None now: the server held the acquire (Prefer: wait) for the module's period, and that wait
    # was the cycle's sleep, whether jobs were arriving lately or not.
    assert module.run_cycle() == 0.0
    module._last_arrival -= processing_module.FOLLOW_UP_WINDOW_SEC
    assert module.run_cycle() == 0.0
    assert module.pool is None  # default hooks never start a worker process

    echo_ids, ok_id, bad_id = ids[:6], ids[6], ids[7]
    try:
        2 + "a"
    except TypeError as exc:
        error_payload = codec.serialize_exception(exc)
    outputs = {
        ok_id: f"some output\nBALSAM-RETURN-VALUE {codec.serialize(5)}\n",
        bad_id: "Traceback ...\nTypeError: unsupported operand\nBALSAM-EXCEPTION " + error_payload + "\n",
        echo_ids[3]: "\n".join(f"line {n}" for n in range(30)) + "\nfatal: disk full\n",
    }
    outcomes = {i: ("RUN_DONE", {}) for i in echo_ids[:3] + [ok_id]}
    outcomes[echo_ids[3]] = ("RUN_ERROR", {"returncode": 2})
    outcomes[echo_ids[4]] = ("RUN_TIMEOUT", {})
    outcomes[bad_id] = ("RUN_ERROR", {"returncode": 1})
    FakeLauncher(client, site.site_id).run(outcomes, Path(site.data_path), outputs)

    run_until(module, lambda: all(r["state"] not in ("RUN_DONE", "RUN_ERROR", "RUN_TIMEOUT")
                                  for r in job_rows(client, id=ids)))
    rows = {r["id"]: r for r in job_rows(client, id=ids)}
    for i in echo_ids[:3]:
        assert rows[i]["state"] == "JOB_FINISHED"
    assert rows[echo_ids[3]]["state"] == "FAILED"
    assert rows[echo_ids[4]]["state"] == "RESTART_READY"
    assert rows[echo_ids[5]]["state"] == "PREPROCESSED"  # never ran
    assert rows[ok_id]["state"] == "JOB_FINISHED"
    assert Job.objects.get(id=ok_id).result_nowait() == 5
    assert rows[bad_id]["state"] == "FAILED"
    with pytest.raises(TypeError):
        Job.objects.get(id=bad_id).result_nowait()

    failed_event = [e for e in events(client, job_id=echo_ids[3]) if e["to_state"] == "FAILED"][0]
    assert failed_event["data"]["error"].splitlines()[-1] == "fatal: disk full"
    assert len(failed_event["data"]["error"].splitlines()) == 10  # launcher.error_tail_num_lines


def test_a_cycle_waiting_for_work_takes_a_job_a_launcher_finishes_meanwhile(processing, client, monkeypatch) -> None:
    import threading

    from balsam.api import Job

    site, module = processing
    monkeypatch.setattr(ProcessingModule, "default_period", 8.0)  # the server holds the acquire up to 8 s
    apps = define_apps(site.site_id)
    (job,) = Job.objects.bulk_create([Job("waited/0", apps["echo"], parameters={"word": "w"})])
    run_until(module, lambda: job_rows(client, id=[job.id])[0]["state"] == "PREPROCESSED")
    launcher = FakeLauncher(client, site.site_id)
    returned: list = []
    cycle = threading.Thread(target=lambda: returned.append(module.run_cycle()))
    cycle.start()  # nothing to process: its acquire waits in the server
    time.sleep(0.3)  # (not needed for the outcome: a RUN_DONE sent before the acquire is taken too)
    launcher.run({job.id: ("RUN_DONE", {})}, Path(site.data_path), {job.id: "done\n"})
    cycle.join()
    module.flush()
    # That one cycle took the job (the old module would have found nothing and slept a second).
    assert job_rows(client, id=[job.id])[0]["state"] == "JOB_FINISHED"
    assert returned[0] is not None and returned[0] <= FOLLOW_UP_SEC


def test_a_workdir_the_default_preprocess_cannot_make_fails_its_job_with_the_reason(processing, client) -> None:
    from balsam.api import Job

    site, module = processing
    apps = define_apps(site.site_id)
    (Path(site.data_path) / "blocked").write_text("a file where the workdir's parent should be")
    bad, good = Job.objects.bulk_create([Job("blocked/job", apps["echo"], parameters={"word": "x"}),
                                         Job("fine/job", apps["echo"], parameters={"word": "y"})])
    run_until(module, lambda: all(r["state"] != "STAGED_IN" for r in job_rows(client, id=[bad.id, good.id])))
    rows = {r["id"]: r for r in job_rows(client, id=[bad.id, good.id])}
    assert rows[good.id]["state"] == "PREPROCESSED"
    assert (Path(site.data_path) / "fine" / "job").is_dir()
    assert rows[bad.id]["state"] == "FAILED"
    failed = [e for e in events(client, job_id=bad.id) if e["to_state"] == "FAILED"][0]
    assert failed["data"]["message"] == "An exception occurred in preprocess"
    assert "blocked" in failed["data"]["error"]


def test_user_hooks_run_in_workers_with_output_in_balsam_log(processing, client) -> None:
    from balsam.api import Job

    site, module = processing
    apps = define_apps(site.site_id)
    jobs = Job.objects.bulk_create([Job(f"custom/{i}", apps["custom"]) for i in range(4)]
                                   + [Job("broken/0", apps["broken"])])
    ids = [j.id for j in jobs]
    run_until(module, lambda: {r["state"] for r in job_rows(client, id=ids)} == {"PREPROCESSED"})
    assert module.pool is not None
    rows = {r["id"]: r for r in job_rows(client, id=ids)}
    assert all(rows[i]["data"] == {"pre": "ok"} for i in ids[:4])
    # A user's preprocess runs in a workdir that has its (empty) job.out, as the default one leaves it.
    assert all((Path(site.data_path) / f"custom/{i}" / "job.out").read_bytes() == b"" for i in range(4))

    FakeLauncher(client, site.site_id).run(
        {ids[0]: ("RUN_DONE", {}), ids[1]: ("RUN_ERROR", {"returncode": 1}), ids[2]: ("RUN_TIMEOUT", {}),
         ids[4]: ("RUN_DONE", {})},
        Path(site.data_path), {},
    )
    run_until(module, lambda: all(r["state"] not in ("RUN_DONE", "RUN_ERROR", "RUN_TIMEOUT")
                                  for r in job_rows(client, id=ids)))
    rows = {r["id"]: r for r in job_rows(client, id=ids)}
    assert rows[ids[0]]["state"] == "JOB_FINISHED" and rows[ids[0]]["data"] == {"pre": "ok", "post": "ok"}
    assert rows[ids[1]]["state"] == "RESTART_READY" and rows[ids[1]]["data"]["retries"] == 1
    assert rows[ids[2]]["state"] == "FAILED"
    timeout_failed = [e for e in events(client, job_id=ids[2]) if e["to_state"] == "FAILED"][0]
    assert timeout_failed["data"] == {"reason": "no retries for timeouts"}
    assert rows[ids[4]]["state"] == "FAILED"
    broken_failed = [e for e in events(client, job_id=ids[4]) if e["to_state"] == "FAILED"][0]
    assert broken_failed["data"]["message"] == "An exception occurred in postprocess"
    assert "ValueError: postprocess exploded" in broken_failed["data"]["error"]

    log = (Path(site.data_path) / "custom/0/balsam.log").read_text()
    assert f"#BALSAM Running preprocess for Job {ids[0]}" in log
    assert f"preprocessing job {ids[0]}" in log and f"postprocessing job {ids[0]}" in log
    assert "ValueError: postprocess exploded" in (Path(site.data_path) / "broken/0/balsam.log").read_text()
    assert state_path(events(client, job_id=ids[0]))[-3:] == ["RUN_DONE", "POSTPROCESSED", "JOB_FINISHED"]


def test_a_custom_hook_job_whose_workdir_cannot_be_made_fails_alone_in_its_chunk(processing, client) -> None:
    from balsam.api import Job

    site, module = processing
    apps = define_apps(site.site_id)
    (Path(site.data_path) / "blocked_custom").write_text("a file where the workdir's parent should be")
    # One app, so one worker chunk: the bad job sits between good ones.
    jobs = Job.objects.bulk_create([Job("custom/a", apps["custom"]), Job("blocked_custom/job", apps["custom"]),
                                    Job("custom/b", apps["custom"])])
    ids = [j.id for j in jobs]
    run_until(module, lambda: all(r["state"] != "STAGED_IN" for r in job_rows(client, id=ids)))
    rows = {r["id"]: r for r in job_rows(client, id=ids)}
    for i in (ids[0], ids[2]):
        assert rows[i]["state"] == "PREPROCESSED" and rows[i]["data"] == {"pre": "ok"}
    assert rows[ids[1]]["state"] == "FAILED"
    failed = [e for e in events(client, job_id=ids[1]) if e["to_state"] == "FAILED"][0]
    assert failed["data"]["message"] == "An exception occurred in preprocess"
    assert "cannot prepare workdir 'blocked_custom/job'" in failed["data"]["error"]


def test_close_releases_the_session(processing, client) -> None:
    from balsam.api import Job

    site, module = processing
    apps = define_apps(site.site_id)
    Job.objects.bulk_create([Job("echo/x", apps["echo"], parameters={"word": "x"})])
    module.run_cycle()
    session_id = module.session_id
    assert session_id is not None
    module.close()
    sessions = client.get("/sessions/")
    listed = sessions if isinstance(sessions, list) else sessions.get("results", [])
    assert session_id not in {s["id"] for s in listed}


def test_updates_a_launcher_spooled_are_sent_by_the_agent(processing, client) -> None:
    """A launcher stopped while the API was gone left its last updates in the site's spool/; the
    processing module sends them, and the jobs then go on (RUN_DONE -> postprocess -> JOB_FINISHED)."""
    from balsam.api import Job
    from balsam.client.status_updater import write_spool

    site, module = processing
    apps = define_apps(site.site_id)
    ids = [j.id for j in Job.objects.bulk_create([Job(f"sp/{i}", apps["echo"], parameters={"word": "x"}) for i in range(3)])]
    run_until(module, lambda: {r["state"] for r in job_rows(client, id=ids)} == {"PREPROCESSED"})
    launcher = FakeLauncher(client, site.site_id)
    client.post(f"/sessions/{launcher.session}", json={"max_num_jobs": 10, "filter_tags": {}})
    client.patch("/jobs/", json=[{"id": i, "state": "RUNNING"} for i in ids])
    write_spool(site.spool_path, [{"id": i, "state": "RUN_DONE", "return_code": 0} for i in ids])
    # The file goes once its updates are sent (seen by a later cycle, perhaps after the jobs finished).
    run_until(module, lambda: {r["state"] for r in job_rows(client, id=ids)} == {"JOB_FINISHED"}
              and not list(Path(site.spool_path).glob("*.jsonl")))


def test_jobs_of_a_failed_dispatch_are_dispatched_next_cycle(processing, client, monkeypatch) -> None:
    from balsam.api import ApplicationDefinition, Job

    site, module = processing
    site_id = site.site_id

    class Echo(ApplicationDefinition):
        site = site_id
        command_template = "echo {{ word }}"

    Echo.sync()
    ids = [j.id for j in Job.objects.bulk_create([Job(f"echo/{i}", Echo, parameters={"word": "w"}) for i in range(5)])]
    real_info, calls = module.apps.info, []

    def info_once_down(app_id):
        calls.append(app_id)
        if len(calls) == 2:  # the second job: its app's record expired and the API is away
            raise ConnectionError("API unreachable")
        return real_info(app_id)

    monkeypatch.setattr(module.apps, "info", info_once_down)
    with pytest.raises(ConnectionError):
        module.run_cycle()  # the agent logs it and backs off
    assert sorted(j["id"] for j in module.backlog) == sorted(ids)
    module.run_cycle()
    module.flush()
    assert {r["state"] for r in job_rows(client, id=ids)} == {"PREPROCESSED"}
    assert module.backlog == []


def test_a_hook_that_kills_its_worker_fails_its_job_alone(processing, client) -> None:
    """One job's postprocess ends its worker process (os._exit): the pool breaks, and every job
    of the chunk (16 per chunk) used to fail with it. Each is now run again alone: only that job
    fails, with the reason, and the others are postprocessed."""
    from balsam.api import ApplicationDefinition, Job

    site, module = processing
    site_id = site.site_id

    class Fragile(ApplicationDefinition):
        site = site_id
        command_template = "true"

        def postprocess(self):
            if self.job.data.get("kill"):
                import os

                os._exit(3)
            self.job.state = "POSTPROCESSED"

    Fragile.sync()
    jobs = Job.objects.bulk_create([Job(f"f/{i}", Fragile, data={"kill": i == 2}) for i in range(5)])
    ids = [j.id for j in jobs]
    session = client.post("/sessions/", json={"site_id": site_id})["id"]
    client.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ids])
    client.post(f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {}})
    client.patch("/jobs/", json=[{"id": i, "state": "RUNNING"} for i in ids])
    for job in jobs:
        (Path(site.data_path) / str(job.workdir)).mkdir(parents=True, exist_ok=True)
    client.patch("/jobs/", json=[{"id": i, "state": "RUN_DONE"} for i in ids])
    client.delete(f"/sessions/{session}")

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        module.run_cycle()
        module.flush()
        states = {r["id"]: r["state"] for r in job_rows(client, id=ids)}
        if all(s in ("JOB_FINISHED", "FAILED") for s in states.values()):
            break
        time.sleep(0.2)
    assert states == {i: ("FAILED" if i == ids[2] else "JOB_FINISHED") for i in ids}
    failed = [e for e in events(client, job_id=ids[2]) if e["to_state"] == "FAILED"][0]
    assert "the hook worker process died" in failed["data"]["message"]
    assert module.alone == set()


def test_a_hook_state_the_state_machine_refuses_fails_the_job_with_the_reason(processing, client) -> None:
    """The server validates state changes: a hook result it refused (an invalid state, no state at
    all, a NUL in an exception's text) was dropped, and the job stayed leased to the processing
    session, never processed again. It now fails, with the reason."""
    from balsam.api import ApplicationDefinition, Job

    site, module = processing
    site_id = site.site_id

    class Finisher(ApplicationDefinition):  # Balsam 0.7's server took any state from a hook
        site = site_id
        command_template = "true"

        def postprocess(self):
            self.job.state = "JOB_FINISHED" if self.job.data.get("as_07") else "PREPROCESSED"

    class Silent(ApplicationDefinition):  # changes data, leaves the state
        site = site_id
        command_template = "true"

        def handle_error(self):
            self.job.data = {**self.job.data, "retries": 1}

    class Lazy(ApplicationDefinition):
        site = site_id
        command_template = "true"

        def preprocess(self):
            pass

    class Nul(ApplicationDefinition):
        site = site_id
        command_template = "true"

        def postprocess(self):
            if self.job.data.get("raise"):
                raise ValueError("bad output: a\x00b")
            if self.job.data.get("complex"):
                self.job.data = {"z": 1j}  # not JSON: the status updater retried it forever
            else:
                self.job.data = {"out": "x\x00y"}
            self.job.state = "POSTPROCESSED"
            self.job.state_data = {"parsed": "a\x00"}

    for app in (Finisher, Silent, Lazy, Nul):
        app.sync()
    fin, fin07, silent, lazy, raiser, nul_data, cplx = Job.objects.bulk_create(
        [Job("fin/0", Finisher), Job("fin/07", Finisher, data={"as_07": 1}), Job("silent/0", Silent), Job("lazy/0", Lazy),
         Job("nul/raise", Nul, data={"raise": True}), Job("nul/data", Nul), Job("nul/complex", Nul, data={"complex": 1})]
    )
    ids = [fin.id, fin07.id, silent.id, lazy.id, raiser.id, nul_data.id, cplx.id]
    run_until(module, lambda: all(r["state"] != "STAGED_IN" for r in job_rows(client, id=ids)))
    assert job_rows(client, id=[lazy.id])[0]["state"] == "FAILED"
    FakeLauncher(client, site_id).run(
        {fin.id: ("RUN_DONE", {}), fin07.id: ("RUN_DONE", {}), silent.id: ("RUN_ERROR", {"returncode": 1}), raiser.id: ("RUN_DONE", {}),
         nul_data.id: ("RUN_DONE", {}), cplx.id: ("RUN_DONE", {})}, Path(site.data_path), {},
    )
    run_until(module, lambda: all(r["state"] in ("FAILED", "JOB_FINISHED") for r in job_rows(client, id=ids)))
    rows = {r["id"]: r for r in job_rows(client, id=ids)}

    def reason(job_id: int) -> dict:
        return [e for e in events(client, job_id=job_id) if e["to_state"] == "FAILED"][0]["data"]

    assert rows[fin.id]["state"] == "FAILED"
    assert reason(fin.id) == {"message": "postprocess set PREPROCESSED: it must set POSTPROCESSED, RESTART_READY or FAILED"}
    # What 0.7 apps do to end a job goes as POSTPROCESSED, and the server finishes it.
    assert rows[fin07.id]["state"] == "JOB_FINISHED"
    assert state_path(events(client, job_id=fin07.id))[-3:] == ["RUN_DONE", "POSTPROCESSED", "JOB_FINISHED"]
    assert rows[silent.id]["state"] == "FAILED" and rows[silent.id]["data"] == {"retries": 1}  # its changes are kept
    assert reason(silent.id) == {"message": "handle_error left the job RUN_ERROR: it must set RESTART_READY or FAILED"}
    assert reason(lazy.id) == {"message": "preprocess left the job STAGED_IN: it must set PREPROCESSED or FAILED"}
    assert rows[raiser.id]["state"] == "FAILED"
    assert "ValueError: bad output: a\ufffdb" in reason(raiser.id)["error"]
    assert rows[nul_data.id]["state"] == "JOB_FINISHED" and rows[nul_data.id]["data"] == {"out": "x\ufffdy"}
    post = [e for e in events(client, job_id=nul_data.id) if e["to_state"] == "POSTPROCESSED"][0]
    assert post["data"] == {"parsed": "a\ufffd"}
    assert rows[cplx.id]["state"] == "FAILED" and rows[cplx.id]["data"] == {"complex": 1}
    assert reason(cplx.id)["message"].startswith("postprocess set a value that cannot be sent to the API: TypeError")
    assert "#BALSAM postprocess set PREPROCESSED" in (Path(site.data_path) / "fin/0/balsam.log").read_text()
    assert module.updater is not None and module.updater.dropped == []


def test_hook_results_are_sent_at_stop_and_a_hung_hook_is_ended(processing, client, monkeypatch) -> None:
    """A hook still running when the agent stops: its result was thrown away (the pool's shutdown
    let it finish, nothing collected it) and the next agent ran it again. Now the results of the
    hooks that finish by HOOKS_STOP_LIMIT_SEC are sent; a hook still running then is ended, and its
    job, released with the session, is processed by the next agent."""
    from balsam.api import ApplicationDefinition, Job
    from balsam.site.modules import processing as processing_module

    site, module = processing
    site_id = site.site_id
    monkeypatch.setattr(processing_module, "HOOKS_STOP_WAIT_SEC", 0.1)
    monkeypatch.setattr(processing_module, "HOOKS_STOP_LIMIT_SEC", 4.0)

    class Slow(ApplicationDefinition):
        site = site_id
        command_template = "true"

        def postprocess(self):
            import time

            with open("runs.txt", "a") as f:
                f.write("run\n")
            time.sleep(1.5)
            self.job.data = {"post": "done"}
            self.job.state = "POSTPROCESSED"

    class Hung(ApplicationDefinition):
        site = site_id
        command_template = "true"

        def postprocess(self):
            import os
            import time

            if not os.path.exists("started"):
                with open("started", "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(120)
            self.job.state = "POSTPROCESSED"

    Slow.sync()
    Hung.sync()
    slow, hung = Job.objects.bulk_create([Job("slow/0", Slow), Job("hung/0", Hung)])
    ids = [slow.id, hung.id]
    run_until(module, lambda: {r["state"] for r in job_rows(client, id=ids)} == {"PREPROCESSED"})
    FakeLauncher(client, site_id).run({i: ("RUN_DONE", {}) for i in ids}, Path(site.data_path), {})
    run_until(module, lambda: module.in_flight() == 2)
    # Both hooks running, not only submitted: a worker not yet started under load ran neither by
    # HOOKS_STOP_LIMIT_SEC (no "started" file, no result for the slow one). The slow one still
    # sleeps: its result is sent at the stop.
    data = Path(site.data_path)
    run_until(module, lambda: (data / "hung/0/started").exists() and (data / "slow/0/runs.txt").exists(),
              "both hooks running")
    module.close()  # returns: the hung hook was ended (its job is released below)
    # Its worker is gone: it ran on after close() (the pool's shutdown had forgotten its processes),
    # alongside the next agent's run of the same hook, and the agent's exit waited for it.
    hung_pid = int((Path(site.data_path) / "hung/0/started").read_text())
    try:
        stat = Path(f"/proc/{hung_pid}/stat").read_text()
    except OSError:
        stat = ""
    if stat and stat.rsplit(")", 1)[1].split()[0] != "Z":
        os.kill(hung_pid, signal.SIGKILL)  # leave no hung hook behind
        raise AssertionError(f"the hung hook's worker {hung_pid} still runs after close()")
    rows = {r["id"]: r for r in job_rows(client, id=ids)}
    assert rows[slow.id]["state"] == "JOB_FINISHED" and rows[slow.id]["data"] == {"post": "done"}
    assert (Path(site.data_path) / "slow/0/runs.txt").read_text() == "run\n"
    assert rows[hung.id]["state"] == "RUN_DONE"

    # The next agent: the session was released, so it takes the job and runs its hook again.
    again = ProcessingModule(site, site.settings.processing, client)
    try:
        run_until(again, lambda: job_rows(client, id=[hung.id])[0]["state"] == "JOB_FINISHED")
    finally:
        again.close()
    assert (Path(site.data_path) / "slow/0/runs.txt").read_text() == "run\n"


def test_a_hook_result_for_a_job_the_user_moved_meanwhile_is_refused(processing, client) -> None:
    """The user fails a RUN_TIMEOUT job while its handle_timeout runs: the hook's RESTART_READY,
    sent under the module's session, is refused (409) instead of re-queueing a job the user gave
    up on (it was accepted: every caller's change was forced)."""
    from balsam.api import ApplicationDefinition, Job

    site, module = processing
    site_id = site.site_id

    class Waits(ApplicationDefinition):
        site = site_id
        command_template = "true"

        def handle_timeout(self):
            import os
            import time

            deadline = time.monotonic() + 30
            while not os.path.exists("go") and time.monotonic() < deadline:
                time.sleep(0.05)
            self.job.state = "RESTART_READY"

    Waits.sync()
    (job,) = Job.objects.bulk_create([Job("waits/0", Waits)])
    run_until(module, lambda: job_rows(client, id=[job.id])[0]["state"] == "PREPROCESSED")
    FakeLauncher(client, site_id).run({job.id: ("RUN_TIMEOUT", {})}, Path(site.data_path), {})
    run_until(module, lambda: module.in_flight() == 1)
    client.patch("/jobs/", json=[{"id": job.id, "state": "FAILED", "state_data": {"message": "user gives up"}}])
    (Path(site.data_path) / "waits/0/go").touch()
    run_until(module, lambda: module.in_flight() == 0 and bool(module.updater.dropped))
    row = job_rows(client, id=[job.id])[0]
    assert row["state"] == "FAILED"
    assert "no longer held by session" in str(module.updater.dropped)
    assert state_path(events(client, job_id=job.id))[-2:] == ["RUN_TIMEOUT", "FAILED"]


def test_a_hook_value_the_server_refuses_fails_the_job_with_the_servers_reason(processing, client) -> None:
    """A hook result refused for a value (num_nodes 0, a tag that is not text), not its state, was
    dropped by the status updater: the job stayed leased to the processing session, never processed
    again. It now fails with the server's reason; a job next to it in the same call is unaffected."""
    from balsam.api import ApplicationDefinition, Job

    site, module = processing
    site_id = site.site_id

    class Resizer(ApplicationDefinition):
        site = site_id
        command_template = "true"

        def preprocess(self):
            kind = self.job.data.get("kind")
            if kind == "nodes":
                self.job.num_nodes = 0
            elif kind == "tag":
                self.job.tags = {**self.job.tags, "n": "x" * 5000}  # tag values are at most 1,024 characters
            self.job.state = "PREPROCESSED"

    Resizer.sync()
    zero, tag, fine = Job.objects.bulk_create(
        [Job("rs/zero", Resizer, data={"kind": "nodes"}), Job("rs/tag", Resizer, data={"kind": "tag"}),
         Job("rs/fine", Resizer, data={"kind": "none"})]
    )
    ids = [zero.id, tag.id, fine.id]
    run_until(module, lambda: all(r["state"] != "STAGED_IN" for r in job_rows(client, id=ids)))
    rows = {r["id"]: r for r in job_rows(client, id=ids)}
    assert rows[fine.id]["state"] == "PREPROCESSED"
    for job_id in (zero.id, tag.id):
        assert rows[job_id]["state"] == "FAILED" and rows[job_id]["num_nodes"] == 1
        failed = [e for e in events(client, job_id=job_id) if e["to_state"] == "FAILED"]
        assert len(failed) == 1 and failed[0]["data"]["message"].startswith("the server refused the hook's result: ")
    def reason(job_id: int) -> str:
        return [e for e in events(client, job_id=job_id) if e["to_state"] == "FAILED"][0]["data"]["message"]

    assert reason(zero.id) == "the server refused the hook's result: num_nodes: must be >= 1, got 0"
    assert reason(tag.id).startswith("the server refused the hook's result: tags.n: ")
    # The refused results are still accounted as dropped (and logged); their replacements went through.
    assert sorted(u["id"] for u, _ in module.updater.dropped) == sorted([zero.id, tag.id])


def test_the_stop_warning_counts_every_dropped_update_not_only_those_kept(processing, caplog) -> None:
    """The status updater keeps only the most recent dropped updates (MAX_DROPPED_KEPT) and counts
    them all in ``dropped_count``: the warning at the stop said 1,000 where 2,500 were dropped."""
    import logging

    from balsam.client.status_updater import MAX_DROPPED_KEPT

    class Dropped:
        dropped_count = 2500
        dropped = [({"id": i, "state": "POSTPROCESSED"}, "refused") for i in range(2500 - MAX_DROPPED_KEPT, 2500)]

        def close(self) -> None:
            pass

    _site, module = processing
    module.updater = Dropped()  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, logger=module.logger.name):
        module.close()
    (warning,) = [r.getMessage() for r in caplog.records if "were not applied" in r.getMessage()]
    assert warning.startswith("2500 job updates were not applied"), warning
    assert "'id': 2499" in warning and "'id': 1500," not in warning  # the most recent ones are shown
