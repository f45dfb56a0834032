"""Helpers shared by the site-agent tests (imported by tests/site/conftest.py and the tests)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

import attrs
import pytest
from click.testing import CliRunner

from balsam.cli.site_commands import status
from balsam.models import SchedulerJobStatus
from balsam.scheduler import Command, CommandResult, Scheduler, StatusPoll, SubmitRequest
from balsam.site.module import AgentModule
from balsam.states import BatchJobState

#: Settings that make sites react within seconds in tests.
FAST_SETTINGS = {
    # Tests look for a line of a running agent's log as soon as what it reports shows in the API:
    # unbuffered (the buffering has its own tests, in tests/foundation/test_foundation_settings.py).
    "logging": {"buffer_num_records": 1},
    "scheduler": {"sync_period": 1},
    "launcher": {"idle_ttl_sec": 3, "delay_sec": 1},
    "processing": {"num_workers": 2},
    "file_cleaner": {"service_period": 1},
}


def api_client() -> Any:
    from balsam.client import load_client

    return load_client()


def wait_for(predicate: Callable[[], Any], *, timeout: float = 60.0, interval: float = 0.3, what: str = "condition",
             fail: bool = True) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            if fail:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            return value
        time.sleep(interval)


#: The BatchJob states whose scheduler job may still exist (a launcher may still run).
ACTIVE_BATCH_JOB_STATES = ["pending_submission", "queued", "running", "pending_deletion"]


def _teardown_scheduler_module(client: Any, site_config: Any) -> Any:
    """The site's scheduler module as its agent builds it, with settings.yml as it is now (a test
    may have changed it), else as the test read it; None when neither loads (a test that failed
    with the file broken: the launchers then exit on their own once idle, idle_ttl_sec)."""
    from balsam.config import SiteConfig
    from balsam.site.agent import settings_section
    from balsam.site.modules.scheduler import SchedulerModule, SchedulerSettings

    for read in (lambda: SiteConfig(site_config.site_path), lambda: site_config):
        try:
            config = read()
            section = settings_section(config.settings, "scheduler") or SchedulerSettings()
            return SchedulerModule(config, section, client)
        except Exception:
            continue
    return None


def stop_agent_and_end_batch_jobs(client: Any, site_config: Any) -> None:
    """Teardown of a test's agent daemon: stop the agent, mark the site's active BatchJobs
    ``pending_deletion`` (as ``balsam queue term`` does) and run one cycle of the site's scheduler
    module here, in this process, so that no launcher outlives the test; then record them finished.

    The module's own deletion path, not the driver's delete_job on the recorded scheduler_ids: a
    submit the agent's stop cut off (its scheduler_id never recorded, a ``.submitting`` marker
    left; or the id only in the ``.scheduler_id`` marker after a SIGKILL) may have queued a job,
    which the module finds (markers, the driver's find_submitted) and deletes. One cycle, here:
    waiting for the agent to do it takes two scheduler sync cycles and a launcher's exit, 3-5 s a
    test. Stopped first, the agent submits nothing more meanwhile."""
    from balsam.site.service_client import list_all
    from balsam.site.site_ops import stop_agent

    site_path = Path(site_config.site_path)
    stop_agent(site_path, timeout=30, force=True)
    params = {"site_id": site_config.site_id, "state": ACTIVE_BATCH_JOB_STATES}
    active = list_all(client, "/batch-jobs/", params)
    if not active:
        return
    marks = [{"id": row["id"], "state": "pending_deletion"} for row in active if row["state"] != "pending_deletion"]
    if marks:
        client.patch("/batch-jobs/", json=marks)
    module = _teardown_scheduler_module(client, site_config)
    if module is not None:
        try:
            module.run_cycle()  # deletes; its own bulk PATCH records the ids it found
        finally:
            if module._statuses is None:
                # The status poll failed (or the cycle failed before it): the cycle deleted nothing
                # recorded, so delete the recorded jobs directly (a failed delete: left the queue).
                for row in list_all(client, "/batch-jobs/", params):
                    if row.get("scheduler_id") is not None:
                        try:
                            module.scheduler.delete_job(row["scheduler_id"])
                        except Exception:
                            pass
    left = list_all(client, "/batch-jobs/", params)
    if left:
        client.patch("/batch-jobs/", json=[{"id": row["id"], "state": "finished"} for row in left])


def end_agent_daemons(client: Any, started: list) -> None:
    """The ``agent_daemon`` fixtures' teardown: :func:`stop_agent_and_end_batch_jobs` for every
    site started, each whatever became of the others (one failing left the next sites' agents
    running into the next tests), $BALSAM_SITE_PATH dropped in any case; the first error raised
    after all were tried."""
    errors: list[BaseException] = []
    try:
        for site_config in started:
            try:
                stop_agent_and_end_batch_jobs(client, site_config)
            except Exception as exc:
                errors.append(exc)
    finally:
        os.environ.pop("BALSAM_SITE_PATH", None)
    if errors:
        raise errors[0]


def job_rows(client: Any, **params: Any) -> list[dict]:
    from balsam.site.service_client import list_all

    return list_all(client, "/jobs/", params)


def state_counts(client: Any, **params: Any) -> Counter:
    return Counter(row["state"] for row in job_rows(client, **params))


def all_done(client: Any, expected: int, **params: Any) -> bool:
    counts = state_counts(client, **params)
    return counts["JOB_FINISHED"] + counts["FAILED"] >= expected


def events(client: Any, **params: Any) -> list[dict]:
    from balsam.site.service_client import list_all

    return sorted(list_all(client, "/events/", params), key=lambda e: (e["timestamp"], e["id"]))


def state_path(evts: Iterable[dict]) -> list[str]:
    return [e["to_state"] for e in sorted(evts, key=lambda e: (e["timestamp"], e["id"]))]


def batch_job(client: Any, batch_job_id: int) -> dict:
    return client.get(f"/batch-jobs/{batch_job_id}")


def create_batch_job(client: Any, site_id: int, job_mode: str = "mpi", **fields: Any) -> dict:
    body = {
        "site_id": site_id,
        "project": "local",
        "queue": "local",
        "num_nodes": 1,
        "wall_time_min": 10,
        "job_mode": job_mode,
        **fields,
    }
    return client.post("/batch-jobs/", json=body)


def finish_jobs(client: Any, site_id: int, ids: list[int]) -> None:
    """Take STAGED_IN jobs to JOB_FINISHED through the API, as the agent and a launcher would."""
    client.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in ids])
    session = client.post("/sessions/", json={"site_id": site_id})["id"]
    got = client.post(f"/sessions/{session}", json={"max_num_jobs": len(ids) + 10, "filter_tags": {}})
    got_ids = {j["id"] for j in (got if isinstance(got, list) else got["results"])}
    assert set(ids) <= got_ids, f"could not acquire {set(ids) - got_ids}"
    for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
        client.patch("/jobs/", json=[{"id": i, "state": state} for i in ids])
    client.delete(f"/sessions/{session}")


def process_until(module: Any, predicate: Callable[[], Any], what: str = "the expected states",
                  timeout: float = 90.0) -> None:
    """Run cycles of a processing module, each flushed, until ``predicate()`` holds; the timeout only
    keeps a broken test from hanging."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        module.run_cycle()
        module.flush()
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"processing did not reach {what}")


