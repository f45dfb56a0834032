"""The built-in backends stop when told to, for real: the agent's stop (``close``) with a copy
blocked in a read and with an rsync to a host that never answers, a big local copy stopped between
chunks, rsync's own timeout killing the ssh it started, and a batch to a dead host costing one
timeout rather than one per file.

The hung host is a stand-in ``ssh`` that records its pid and sleeps (a host that accepts the
connection and never answers). Nothing here measures time: each check is what happened (which
processes remain, which files exist, what the task reports), with generous bounds on waits only so
that a regression fails instead of hanging.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import psutil
import pytest

import balsam.builtin.local_transfer as local_transfer
from balsam.builtin.local_transfer import LocalTransfer
from balsam.builtin.rsync_transfer import RsyncTransfer
from balsam.states import TransferDirection
from balsam.testing import wait_for_tasks
from balsam.transfer import TaskState, TransferFile, TransferLocation, build_backend

#: Bound on a wait that must end (a regression fails here rather than hanging the run).
BOUND = 60.0


def hung_ssh(tmp_path: Path) -> tuple[str, Path]:
    """A remote shell that never answers; each run writes its pid into the returned directory."""
    pids = tmp_path / "ssh-pids"
    pids.mkdir()
    script = tmp_path / "hung_ssh"
    script.write_text(f"#!/bin/sh\necho $$ > {pids}/$$\nexec sleep 600\n")
    script.chmod(0o755)
    return str(script), pids


def started_ssh(pids: Path) -> list[int]:
    return sorted(int(p.name) for p in pids.iterdir())


def stage_in_from_dtn(backend, dests: list[str]):
    """Submit one stage-in task from the rsync host ``dtn``: ``/data/<i>.txt`` to ``dests[i]``."""
    return backend.submit(TransferLocation.parse("dtn", "rsync://me@dtn"), TransferDirection.stage_in,
                          [TransferFile(f"/data/{i}.txt", dest) for i, dest in enumerate(dests)])


def wait_until(predicate, what: str) -> None:
    event = threading.Event()
    for _ in range(int(BOUND / 0.05)):
        if predicate():
            return
        event.wait(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (reaped zombies are not)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, still = psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in still if p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def reap():
    """Kill, at the end, the stand-in ssh processes a test recorded (the ones a fault left behind)."""
    found: list[int] = []
    yield found
    for pid in found:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


def close_in_thread(backend) -> threading.Thread:
    closer = threading.Thread(target=backend.close, daemon=True)
    closer.start()
    closer.join(BOUND)
    return closer


# -- fault 1: the agent could not stop while a copy ran -------------------------------------------


def test_close_returns_while_a_local_copy_is_blocked_in_a_read(tmp_path: Path, monkeypatch) -> None:
    """A source whose read never returns (a pty, like a file on a hung NFS mount): close() waited for
    it for ever (ThreadPoolExecutor.shutdown(wait=True)). Now it waits at most CLOSE_WAIT_SEC, the
    task is unknown afterwards (the next agent copies its items again) and nothing lands."""
    monkeypatch.setattr(local_transfer, "CLOSE_WAIT_SEC", 0.2, raising=False)
    master, slave = os.openpty()
    dest = tmp_path / "out" / "input.dat"
    backend = build_backend(LocalTransfer, "local", {"threads": 1})
    try:
        task = backend.submit(TransferLocation.parse("nfs", "local://"), TransferDirection.stage_in,
                              [TransferFile(os.ttyname(slave), str(dest))])
        queued = backend.submit(TransferLocation.parse("nfs", "local://"), TransferDirection.stage_in,
                                [TransferFile(os.ttyname(slave), str(tmp_path / "out" / "second.dat"))])
        wait_until(lambda: any(p.name.startswith(".input.dat.balsam-partial-") for p in dest.parent.iterdir())
                   if dest.parent.exists() else False, "the copy to start")
        closer = close_in_thread(backend)
        assert not closer.is_alive(), "close() is still waiting for a read that never returns"
        assert backend.poll([task, queued]) == {task: backend.poll([task])[task], queued: backend.poll([queued])[queued]}
        assert {s.state for s in backend.poll([task, queued]).values()} == {TaskState.unknown}
    finally:
        os.write(master, b"late bytes")  # let the stuck read return
        os.close(master)
        os.close(slave)
    wait_until(lambda: not any(dest.parent.iterdir()), "the stopped copy to remove its partial file")
    assert not dest.exists() and not (tmp_path / "out" / "second.dat").exists()


def test_close_stops_a_local_copy_between_chunks_and_renames_nothing(tmp_path: Path, monkeypatch) -> None:
    """A big copy ran to its end before close() returned (49.8 s for 6 GiB, past the agent's 45 s
    stop). The copy now looks at its stop flag between chunks: the source here is a FIFO fed one
    chunk at a time, so close() lands mid-file, deterministically."""
    monkeypatch.setattr(local_transfer, "CHUNK_BYTES", 4096, raising=False)
    fifo = tmp_path / "big.bin"
    os.mkfifo(fifo)
    dest = tmp_path / "out" / "big.bin"
    backend = build_backend(LocalTransfer, "local", {"threads": 1})
    task = backend.submit(TransferLocation.parse("here", "local://"), TransferDirection.stage_in,
                          [TransferFile(str(fifo), str(dest))])
    writer = os.open(fifo, os.O_WRONLY)  # meets the copy's open()
    try:
        os.write(writer, b"x" * 4096)
        partial = lambda: [p for p in dest.parent.iterdir() if ".balsam-partial-" in p.name] if dest.parent.exists() else []
        wait_until(lambda: partial() and partial()[0].stat().st_size == 4096, "the first chunk to be copied")
        stop_flags = list(getattr(backend._tasks, "_stops", {}).values())
        closer = threading.Thread(target=backend.close, daemon=True)
        closer.start()
        wait_until(lambda: all(flag.is_set() for flag in stop_flags), "close() to set the stop flag")
        try:
            os.write(writer, b"y" * 4096)  # the copy wakes up, finds the flag set, and stops
        except BrokenPipeError:
            pass  # it stopped already and closed the FIFO (a loaded host): the same outcome
    finally:
        os.close(writer)
    closer.join(BOUND)
    assert not closer.is_alive()
    assert backend.poll([task])[task].state == TaskState.unknown  # copied again by the next agent
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no destination, no partial


def test_close_kills_an_rsync_to_a_host_that_never_answers(tmp_path: Path, reap) -> None:
    """rsync to a host that never answers held close() for up to timeout_sec (3600 s by default).
    Now close() kills rsync's process group: no process of its session remains."""
    ssh, pids = hung_ssh(tmp_path)
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1, "ssh_command": ssh})
    task = stage_in_from_dtn(backend, [str(tmp_path / "out" / "0.txt")])
    wait_until(lambda: started_ssh(pids), "ssh to start")
    reap.extend(started_ssh(pids))
    session = os.getsid(started_ssh(pids)[0])
    assert session != os.getsid(0), "rsync runs in a session of its own"
    closer = close_in_thread(backend)
    assert not closer.is_alive(), "close() waits for an rsync that never ends"
    assert alive(started_ssh(pids)) == []
    assert [p.pid for p in psutil.process_iter() if _sid(p.pid) == session and p.status() != psutil.STATUS_ZOMBIE] == []
    assert backend.poll([task])[task].state == TaskState.unknown
    assert not (tmp_path / "out" / "0.txt").exists()


