"""A launcher's announced end (balsam.client.lease, "An announced end"), its edges, on the real
classes without a server:

- a server that refuses the field (422 naming it) gets the same heartbeat again at once without it:
  no "heartbeat failed" WARNING beside the promised INFO line, no period without a heartbeat;
- an announcement waits ENDING_IN_SEC at most for its answer (a request stuck in a server that stood
  still held the heartbeat thread for the client's read timeout, 2 minutes, past the window);
- a serial master signalled while its prefetch thread still creates the Session announces once the
  Session exists (it announced nothing: the lease was not there when the stop's callback ran);
- the server's sweep for an announced moment that wakes late (the process stood still or was
  starved) is pushed back by the window once instead of racing the heartbeats queued meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from balsam.client.lease import ENDING_IN_SEC, JobLease
from balsam.launcher.job_mode import StopConditions
from balsam.launcher.modes import serial_worker


class _Refused(Exception):
    def __init__(self, status_code: int, text: str) -> None:
        super().__init__(text)
        self.status_code = status_code


class _StrictServer:
    """A server that checks a heartbeat's fields and does not know ``ending_in_sec`` (422)."""

    def __init__(self) -> None:
        self.puts: list[tuple[dict, dict]] = []

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return {"id": 7}

    def put(self, path: str, json: Any = None, **kw: Any) -> Any:
        self.puts.append((dict(json or {}), dict(kw)))
        if "ending_in_sec" in (json or {}):
            raise _Refused(422, "PUT /sessions/7 failed with HTTP 422: body.ending_in_sec: unknown field")
        return {"id": 7, "heartbeat": "2026-12-07T00:00:00"}

    def delete(self, path: str, **kw: Any) -> None:
        pass


