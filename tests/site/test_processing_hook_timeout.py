"""Hung hooks in the processing module, against a real API server.

A hook that never returns used to hold every other job of its worker chunk (``WORKER_CHUNK``) with
no timeout and no log line, and at the agent's stop it was not ended at all (the pool's shutdown
had forgotten its processes): it ran on after ``close()``, its job ran again under the next agent
(two runs of the hook at once), and the interpreter hung at exit joining it. Now the hooks that
completed are sent each cycle, a hook running longer than ``processing.hook_timeout_sec`` fails its
job (its worker is killed; the jobs of its chunk not yet run run again, each alone), and
``close()`` ends the workers of the hooks still running. The hook timeout is driven by an injected
clock (``module.clock``): no test here waits for it.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest

from balsam.site.modules.processing import ProcessingModule, ProcessingSettings
from site_test_utils import job_rows, process_until

TIMEOUT = 100.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie does not count: it runs no hook any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _hanging_app(site_id: int):
    """Each hook appends its workdir name to ``../ran.txt``; the job with ``data["hang"]`` writes
    its pid to ``pid`` and sleeps for an hour."""
    from balsam.api import ApplicationDefinition

    class Hangs(ApplicationDefinition):
        site = site_id
        command_template = "true"

        def _hook(self, state):
            import os
            import time

            with open("../ran.txt", "a") as log:
                log.write(os.path.basename(os.getcwd()) + "\n")
            if self.job.data.get("hang"):
                with open("pid", "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(3600)
            self.job.state = state

        def preprocess(self):
            self._hook("PREPROCESSED")

        def handle_error(self):
            self._hook("RESTART_READY")

        def handle_timeout(self):
            self._hook("RESTART_READY")

    Hangs.sync()
    return Hangs


@pytest.fixture
def timed(make_site, client, monkeypatch):
    """A processing module with one hook worker, ``hook_timeout_sec`` = TIMEOUT and a fake clock."""
    from balsam.site.modules import processing as processing_module

    monkeypatch.setattr(processing_module, "HOOKS_STOP_WAIT_SEC", 0.1)
    monkeypatch.setattr(processing_module, "HOOKS_STOP_LIMIT_SEC", 0.5)
    site = make_site()
    config = attrs.evolve(site.settings.processing, num_workers=1, hook_timeout_sec=TIMEOUT)
    module = ProcessingModule(site, config, client)
    clock = FakeClock()
    module.clock = clock
    pids: list[int] = []
    yield site, module, clock, pids
    module.close()
    for pid in pids:  # a failed test leaves no hung hook behind
        _kill(pid)


def _pid(path: Path, pids: list[int]) -> int:
    pid = int(path.read_text())
    pids.append(pid)
    return pid


@pytest.mark.parametrize("hung", [0, 3], ids=["hung-first", "hung-last"])
def test_a_hung_preprocess_times_out_and_the_rest_of_its_chunk_is_processed(timed, client, caplog, hung) -> None:
    """Four jobs in one chunk, one of whose preprocess hangs. The hooks that completed before it
    are sent while it hangs (they waited for the whole chunk); at half the timeout one WARNING names
    the job; at the timeout the job is FAILED with the reason, its worker is killed, and the jobs of
    the chunk not yet run run again (each alone). Every other hook ran exactly once."""
    from balsam.api import Job

    site, module, clock, pids = timed
    app = _hanging_app(site.site_id)
    jobs = Job.objects.bulk_create([Job(f"t/{i}", app, data={"hang": i == hung}) for i in range(4)])
    ids = [j.id for j in jobs]
    hung_id = ids[hung]
    data = Path(site.data_path)

    def states() -> dict[int, str]:
        return {r["id"]: r["state"] for r in job_rows(client, id=ids)}

    # The hung hook has started (and the module saw it start); the jobs before it in the chunk are sent.
    process_until(module, lambda: hung_id in module.hooks_running() and all(
        states()[i] == "PREPROCESSED" for i in ids[:hung]), "the hooks before the hung one sent")
    pid = _pid(data / f"t/{hung}/pid", pids)
    assert states()[hung_id] == "STAGED_IN"

    caplog.set_level(logging.WARNING, logger="balsam.site.modules.processing")
    clock.now += TIMEOUT * 0.6
    module.run_cycle()
    module.run_cycle()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "hook_timeout_sec" in r.getMessage()]
    assert len(warnings) == 1 and f"job {hung_id}:" in warnings[0] and "preprocess" in warnings[0], warnings
    assert _alive(pid) and states()[hung_id] == "STAGED_IN"

    clock.now += TIMEOUT * 0.5
    process_until(module, lambda: set(states().values()) == {"PREPROCESSED", "FAILED"} and not module.pending,
                 "the hung job FAILED and the others PREPROCESSED")
    rows = {r["id"]: r for r in job_rows(client, id=ids)}
    assert {i: r["state"] for i, r in rows.items()} == {i: "FAILED" if i == hung_id else "PREPROCESSED" for i in ids}
    from site_test_utils import events

    failed = [e for e in events(client, job_id=hung_id) if e["to_state"] == "FAILED"][0]
    assert failed["data"] == {"message": f"preprocess hook timed out after {TIMEOUT:g} s"}
    assert not _alive(pid)
    # Each hook ran once (the hung one too: it is not run again), in chunk order.
    assert sorted((data / "t/ran.txt").read_text().split()) == [str(i) for i in range(4)]
    assert module.alone == set() and module.timed_out == {}


@pytest.mark.parametrize("state,hook", [("RUN_ERROR", "handle_error"), ("RUN_TIMEOUT", "handle_timeout")])
def test_a_hung_handle_error_or_handle_timeout_times_out_alike(timed, client, state, hook) -> None:
    """Balsam 0.7's handle_error and handle_timeout hooks run in the same workers: the same timeout."""
    from balsam.api import Job

    site, module, clock, pids = timed
    app = _hanging_app(site.site_id)
    jobs = Job.objects.bulk_create([Job(f"e/{i}", app, data={"hang": i == 0}) for i in range(2)])
    ids = [j.id for j in jobs]
    for i in range(2):
        (Path(site.data_path) / f"e/{i}").mkdir(parents=True)
    session = client.post("/sessions/", json={"site_id": site.site_id})["id"]
    client.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ids])
    client.post(f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {}})
    client.patch("/jobs/", json=[{"id": i, "state": "RUNNING"} for i in ids])
    client.patch("/jobs/", json=[{"id": i, "state": state} for i in ids])
    client.delete(f"/sessions/{session}")

    process_until(module, lambda: ids[0] in module.hooks_running(), f"the hung {hook} running")
    pid = _pid(Path(site.data_path) / "e/0/pid", pids)
    clock.now += TIMEOUT + 1
    process_until(module, lambda: not module.pending and {r["state"] for r in job_rows(client, id=ids)} == {
        "FAILED", "RESTART_READY"}, "the hung job FAILED")
    from site_test_utils import events

    failed = [e for e in events(client, job_id=ids[0]) if e["to_state"] == "FAILED"][0]
    assert failed["data"] == {"message": f"{hook} hook timed out after {TIMEOUT:g} s"}
    assert job_rows(client, id=[ids[1]])[0]["state"] == "RESTART_READY"
    assert not _alive(pid)


