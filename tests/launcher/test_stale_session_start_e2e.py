"""End to end: a launcher frozen longer than the session expiry starts none of the jobs it had
leased ahead once it resumes (balsam.client.lease, "Known alive").

A real uvicorn server (sessions expire after 4 s), a serial launcher that leases jobs ahead, frozen
with SIGSTOP while an mpi launcher leases and runs the jobs its expired Session held, then resumed
with SIGCONT. It used to start jobs of its lost Session in the moment before its heartbeat said the
Session was gone: jobs the other launcher had run already ran again.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest

from launcher_harness import finish, start_launcher
from launcher_helpers import SESSION_EXPIRE_SEC, make_runnable

pytestmark = [pytest.mark.slow, pytest.mark.mpi]


def runs(trace: Path, kind: str = "start") -> dict[int, list[tuple[str, float]]]:
    """job id -> [(launcher, time)] from lines ``<job> <launcher> <kind> <t>``."""
    out: dict[int, list[tuple[str, float]]] = defaultdict(list)
    for line in trace.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] == kind:
            out[int(parts[0])].append((parts[1], float(parts[3])))
    return out


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def site_sessions(site_id: int) -> dict[int, dt.datetime]:
    """The site's Sessions on the server: id -> last heartbeat (the server's clock)."""
    from balsam.api import get_default_client

    listed = get_default_client().get("/sessions/")
    rows = listed if isinstance(listed, list) else listed.get("results", [])
    return {int(r["id"]): dt.datetime.fromisoformat(str(r["heartbeat"])) for r in rows if r["site_id"] == site_id}


def serial_log(site_path: Path) -> str:
    return "".join(p.read_text() for p in (site_path / "log").glob("serial_mode_*.log"))


def replacing_session(site_path: Path) -> int | None:
    """The id of the Session the serial launcher created after finding its own gone, once logged."""
    text = serial_log(site_path)
    at = text.find("is gone on the server")
    found = re.search(r"session (\d+) created", text[at:]) if at >= 0 else None
    return int(found.group(1)) if found else None


def test_a_resumed_launcher_starts_no_job_of_its_expired_session(new_site, tmp_path: Path) -> None:
    from balsam.api import ApplicationDefinition, Job

    from balsam.api import Site

    name, path = new_site(idle_ttl_sec=60)
    site_id = Site.objects.get(name=name).id
    trace = tmp_path / "runs"
    trace.touch()

    class Tick(ApplicationDefinition):
        site = name
        command_template = (f"bash -c 'echo $BALSAM_JOB_ID $RUN_BY start $(date +%s.%N) >> {trace}; sleep 1; "
                            f"echo $BALSAM_JOB_ID $RUN_BY end $(date +%s.%N) >> {trace}'")

    Tick.sync()
    ids = make_runnable(Tick.submit(workdir=f"t/{i}", save=False) for i in range(40))
    first = start_launcher(path, "serial", 3, env={"RUN_BY": "A"})
    second = None
    resumed_at = None
    ended_at = time.time()
    try:
        wait_until(lambda: sum(1 for r in runs(trace).values() for who, _ in r if who == "A") >= 3, 90,
                   "the serial launcher started no jobs")
        os.kill(first.pid, signal.SIGSTOP)  # its main process: loop, heartbeat and prefetch threads
        frozen = set(site_sessions(site_id))  # the serial launcher's: the only launcher so far
        assert frozen, "the serial launcher has no Session on the server"
        # Expired and swept (the server's background sweep, about every SESSION_EXPIRE_SEC / 2).
        wait_until(lambda: not frozen & set(site_sessions(site_id)), 60 + SESSION_EXPIRE_SEC,
                   f"the frozen launcher's Session {frozen} did not expire")
        second = start_launcher(path, "mpi", 3, env={"RUN_BY": "B"})
        wait_until(lambda: sum(1 for r in runs(trace).values() for who, _ in r if who == "B") >= 4, 90,
                   "the mpi launcher ran none of the freed jobs")
        resumed_at = time.time()
        os.kill(first.pid, signal.SIGCONT)
        # Proof that the resumed launcher learned of the loss: it logged it and created a new
        # Session, which the server lists. Then until that Session's heartbeats (the server's clock)
        # cover more than the 2 s the checks below leave out at the end: a job of the lost Session
        # started at the resume would have written its start line well inside the window checked.
        wait_until(lambda: replacing_session(path) is not None, 90,
                   f"the resumed launcher did not replace its lost Session:\n{serial_log(path)[-3000:]}")
        new_id = replacing_session(path)
        wait_until(lambda: new_id in site_sessions(site_id), 30, f"Session {new_id} is not on the server")
        first_beat = site_sessions(site_id)[new_id]
        wait_until(lambda: (site_sessions(site_id).get(new_id, first_beat) - first_beat).total_seconds() > 3, 60,
                   f"the resumed launcher's Session {new_id} got no heartbeat for long")
    finally:
        ended_at = time.time()
        if resumed_at is None:
            os.kill(first.pid, signal.SIGCONT)
        for proc in (first, second):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in (first, second):
            if proc is not None:
                finish(proc, 60)
    done = runs(trace)
    text = serial_log(path)
    assert "is gone on the server" in text, f"the Session did not expire:\n{text[-3000:]}"
    # A run of the lost Session's jobs started after the resume was ended as gone once the launcher
    # learned that its Session was gone: it never wrote its end line (its 1 s were not over).
    ends = runs(trace, "end")
    cut = sorted(job_id for job_id, rs in done.items() for who, t in rs
                 if who == "A" and resumed_at < t < ended_at - 2
                 and not any(o == "A" and t < u for o, u in ends.get(job_id, [])))
    assert not cut, f"jobs of the expired Session were started by the resumed launcher (then ended): {cut} {dict(done)}"
    twice = sorted(job_id for job_id, rs in done.items()
                   if any(who == "A" and t > resumed_at and any(o == "B" and u < t for o, u in rs) for who, t in rs))
    assert not twice, f"jobs run by the other launcher were started again by the resumed one: {twice} {dict(done)}"
    assert set(done) <= set(ids)
    assert Job.objects.filter(id=ids).count() == len(ids)