def test_a_server_refusing_the_field_gets_a_plain_heartbeat_at_once_and_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    server = _StrictServer()
    lease = JobLease(server, 1, tick_period=3600, heartbeat_thread=False)
    with caplog.at_level(logging.INFO, logger="balsam.client.lease"):
        lease.announce_end()
        lease.tick_if_due()  # raised the 422 before: the thread logged "heartbeat failed" and waited a period
    assert [("ending_in_sec" in body) for body, _kw in server.puts] == [True, False]  # the plain one at once
    assert lease.tick_errors == 0
    lease_records = [r for r in caplog.records if r.name == "balsam.client.lease"]
    assert [r for r in lease_records if r.levelno >= logging.WARNING] == [], [r.getMessage() for r in lease_records]
    notes = [r for r in lease_records if "does not take an announced end" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    lease.tick()  # plain heartbeats from now on
    assert "ending_in_sec" not in server.puts[-1][0]
    lease.close(retry_count=0)


def test_a_422_about_another_field_is_not_taken_for_an_older_server() -> None:
    class OtherRefusal(_StrictServer):
        def put(self, path: str, json: Any = None, **kw: Any) -> Any:
            self.puts.append((dict(json or {}), dict(kw)))
            raise _Refused(422, "body.job_ids.0: expected a 64-bit integer job id")

    server = OtherRefusal()
    lease = JobLease(server, 1, tick_period=3600, heartbeat_thread=False)
    lease.announce_end()
    with pytest.raises(_Refused):
        lease.tick_if_due()
    assert len(server.puts) == 1 and lease._ending_known is None  # the next heartbeat announces again
    lease.close(retry_count=0)


def test_an_announcement_waits_for_its_answer_within_the_announced_window() -> None:
    class Server(_StrictServer):
        def put(self, path: str, json: Any = None, **kw: Any) -> Any:
            self.puts.append((dict(json or {}), dict(kw)))
            return {"id": 7, "heartbeat": "2026-12-07T00:00:00", "expires": "2026-12-07T00:00:10"}

    server = Server()
    lease = JobLease(server, 1, tick_period=3600, heartbeat_thread=False)
    lease.tick()
    sent = time.monotonic()
    lease.announce_end()
    lease.tick_if_due()
    (plain, plain_kw), (announced, announced_kw) = server.puts
    assert "ending_in_sec" not in plain and "deadline" not in plain_kw  # a plain one: the client's timeouts
    assert "ending_in_sec" in announced
    # A deadline on the client's own clock (RESTClient.request), within the window: not the 2-minute read timeout.
    assert sent <= announced_kw["deadline"] <= time.monotonic() + ENDING_IN_SEC
    lease.close(retry_count=0)


class _Captured(Exception):
    pass


def test_a_serial_master_stopped_while_its_session_is_created_announces_once_it_exists(monkeypatch: Any, tmp_path: Any) -> None:
    """build_master as it runs in the master: the prefetch thread creates the Session (the lease)
    while the batch system's SIGTERM comes."""
    created = threading.Event()  # the Session create's answer comes when the test says
    announced = threading.Event()

    class Lease:
        def acquire(self, count: int, **kwargs: Any) -> list:
            return []

        def announce_end(self) -> None:
            announced.set()

        def close(self, **kwargs: Any) -> None:
            pass

    def open_lease() -> Lease:
        assert created.wait(30), "the test never let the Session create answer"
        return Lease()

    wake = threading.Event()
    stop = StopConditions.for_launcher(60, time.time(), 60, wake)
    seen: dict[str, bool] = {}

    def local_pool(*args: Any, **kwargs: Any) -> Any:
        # build_master registered its stop callback before this: SIGTERM now, the Session not there yet.
        callbacks_ran = threading.Event()
        stop.when_requested(callbacks_ran.set)  # runs after build_master's, on the same helper thread
        stop.request("signal 15")
        assert callbacks_ran.wait(30)
        created.set()  # the create answers: the lease exists now
        seen["announced"] = announced.wait(20)  # a bound, not a measure: it comes at once or never
        raise _Captured()

    monkeypatch.setattr(serial_worker, "local_pool", local_pool)
    monkeypatch.setattr(serial_worker, "open_updater", lambda *args, **kwargs: SimpleNamespace(close=lambda: None))
    config = {"launcher": {"serial_mode_prefetch_per_rank": 1, "delay_sec": 1, "default_postprocess_in_launcher": True,
                           "error_tail_num_lines": 10},
              "nodes": [{"node_id": "0", "hostname": "h0", "cpu_ids": [0]}], "data_path": str(tmp_path)}
    with pytest.raises(_Captured):
        serial_worker.build_master(config, None, [0], stop, wake, lambda: None, lease=open_lease)
    assert seen["announced"], "the stop requested before the Session existed was never announced to it"


def test_a_late_end_sweep_is_pushed_back_by_the_window_once() -> None:
    from balsam.server import sessions_logic

    now = [1000.0]
    sweeps = sessions_logic._EndSweeps(clock=lambda: now[0], start_thread=False, protected_for=lambda: 0.0)
    ran: list[str] = []
    sweeps.schedule("db", 10.0, lambda: ran.append("swept"))
    ready, nearest = sweeps.take_ready()
    assert ready == [] and nearest is not None and 1010.0 <= nearest <= 1011.0
    now[0] = nearest + 0.1  # on time
    ready, _ = sweeps.take_ready()
    assert len(ready) == 1
    ready[0]()
    assert ran == ["swept"]

    sweeps.schedule("db", 10.0, lambda: ran.append("swept"))
    _, due = sweeps.take_ready()
    assert due is not None
    now[0] = due + 13  # the process stood still 13 s past the moment: the heartbeats queued meanwhile come next
    ready, later = sweeps.take_ready()
    assert ready == [] and later is not None and later >= now[0] + 10.0  # the window again, from the wake-up
    now[0] = later + 5  # late again (starved): swept this time, not pushed back for ever
    ready, nearest = sweeps.take_ready()
    assert len(ready) == 1 and nearest is None


def test_an_end_sweep_due_while_a_stand_still_is_in_force_comes_after_it() -> None:
    """On time, but the process stood still just before: the sweeps do not count the stand-still
    yet (the backlog's heartbeats come first), so a sweep now would find a dead launcher's Session
    not due, and no sweep would come at its moved moment."""
    from balsam.server import sessions_logic

    now, protected = [1000.0], [0.0]
    sweeps = sessions_logic._EndSweeps(clock=lambda: now[0], start_thread=False, protected_for=lambda: protected[0])
    sweeps.schedule("db", 2.0, lambda: None)
    _, due = sweeps.take_ready()
    assert due is not None
    now[0], protected[0] = due, 7.0
    ready, later = sweeps.take_ready()
    assert ready == [] and later is not None and later >= due + 7.0
    now[0], protected[0] = later, 0.0
    ready, _ = sweeps.take_ready()
    assert len(ready) == 1


def test_a_stand_still_is_not_counted_against_the_sessions_until_its_backlog_is_served(monkeypatch: Any) -> None:
    """The process watch's discount: a gap between its notes (the process stood still) is in force
    for as long as it lasted (5 s at least) after its end, then no more (a session announced after
    it expires at its moment), and one over the outage limit is left to the clock restart."""
    from balsam.server import sessions_logic

    mono, wall = [500.0], [2000.0]
    monkeypatch.setattr(sessions_logic.time, "monotonic", lambda: mono[0])
    monkeypatch.setattr(sessions_logic.time, "time", lambda: wall[0])
    watch = object.__new__(sessions_logic._ProcessWatch)
    watch._lock = threading.Lock()
    watch._pid = sessions_logic.os.getpid()
    watch._last = wall[0]
    watch._stood = __import__("collections").deque()
    limit = sessions_logic.stall_limit(300)
    # A stand-still going on (the watch's thread has not noted it yet): counted already.
    wall[0] += 13.5
    mono[0] += 13.5
    assert watch.stand_still_discount(limit) == pytest.approx(13.0)
    # Noted by the watch's thread (as _run does), then in force 13 s after its end.
    watch._stood.append((mono[0], 13.0))
    watch._last = wall[0]
    wall[0] += 0.4
    mono[0] += 0.4
    assert watch.stand_still_discount(limit) == pytest.approx(13.0)
    assert watch.protected_for(limit) == pytest.approx(12.6)
    wall[0] += 13
    mono[0] += 13
    watch._last = wall[0]
    assert watch.stand_still_discount(limit) == 0.0 and watch.protected_for(limit) == 0.0
    watch._stood.append((mono[0], 100.0))  # over the limit (75 s): an outage, the clocks restarted instead
    assert watch.stand_still_discount(limit) == 0.0


def test_the_full_expiry_for_the_spool_is_one_bounded_attempt(monkeypatch: Any) -> None:
    """close() after an announced end, its reports spooled (the API did not take them): the plain
    heartbeat that gives the Session its full expiry back is one attempt with a deadline of
    RESTORE_WAIT_SEC. Without them it waited the client's read timeout (120 s) per retry against a
    hung server: close() took minutes, past the batch system's kill (reviewer's probe: 129 s with
    one attempt, > 460 s with the default retries, against 5 s before)."""
    from balsam.client import lease as lease_module

    class Server(_StrictServer):
        def put(self, path: str, json: Any = None, **kw: Any) -> Any:
            self.puts.append((dict(json or {}), dict(kw)))
            return {"id": 7, "heartbeat": "2026-12-07T00:00:00", "expires": "2026-12-07T00:00:10"}

    monkeypatch.setattr(lease_module, "send_spooled", lambda client, session_id: False)
    server = Server()
    lease = JobLease(server, 1, tick_period=3600, heartbeat_thread=False)
    lease.tick()
    lease.announce_end()
    lease.tick_if_due()
    before = time.monotonic()
    lease.close()
    restore_body, restore_kw = server.puts[-1]
    assert "ending_in_sec" not in restore_body
    assert restore_kw.get("retry_count") == 0
    assert before <= restore_kw["deadline"] <= time.monotonic() + lease_module.RESTORE_WAIT_SEC


def test_a_stand_still_longer_than_the_stall_limit_does_not_hold_back_end_sweeps(monkeypatch: Any) -> None:
    """A gap longer than the stall limit (a VM paused overnight, the wall clock stepped a day) is an
    outage, every clock restarted once for it: the end sweeps were held back for all of it
    (``protected_for(inf)``), so for a day a killed launcher's jobs waited for the periodic sweep.
    Real watch; the wall clock stepped as NTP would."""
    from balsam.server import sessions_logic as sl

    watch = sl._ProcessWatch()
    monkeypatch.setattr(sl, "_process_watch", watch)
    watch.take_gap(sl.stall_limit(300))  # starts the watch's thread in this process
    time.sleep(3 * sl.WATCH_PERIOD_SEC)
    real = time.time
    monkeypatch.setattr(sl.time, "time", lambda: real() + 86400.0)
    time.sleep(4 * sl.WATCH_PERIOD_SEC)  # the watch notes the step
    now = [1000.0]
    sweeps = sl._EndSweeps(clock=lambda: now[0], start_thread=False)
    sweeps.stall_limit = sl.stall_limit(300)  # what schedule_end_sweep sets from the server's expiry
    ran: list[float] = []
    sweeps.schedule("db", 10.0, lambda: ran.append(now[0]))
    now[0] += 10.0 + sl.END_SWEEP_AFTER_SEC + 0.75  # past its due moment (rounded up to half-second steps)
    ready, _nearest = sweeps.take_ready()
    assert len(ready) == 1, "the end sweep was pushed back past a stand-still already taken for an outage"