def _sid(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


# -- faults 2 and 3: rsync timeouts ---------------------------------------------------------------


def test_rsync_timeout_kills_its_ssh_and_fails_the_rest_of_the_batch_untried(tmp_path: Path, reap) -> None:
    """A timeout killed rsync but left its ssh running (one `sleep 600` per file and retry), and each
    file of the batch waited out timeout_sec in turn (5 files: 5 timeouts). Now the ssh dies with
    rsync, and the files after the one that timed out fail at once, untried."""
    ssh, pids = hung_ssh(tmp_path)
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1, "ssh_command": ssh, "timeout_sec": 1})
    dests = [str(tmp_path / "out" / f"{i}.txt") for i in range(3)]
    try:
        task = stage_in_from_dtn(backend, dests)
        status = wait_for_tasks(backend, [task], timeout=BOUND)[task]
    finally:
        reap.extend(started_ssh(pids))
        backend.close()
    assert alive(started_ssh(pids)) == [], "the ssh of the timed-out rsync is still running"
    assert len(started_ssh(pids)) == 1, "only the first file was tried"
    assert status.state == TaskState.done and set(status.file_errors) == set(dests)
    assert "did not finish within 1 s" in status.file_errors[dests[0]]
    for dest in dests[1:]:
        assert status.file_errors[dest].startswith("not tried: an earlier file of this task failed (rsync of /data/0.txt")


def test_rsync_ssh_failure_fails_the_rest_of_the_batch_untried(tmp_path: Path) -> None:
    """ssh exiting 255 (host unreachable, login refused) says the same of every file of the batch."""
    calls = tmp_path / "calls"
    calls.mkdir()
    script = tmp_path / "refused_ssh"
    script.write_text(f"#!/bin/sh\ntouch {calls}/$$\necho 'ssh: connect to host dtn port 22: Connection refused' >&2\n"
                      "exit 255\n")
    script.chmod(0o755)
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1, "ssh_command": str(script)})
    dests = [str(tmp_path / "out" / f"{i}.txt") for i in range(4)]
    try:
        task = stage_in_from_dtn(backend, dests)
        status = wait_for_tasks(backend, [task], timeout=BOUND)[task]
    finally:
        backend.close()
    assert len(list(calls.iterdir())) == 1
    assert status.state == TaskState.done and set(status.file_errors) == set(dests)
    # 255 (ssh's status), or 12 when rsync notices the closed pipe first: the same failure.
    assert status.file_errors[dests[0]].split(": ", 1)[1] == "ssh: connect to host dtn port 22: Connection refused"
    assert all(status.file_errors[d].startswith("not tried: ") for d in dests[1:])


def test_cancelling_an_rsync_task_kills_its_process_group(tmp_path: Path, reap) -> None:
    """cancel() (a deleted job, or transfers.task_timeout_sec) stops a running rsync at once."""
    ssh, pids = hung_ssh(tmp_path)
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1, "ssh_command": ssh})
    try:
        task = stage_in_from_dtn(backend, [str(tmp_path / "0.txt")])
        wait_until(lambda: started_ssh(pids), "ssh to start")
        reap.extend(started_ssh(pids))
        backend.cancel(task)
        status = wait_for_tasks(backend, [task], timeout=BOUND)[task]
    finally:
        backend.close()
    assert (status.state, status.error) == (TaskState.failed, "cancelled")
    assert alive(started_ssh(pids)) == []