def test_a_results_line_still_being_written_is_read_once_whole(timed) -> None:
    """The module reads the results file of a chunk still running, while its worker may be
    appending a line: a line without its newline yet is left for the next read, never parsed
    half, never skipped."""
    site, module, clock, pids = timed
    jobs = [{"id": i, "state": "STAGED_IN", "workdir": f"w/{i}"} for i in (1, 2)]
    path = Path(site.site_path) / "partial.jsonl"
    future: cf.Future = cf.Future()  # a task still running
    module._track(future, jobs, path, pool=None)
    first = json.dumps({"id": 1, "state": "PREPROCESSED"}) + "\n"
    second = json.dumps({"id": 2, "state": "PREPROCESSED", "data": {"x": "y" * 100}}) + "\n"
    path.write_text(json.dumps({"start": 1, "pid": 1}) + "\n" + first + json.dumps({"start": 2, "pid": 1}) + "\n"
                    + second[:40])
    assert [u["id"] for u in module._harvest()] == [1]
    assert module.hooks_running() == {2: 0.0} and module.in_flight() == 1
    assert module._harvest() == []
    with open(path, "a") as f:
        f.write(second[40:])
    assert module._harvest() == [json.loads(second)]
    assert module.hooks_running() == {} and module.in_flight() == 0
    future.set_result([json.loads(first), json.loads(second)])  # the task's return value: nothing twice
    assert module._harvest() == [] and module.pending == {}


