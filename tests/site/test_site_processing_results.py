"""What the processing module leaves on a job across runs and worker deaths, against a real API
server: a ``run()`` app's result after a re-run, a ``run()`` that ends with ``sys.exit``, and the
hooks that completed in a chunk whose worker died (or was ended at the agent's stop)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from balsam._api import codec
from balsam._api.app import python_runner_command
from balsam.site.modules.processing import ProcessingModule
from site_test_utils import job_rows
from test_site_processing import FakeLauncher, run_until


@pytest.fixture
def processing(make_site, client):
    site = make_site()
    module = ProcessingModule(site, site.settings.processing, client)
    yield site, module
    module.close()


def _exception_marker(message: str) -> str:
    try:
        raise ValueError(message)
    except ValueError as exc:
        return f"BALSAM-EXCEPTION {codec.serialize_exception(exc)}\n"


def _run_app(site_id: int, hook: str):
    """A ``run()`` app keeping every default hook (``hook="none"``) or overriding one: the
    default path (bulk, in the agent) and the worker path both give the markers' fields."""
    from balsam.api import ApplicationDefinition

    class AdderDefaults(ApplicationDefinition):
        site = site_id

        def run(self, x, y):
            return x + y

    class AdderHandlesErrors(AdderDefaults):
        def handle_error(self):
            self.job.state = "RESTART_READY"

    class AdderPostprocesses(AdderDefaults):
        def postprocess(self):
            self.job.state = "POSTPROCESSED"

    app = {"none": AdderDefaults, "handle_error": AdderHandlesErrors, "postprocess": AdderPostprocesses}[hook]
    app.sync()
    return app


@pytest.mark.parametrize("hook", ["none", "handle_error", "postprocess"])
def test_a_run_app_that_failed_and_then_succeeded_reports_its_value(processing, client, hook) -> None:
    """A re-run's result replaces the previous run's: each run sets both fields, "" for the one its
    job.out lacks. The exception of the failed first run used to stay on the job, and result()
    (which looks at the exception first) raised it after the successful re-run. A re-run that
    prints no marker at all (killed first, a sys.exit) leaves no result either."""
    from balsam.api import Job

    site, module = processing
    app = _run_app(site.site_id, hook)
    (job,) = Job.objects.bulk_create([Job("adder/0", app, parameters={"x": 2, "y": 3})])
    data_path = Path(site.data_path)
    run_until(module, lambda: job_rows(client, id=[job.id])[0]["state"] == "PREPROCESSED")

    FakeLauncher(client, site.site_id).run({job.id: ("RUN_ERROR", {"returncode": 1})}, data_path,
                                           {job.id: "starting\n" + _exception_marker("first run failed")})
    after_error = "RESTART_READY" if hook == "handle_error" else "FAILED"
    run_until(module, lambda: job_rows(client, id=[job.id])[0]["state"] == after_error)
    with pytest.raises(ValueError, match="first run failed"):
        Job.objects.get(id=job.id).result_nowait()
    if after_error == "FAILED":
        client.patch("/jobs/", json=[{"id": job.id, "state": "RESTART_READY"}])  # the documented re-run

    FakeLauncher(client, site.site_id).run({job.id: ("RUN_DONE", {})}, data_path,
                                           {job.id: f"BALSAM-RETURN-VALUE {codec.serialize(5)}\n"})
    run_until(module, lambda: job_rows(client, id=[job.id])[0]["state"] == "JOB_FINISHED")
    finished = Job.objects.get(id=job.id)
    assert finished.serialized_exception == ""
    assert finished.result_nowait() == 5

    # Once more, a run that printed no marker (it ended by sys.exit(0)): no result, not the last one's.
    client.patch("/jobs/", json=[{"id": job.id, "state": "RESTART_READY"}])
    FakeLauncher(client, site.site_id).run({job.id: ("RUN_DONE", {})}, data_path, {job.id: "no marker\n"})
    run_until(module, lambda: job_rows(client, id=[job.id])[0]["state"] == "JOB_FINISHED"
              and job_rows(client, id=[job.id])[0]["serialized_return_value"] == "")
    with pytest.raises(Job.NoResult):
        Job.objects.get(id=job.id).result_nowait()


