"""`balsam site stop`'s wait for the BatchJobs `balsam queue term` marked (review of 7422d9d).

- A server that accepts and never answers held every stop for its read timeout (120 s), also with
  nothing marked: each read now has a deadline of a few seconds, and a first read that fails skips
  the wait.
- `-t` was spent twice (the wait, then the agent's stop) and `--force` killed only after both: `-t`
  is now the whole command's, the wait taking at most half of it.
- The wait lasted the whole timeout when the agent could not end the BatchJobs (its status poll
  failing, a delete failing, the scheduler module off): it now ends as the agent records why, and
  is capped at two scheduler sync periods + 5 s (one with --force) without -t.
- Ctrl-C during the wait aborted the whole command, the agent left running: it now ends the wait.
- The wait's line named every id (300 marked: 1,869 characters, redrawn each second).

The clock of site_commands is a fake one (its sleeps advance it), so waits are counted, not timed."""

from __future__ import annotations

import datetime as dt
import socket
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import balsam.cli.site_commands as site_commands
from balsam.client.rest import RESTClient

SITE_ID = 3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.interrupt_at_sleep: int | None = None
        self.sleeps = 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        if self.sleeps == self.interrupt_at_sleep:
            raise KeyboardInterrupt
        self.now += seconds


class Marked:
    """The site's BatchJobs marked pending_deletion as the server lists them: ``rows(read)`` gives
    those of the n-th read (1 first); the deadlines of the reads are kept."""

    def __init__(self, clock: Clock, rows, count=None) -> None:
        self.clock, self.rows, self.count = clock, rows, count
        self.reads: list[tuple[float, float]] = []  # (when, deadline)
        self.retry_count = 10

    def get(self, path, params=None, deadline=None):
        assert path == "/batch-jobs/" and params["state"] == "pending_deletion" and params["site_id"] == SITE_ID
        self.reads.append((self.clock.now, deadline))
        rows = self.rows(len(self.reads))
        count = len(rows) if self.count is None or not rows else self.count
        return {"count": count, "results": rows[: params.get("limit") or len(rows)]}


def _row(batch_job_id: int, **info) -> dict:
    return {"id": batch_job_id, "state": "pending_deletion", "scheduler_id": 100 + batch_job_id, "status_info": info}


