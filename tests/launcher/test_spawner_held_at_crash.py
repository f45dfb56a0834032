"""A spawner whose loop fails while it holds exits 0 and the hand-over starts behind them: those
events are true and must reach the launcher before the spawner ends its tasks and exits (else the
finished job is reported lost with the spawner, RUN_TIMEOUT, and runs again; the task started behind
it comes back as dropped unstarted and runs twice, never reported RUNNING)."""
import os

from balsam.launcher import spawner
from balsam.launcher.spawner import FrameReader, Spawner


def test_events_held_when_the_loop_fails_reach_the_launcher(monkeypatch):
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    os.set_blocking(reply_r, False)
    made = Spawner(request_r, reply_w)
    held = [("e", 1, 0, 1.0, ""), ("h", 1, 2, 1.0)]

    def loop():
        made.running = {4242424: 2}  # (no such process: stop_all finds nothing to end)
        made.after = {2: (3, ["/bin/true"], "/tmp", "/tmp/job.out", {}, []),
                      3: (4, ["/bin/true"], "/tmp", "/tmp/job.out", {}, [])}
        made.events = list(held)
        assert made.send_events() is not None  # held (2 queued behind the one running task)
        raise RuntimeError("an error of the spawner's own")

    monkeypatch.setattr(made, "_loop", loop)
    monkeypatch.setattr(spawner, "ORPHAN_GRACE_SEC", 0.0)
    assert made.run() == 1
    try:
        data = os.read(reply_r, 1 << 16)
    except BlockingIOError:
        data = b""
    got = [event for _kind, events in FrameReader().feed(data) for event in events]
    for fd in (request_r, request_w, reply_r, reply_w, made.devnull):
        os.close(fd)
    assert got == held