@pytest.mark.parametrize("code, state", [(0, "JOB_FINISHED"), (3, "FAILED")])
def test_a_run_that_calls_sys_exit_leaves_no_result_and_result_raises_no_result(processing, client, code, state) -> None:
    """A ``run()`` ported from a script ends with ``sys.exit(code)``. The runner serialized the
    SystemExit as the job's exception, and ``job.result()`` raised it in the user's driver, past its
    ``except Exception``, ending it. As in Balsam 0.7 only an Exception is a run's result: the exit
    code says how it ended (0: RUN_DONE, else RUN_ERROR), and result() raises Job.NoResult."""
    from balsam.api import ApplicationDefinition, Job

    site, module = processing
    site_id = site.site_id

    class Porter(ApplicationDefinition):
        site = site_id

        def run(self, n, code):
            import sys

            print("computed", n * 2)
            sys.exit(code)

    Porter.sync()
    (job,) = Job.objects.bulk_create([Job("porter/0", Porter, parameters={"n": 21, "code": code})])
    run_until(module, lambda: job_rows(client, id=[job.id])[0]["state"] == "PREPROCESSED")
    # The real runner, with the command line a launcher builds for the job.
    command = python_runner_command(ApplicationDefinition.load_by_id(Porter.__app_id__), Job.objects.get(id=job.id))
    ran = subprocess.run(["/bin/bash", "-c", command], capture_output=True, text=True)
    assert ran.returncode == code and "computed 42" in ran.stdout, ran.stderr
    outcome = ("RUN_DONE", {}) if code == 0 else ("RUN_ERROR", {"returncode": code})
    FakeLauncher(client, site_id).run({job.id: outcome}, Path(site.data_path), {job.id: ran.stdout + ran.stderr})
    run_until(module, lambda: job_rows(client, id=[job.id])[0]["state"] == state)
    with pytest.raises(Job.NoResult):
        Job.objects.get(id=job.id).result_nowait()


def _fragile_app(site_id: int):
    """Postprocess appends the job's workdir name to ``../order.txt`` (a side effect to count),
    then ends its worker (``data["kill"]``) or hangs the first time (``data["hang"]``)."""
    from balsam.api import ApplicationDefinition

    class Fragile(ApplicationDefinition):
        site = site_id
        command_template = "true"

        def postprocess(self):
            import os
            import time

            with open("../order.txt", "a") as log:
                log.write(os.path.basename(os.getcwd()) + "\n")
            if self.job.data.get("kill"):
                os._exit(3)
            if self.job.data.get("hang") and not os.path.exists("hung-once"):
                open("hung-once", "w").close()
                time.sleep(120)
            self.job.state = "POSTPROCESSED"

    Fragile.sync()
    return Fragile


def _all_run_done(client, site_id: int, ids: list[int]) -> None:
    """Jobs RUN_DONE together, so that the module takes them in one cycle: one worker chunk."""
    session = client.post("/sessions/", json={"site_id": site_id})["id"]
    client.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ids])
    client.post(f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {}})
    client.patch("/jobs/", json=[{"id": i, "state": "RUNNING"} for i in ids])
    client.patch("/jobs/", json=[{"id": i, "state": "RUN_DONE"} for i in ids])
    client.delete(f"/sessions/{session}")


def test_hooks_that_completed_before_their_worker_died_are_not_run_again(processing, client) -> None:
    """Job 3's postprocess ends its worker (os._exit) after jobs 1 and 2 of its chunk completed:
    their hooks' side effects happened (a job created, a file written), but the chunk's return
    value died with the worker, and all three were run again. The worker now records each job's
    result as its hook completes: jobs 1 and 2 keep theirs, only job 3 runs again (alone), and
    fails with the reason."""
    from balsam.api import Job

    site, module = processing
    app = _fragile_app(site.site_id)
    jobs = Job.objects.bulk_create([Job(f"f/{i}", app, data={"kill": i == 3}) for i in (1, 2, 3)])
    ids = [j.id for j in jobs]
    for i in (1, 2, 3):
        (Path(site.data_path) / f"f/{i}").mkdir(parents=True)
    _all_run_done(client, site.site_id, ids)

    deadline = time.monotonic() + 90  # only keeps a broken test from hanging
    states: dict = {}
    while time.monotonic() < deadline:
        module.run_cycle()
        module.flush()
        states = {r["id"]: r["state"] for r in job_rows(client, id=ids)}
        if all(s in ("JOB_FINISHED", "FAILED") for s in states.values()):
            break
        time.sleep(0.2)
    assert states == {ids[0]: "JOB_FINISHED", ids[1]: "JOB_FINISHED", ids[2]: "FAILED"}
    # In the chunk (ids order), then job 3 alone: it is the only one run twice.
    assert (Path(site.data_path) / "f/order.txt").read_text().split() == ["1", "2", "3", "3"]
    assert module.alone == set()
    assert list(module._results_dir.iterdir()) == []  # each task's results file is removed with it