@pytest.fixture
def stop(monkeypatch, tmp_path):
    """Run `balsam site stop ARGS` on a site whose agent runs and stops when signalled; returns
    (result, [(time stop_agent was called, its timeout)])."""
    import balsam.site.agent
    import balsam.site.site_ops

    clock = Clock()
    stops: list[tuple[float, float]] = []

    def stop_agent(path, *, timeout, force, progress=None, echo=None):
        stops.append((clock.now, timeout))
        if force and progress is not None:  # a hung agent: killed at the timeout
            clock.now += timeout + 0.1
            progress(timeout + 0.1, timeout)
        return 4242

    def run(client, *args: str, scheduler=SimpleNamespace(sync_period=10)):
        settings = SimpleNamespace(sections={"scheduler": scheduler})
        monkeypatch.setattr(site_commands, "time", SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
        monkeypatch.setattr(site_commands, "_site_path", lambda path: tmp_path)
        monkeypatch.setattr(site_commands, "_site_config", lambda path: SimpleNamespace(site_id=SITE_ID,
                                                                                        settings=settings))
        monkeypatch.setattr(site_commands, "_client", lambda: client)
        monkeypatch.setattr(balsam.site.agent, "agent_running", lambda path: (socket.gethostname(), 4242))
        monkeypatch.setattr(balsam.site.site_ops, "stop_agent", stop_agent)
        result = CliRunner().invoke(site_commands.stop, [str(tmp_path), *args])
        return result, stops

    run.clock = clock
    return run


def test_every_read_has_a_deadline_of_a_few_seconds(stop):
    client = Marked(stop.clock, lambda read: [_row(24)] if read <= 3 else [])
    result, stops = stop(client)
    assert result.exit_code == 0, result.output
    assert len(client.reads) == 4 and all(deadline - when <= 3.0 for when, deadline in client.reads), client.reads


def test_a_server_that_accepts_and_never_answers_does_not_hold_the_stop(stop, monkeypatch):
    monkeypatch.setattr(site_commands, "time", __import__("time"))  # the real clock: the client's deadline is real
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # connections complete in the backlog; nothing ever answers
    try:
        client = RESTClient(f"http://127.0.0.1:{listener.getsockname()[1]}", token="t", allow_insecure_http=True)
        import balsam.site.agent
        import balsam.site.site_ops

        stopped = []
        monkeypatch.setattr(site_commands, "_site_path", lambda path: path)
        monkeypatch.setattr(site_commands, "_site_config", lambda path: SimpleNamespace(site_id=SITE_ID,
                                                                                        settings=None))
        monkeypatch.setattr(site_commands, "_client", lambda: client)
        monkeypatch.setattr(balsam.site.agent, "agent_running", lambda path: (socket.gethostname(), 4242))
        monkeypatch.setattr(balsam.site.site_ops, "stop_agent", lambda path, **kw: stopped.append(kw) or 4242)
        result = CliRunner().invoke(site_commands.stop, ["/nowhere"])
    finally:
        listener.close()
    assert result.exit_code == 0, result.output
    assert "Warning: cannot read the site's BatchJobs (" in result.stderr, result.stderr
    assert "not waiting for those `balsam queue term` marked" in result.stderr
    assert len(stopped) == 1 and "Site agent [pid 4242] shutdown OK" in result.stdout


def test_t_is_the_whole_commands_and_force_kills_at_it(stop):
    client = Marked(stop.clock, lambda read: [_row(24)])  # never ended
    result, stops = stop(client, "-t", "8", "--force")
    assert result.exit_code == 0, result.output
    (called, timeout), = stops
    assert called - 1000.0 == 4.0 and timeout == 4.0  # half of -t waiting, the rest for the stop
    assert "Site agent [pid 4242] did not stop within 8 s: killed (SIGKILL; no clean shutdown)" in result.stdout


@pytest.mark.parametrize("args, waited", [((), 2 * 3 + 5.0), (("--force",), 3 + 5.0)])
def test_without_t_the_wait_is_two_sync_periods_and_a_margin(stop, args, waited):
    client = Marked(stop.clock, lambda read: [_row(24)])
    result, stops = stop(client, *args, scheduler=SimpleNamespace(sync_period=3))
    assert result.exit_code == 0, result.output
    (called, timeout), = stops
    assert called - 1000.0 == waited and timeout == 45.0  # then the agent's own stop time (no pid file: 45 s)
    assert "Warning: BatchJob(s) 24 still await deletion after" in result.stderr


@pytest.mark.parametrize("outage_info", [
    # The agent's own key for it (`error` is the launcher's too).
    lambda text: {"scheduler_status_error": text},
    # As an agent before that key wrote it (an agent upgraded mid-outage leaves it until the poll answers).
    lambda text: {"error": text, "error_time": "2026-12-06T16:00:30+00:00"},
], ids=["scheduler_status_error", "older-agent-error"])
def test_no_wait_for_what_the_agent_says_it_cannot_end(stop, outage_info):
    outage = _row(24, **outage_info("scheduler status unavailable since 2026-12-06T16:00:00+00:00 (the status poll "
                                    "failed 3 times in a row): boom"))
    old_error = _row(26, error="an older error", error_time="2026-12-06T15:00:00+00:00")

    def rows(read: int) -> list[dict]:
        if read == 1:
            return [outage, old_error]
        # The agent's cycle since the wait began: 26 ended, the delete of 25 failed.
        return [outage, _row(25, error="delete failed: qdel: Unauthorized Request",
                             error_time=dt.datetime.now(dt.timezone.utc).isoformat())]

    client = Marked(stop.clock, rows)
    result, stops = stop(client)
    assert result.exit_code == 0, result.output
    (called, _timeout), = stops
    assert called - 1000.0 == 1.0  # one second: 26 ended; 24 and 25 the agent cannot end
    assert ("Warning: the site agent cannot end BatchJob(s) 24, 25 now (scheduler status unavailable since "
            "2026-12-06T16:00:00+00:00") in result.stderr, result.stderr
    assert "still await" not in result.stderr


def test_with_the_scheduler_module_off_nothing_ends_them(stop):
    client = Marked(stop.clock, lambda read: [_row(24)])
    result, stops = stop(client, scheduler=None)
    assert result.exit_code == 0, result.output
    assert stops[0][0] == 1000.0 and len(client.reads) == 1
    assert ("Warning: BatchJob(s) 24 await deletion, but the site's scheduler module is off (`scheduler:` in "
            "settings.yml): nothing ends them") in result.stderr


def test_ctrl_c_ends_the_wait_and_the_agent_is_stopped(stop):
    stop.clock.interrupt_at_sleep = 3
    client = Marked(stop.clock, lambda read: [_row(24)])
    result, stops = stop(client)
    assert result.exit_code == 0, result.output
    assert ("Interrupted: no longer waiting for the BatchJobs `balsam queue term` marked; stopping the site agent "
            "(Ctrl-C again to abort)") in result.stderr
    assert len(stops) == 1 and "Site agent [pid 4242] shutdown OK" in result.stdout


def test_the_wait_line_names_a_few_ids_and_counts_the_rest(stop):
    client = Marked(stop.clock, lambda read: [_row(i) for i in range(1, 301)] if read <= 3 else [], count=300)
    result, _ = stop(client)
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("Waiting")]
    assert "Waiting for the site agent to end 300 BatchJob(s) marked by `balsam queue term` (1, 2, 3, 4, 5 and 295 " \
           "more)...  1/25 s" in lines, lines
    assert max(map(len, lines)) < 120