def test_hook_timeout_sec_is_validated_and_read_from_settings_yml() -> None:
    from balsam.config import loads_settings

    assert ProcessingSettings().hook_timeout_sec == 3600
    assert ProcessingSettings(hook_timeout_sec=0).validate() == {"hook_timeout_sec": "must be more than 0"}
    assert loads_settings("processing: {hook_timeout_sec: 90}\n").processing.hook_timeout_sec == 90


CLOSER = """
import os, sys, time, types
from pathlib import Path

from balsam._api.app import _serialize_class
from balsam.api import ApplicationDefinition
from balsam.site.modules import processing as pm


class Hangs(ApplicationDefinition):
    site = 1
    command_template = "true"

    def postprocess(self):
        import os, time
        with open("pid.tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename("pid.tmp", "pid")
        time.sleep(3600)


def main():
    root = Path(sys.argv[1])
    settings = types.SimpleNamespace(launcher=types.SimpleNamespace(error_tail_num_lines=10))
    site = types.SimpleNamespace(site_path=root, data_path=root / "data", spool_path=root / "spool", settings=settings)
    pm.HOOKS_STOP_WAIT_SEC, pm.HOOKS_STOP_LIMIT_SEC = 0.1, 0.5
    module = pm.ProcessingModule(site, pm.ProcessingSettings(), None)
    record = {"id": 1, "site_id": 1, "name": "Hangs", "serialized_class": _serialize_class(Hangs), "parameters": {}}
    (root / "data/w/1").mkdir(parents=True)
    job = {"id": 1, "workdir": "w/1", "state": "RUN_DONE", "app_id": 1, "data": {}, "tags": {}, "parameters": {},
           "serialized_parameters": "", "serialized_return_value": "", "serialized_exception": ""}
    module._submit(types.SimpleNamespace(record=record, python_app=False), [job])
    deadline = time.monotonic() + 60  # only keeps a broken test from hanging
    while not (root / "data/w/1/pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    module.close()
    print("closed", flush=True)


if __name__ == "__main__":  # the hook workers (forkserver) import this file as their __main__
    main()
"""


def test_an_agent_process_whose_hook_hangs_exits_after_close(tmp_path) -> None:
    """``balsam site stop`` hung: close() left the hung hook's worker running (the pool's shutdown
    had forgotten its processes), and the interpreter's exit joined it for the hook's hour."""
    script = tmp_path / "closer.py"
    script.write_text(textwrap.dedent(CLOSER))
    pid_file = tmp_path / "data/w/1/pid"
    try:
        proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                              timeout=120)  # only keeps a broken test from hanging
        assert proc.returncode == 0 and "closed" in proc.stdout, proc.stderr
        assert not _alive(int(pid_file.read_text()))
    finally:
        if pid_file.exists():
            _kill(int(pid_file.read_text()))


def test_a_chunk_is_one_run_hooks_call_that_announces_each_hook_and_loads_its_app_once(tmp_path, monkeypatch) -> None:
    """The worker's entry (run_hooks, the results file's one writer) writes each job's start line
    before its hook and its update after, in chunk order; an app class that fails to load is
    loaded once for the chunk (deserializing runs the class's module code), not once per job, and
    every job of the chunk fails with the reason."""
    from balsam.site import apps, hooks_runner

    loads: list[int] = []

    def broken(record):
        loads.append(record["id"])
        raise ImportError("No module named 'gone'")

    monkeypatch.setattr(apps, "load_app_class", broken)
    jobs = [{"id": i, "state": "STAGED_IN", "workdir": f"w/{i}"} for i in (7, 8, 9)]
    path = tmp_path / "results.jsonl"
    record = {"id": 424242, "serialized_class": "not a class"}
    updates = hooks_runner.run_hooks(record, jobs, False, str(tmp_path / "data"), 10, str(path))
    assert loads == [424242]
    assert [u["id"] for u in updates] == [7, 8, 9]
    assert {u["state"] for u in updates} == {"FAILED"}
    assert {u["state_data"]["error"] for u in updates} == {"No module named 'gone'"}
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0::2] == [{"start": i, "pid": os.getpid()} for i in (7, 8, 9)]
    assert lines[1::2] == updates
    assert hooks_runner.read_results(path, jobs) == {u["id"]: u for u in updates}
    assert not (tmp_path / "data").exists()  # no workdir made for a job whose app cannot load