def input_stager(site_id: int) -> Any:
    """An app of the site with one required stage-in item, ``input`` (to ``input.txt``), that runs ``true``."""
    from balsam.api import ApplicationDefinition

    class InputStager(ApplicationDefinition):
        site = site_id
        command_template = "true"
        transfers = {"input": {"required": True, "direction": "in", "local_path": "input.txt"}}

    InputStager.sync()
    return InputStager


class SchedulerIdPatchFails:
    """A client whose PATCH recording a ``scheduler_id`` fails (the API goes away, or the agent dies,
    just after the scheduler accepted a job); every other call goes to ``inner``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def patch(self, path: str, *args: Any, **kwargs: Any) -> Any:
        if any("scheduler_id" in u for u in kwargs.get("json") or []):
            raise ConnectionError("API went away")
        return self.inner.patch(path, *args, **kwargs)


def start_with_pid(pid: int, argv: "list[str]", **kw) -> subprocess.Popen:
    """A new process given ``pid`` (free): root sets the last pid handed out just before forking."""
    for _ in range(100):
        with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
            fh.write(str(pid - 1))
        proc = subprocess.Popen(argv, **kw)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    pytest.skip(f"pid {pid} could not be given again (a busy machine)")


def assert_site_stop_says_it_cannot_end(site_path: Path, batch_job_id: int, why: str) -> None:
    """`balsam site stop` with ``batch_job_id`` marked pending_deletion during a scheduler outage: it
    ends the agent at once, warning that the BatchJob cannot be ended now (``why`` since ...), rather
    than waiting for its deletion."""
    balsam = str(Path(sys.executable).parent / "balsam")
    stopped = subprocess.run([balsam, "site", "stop", str(site_path)], capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert f"Warning: the site agent cannot end BatchJob(s) {batch_job_id} now ({why} since " in stopped.stderr, \
        stopped.stderr
    assert "still await deletion" not in stopped.stderr
    assert "shutdown OK" in stopped.stdout



class StatusOnceModule(AgentModule):
    """An agent module that runs ``balsam site status SITE`` once from inside the running agent,
    keeps its output in ``output`` and stops the agent (``ref[0]``)."""

    section = "status_once"

    def __init__(self, site: Path, ref: list) -> None:
        super().__init__(None, None, None)
        self.site, self.ref, self.output = site, ref, ""

    def run_cycle(self) -> float:
        self.output = CliRunner().invoke(status, [str(self.site)]).output
        self.ref[0].request_stop("test")
        return 0.01


class InMemoryScheduler(Scheduler):
    """A driver whose queue is in memory, polled through the base class's get_statuses (so the
    poll it keeps, ``last_poll``, is what the scheduler module reads, as with a real driver), with
    the start times a test sets. A submission joins the queue as queued; ``run_job`` runs one."""

    name = "in-memory"

    def __init__(self) -> None:
        super().__init__(lambda command: CommandResult(tuple(command.args), 0, "", ""), user="tester")
        self.queue: dict[int, SchedulerJobStatus] = {}
        self.starts: dict[int, Any] = {}
        self.next_id = 500

    def render_submit(self, request: SubmitRequest) -> Command:
        return Command(["sbatch"])

    def parse_submit(self, result: CommandResult) -> int:
        self.next_id += 1
        self.queue[self.next_id] = SchedulerJobStatus(
            scheduler_id=self.next_id, state=BatchJobState.queued, queue="local", num_nodes=1, wall_time_min=10,
            project="local", time_remaining_min=10, queued_time_min=0)
        return self.next_id

    def render_status(self, user: str) -> Command:
        return Command(["squeue"])

    def parse_status(self, result: CommandResult, now: dt.datetime) -> StatusPoll:
        return StatusPoll(time=now, statuses=dict(self.queue), start_times=dict(self.starts))

    def render_delete(self, scheduler_id: int) -> Command:
        return Command(["scancel"])

    def run_job(self, scheduler_id: int, start: Any = None) -> None:
        """Runs a job of the queue, or one the test never submitted (a long wall time then)."""
        queued = self.queue.get(scheduler_id) or SchedulerJobStatus(
            scheduler_id=scheduler_id, state=BatchJobState.queued, queue="local", num_nodes=1, wall_time_min=90000,
            project="local", time_remaining_min=30000, queued_time_min=0)
        self.queue[scheduler_id] = attrs.evolve(queued, state=BatchJobState.running)
        if start is not None:
            self.starts[scheduler_id] = start