def test_hooks_that_completed_before_a_hung_one_keep_their_results_at_stop(processing, client, monkeypatch) -> None:
    """At the agent's stop, a hook still running by HOOKS_STOP_LIMIT_SEC is ended with its worker.
    The hooks of its chunk that had completed before it lost their results with it, and the next
    agent ran them again. Their results are now sent; only the hung job is released and runs again."""
    from balsam.api import Job
    from balsam.site.modules import processing as processing_module

    site, module = processing
    monkeypatch.setattr(processing_module, "HOOKS_STOP_WAIT_SEC", 0.1)
    monkeypatch.setattr(processing_module, "HOOKS_STOP_LIMIT_SEC", 1.0)
    app = _fragile_app(site.site_id)
    jobs = Job.objects.bulk_create([Job(f"h/{i}", app, data={"hang": i == 3}) for i in (1, 2, 3)])
    ids = [j.id for j in jobs]
    for i in (1, 2, 3):
        (Path(site.data_path) / f"h/{i}").mkdir(parents=True)
    _all_run_done(client, site.site_id, ids)
    # Job 3 hangs once jobs 1 and 2 have completed (its chunk runs them in order).
    run_until(module, lambda: (Path(site.data_path) / "h/3/hung-once").exists())
    module.close()
    rows = {r["id"]: r["state"] for r in job_rows(client, id=ids)}
    assert rows == {ids[0]: "JOB_FINISHED", ids[1]: "JOB_FINISHED", ids[2]: "RUN_DONE"}

    again = ProcessingModule(site, site.settings.processing, client)  # the next agent
    try:
        run_until(again, lambda: job_rows(client, id=[ids[2]])[0]["state"] == "JOB_FINISHED")
    finally:
        again.close()
    assert (Path(site.data_path) / "h/order.txt").read_text().split() == ["1", "2", "3", "3"]


def test_a_neighbour_chunk_still_running_when_the_pool_breaks_keeps_exactly_its_completed_hooks(processing) -> None:
    """A broken pool fails every chunk's future before it ends the workers: a neighbour chunk whose
    hooks ignore SIGTERM went on running hooks after its results file was read, and those jobs were
    run again alone (their hooks twice). The workers are now killed before the file is read: every
    hook that ran has its result, and only the others run again."""
    import types

    from balsam._api.app import _serialize_class
    from balsam.api import ApplicationDefinition

    class SigtermProof(ApplicationDefinition):
        site = 1
        command_template = "true"

        def postprocess(self):
            import os
            import signal
            import time

            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # e.g. a library the hook uses handles SIGTERM
            if self.job.data.get("kill"):
                time.sleep(0.3)
                os._exit(3)
            time.sleep(0.25)
            with open("../side.txt", "a") as log:
                log.write(os.path.basename(os.getcwd()) + "\n")
            self.job.state = "POSTPROCESSED"

    site, module = processing
    record = {"id": 1, "site_id": 1, "name": "SigtermProof", "serialized_class": _serialize_class(SigtermProof),
              "parameters": {}}
    info = types.SimpleNamespace(record=record, python_app=False)
    data = Path(site.data_path)

    def job(i: int, **values) -> dict:
        (data / f"w/{i}").mkdir(parents=True, exist_ok=True)
        return {"id": i, "workdir": f"w/{i}", "state": "RUN_DONE", "app_id": 1, "data": values, "tags": {},
                "parameters": {}, "serialized_parameters": "", "serialized_return_value": "", "serialized_exception": ""}

    module._submit(info, [job(1, kill=True)])
    module._submit(info, [job(i) for i in range(2, 8)])
    workers = list(module.pool._processes.values())
    updates: list[dict] = []
    deadline = time.monotonic() + 60  # only keeps a broken test from hanging
    while module.pending and time.monotonic() < deadline:
        updates += module._harvest()
        time.sleep(0.05)
    for worker in workers:  # whatever a worker still ran after the harvest is in side.txt then
        worker.join(60)
    ran = (data / "w/side.txt").read_text().split() if (data / "w/side.txt").exists() else []
    kept = sorted(u["id"] for u in updates if u["state"] == "POSTPROCESSED")
    again = sorted(j["id"] for j in module.backlog)
    assert kept == sorted(int(i) for i in ran), (kept, ran)
    assert again == sorted({1, *range(2, 8)} - set(kept)), (again, kept)
