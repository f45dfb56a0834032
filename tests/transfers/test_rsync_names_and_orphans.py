"""The ``rsync`` backend over a remote shell, against the real rsync (tests/transfers/fake_ssh runs
the remote ``rsync --server`` through a pipe, as sshd would):

- remote names holding wildcard characters: the remote rsync expands ``*``, ``?``, ``[`` and ``]``
  in the paths it is given, even with ``--protect-args``; a stage-in of ``run[1].h5`` fetched
  ``run1.h5`` and a stage-out to ``run[1].h5`` overwrote ``run1.h5``, both exit 0. Now the name is
  taken literally, or (where rsync cannot name it exactly) the file fails with a reason and nothing
  is written anywhere;
- a host starting with ``-`` (ssh would take it for an option) is refused when the location is read;
- an agent SIGKILLed while its rsync hangs on a dead host: the rsync and its ssh (a session of their
  own) ran on for ever, beside the next agent's copy of the same item. Now the next agent's rsync
  backend ends them when it is built, before it polls or submits anything; a recycled pid is never
  touched.

Nothing here measures time: waits have generous bounds only so that a regression fails instead of
hanging.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from balsam.builtin.rsync_transfer import RsyncOptions, RsyncTransfer, rsync_command
from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from balsam.states import TransferDirection
from balsam.testing import wait_for_tasks
from balsam.transfer import TaskState, TransferError, TransferFile, TransferLocation, build_backend

FAKE_SSH = Path(__file__).with_name("fake_ssh")
BOUND = 60.0
#: Where the backend records the rsyncs it runs (balsam.builtin.rsync_transfer.RUNNING_DIR).
RUNNING_DIR = ".rsync-running"


def over_fake_ssh():
    return build_backend(RsyncTransfer, "rsync", {"threads": 1, "ssh_command": f"{sys.executable} {FAKE_SSH}"})


DTN = TransferLocation.parse("dtn", "rsync://me@dtn.example.org")


# -- names with wildcard characters ---------------------------------------------------------------


def test_a_remote_source_has_its_wildcards_escaped_and_a_local_one_not() -> None:
    from balsam.builtin.rsync_transfer import RemoteNameError, remote_source

    opts = RsyncOptions()
    line = rsync_command(opts, DTN, TransferDirection.stage_in, TransferFile("/r/run[1]/*.h5?", "/s/job/in"))
    assert line[-2:] == ["me@dtn.example.org:/r/run\\[1\\]/\\*.h5\\?", "/s/job/in"]
    local = rsync_command(opts, TransferLocation.parse("l", "rsync:///"), TransferDirection.stage_in,
                          TransferFile("/r/run[1].h5", "/s/job/in"))
    assert local[-2:] == ["/r/run[1].h5", "/s/job/in"]  # rsync's local mode expands nothing
    assert remote_source("/r/back\\slash") == "/r/back\\slash"  # no wildcard: used as it is
    with pytest.raises(RemoteNameError, match="both a backslash and a wildcard"):
        remote_source("/r/x\\[1].h5")


def test_stage_out_to_remote_names_with_wildcards_leaves_the_files_they_match_alone(tmp_path: Path) -> None:
    """rsync over ssh wrote run[1].h5's content into the existing run1.h5, *.out's into b.out, and
    d?/f into d1/f (the remote rsync expands wildcards in its destination too), exit 0."""
    remote, site = tmp_path / "remote", tmp_path / "site"
    (remote / "d1").mkdir(parents=True)
    site.mkdir()
    decoys = {"run1.h5": "keep run1", "b.out": "keep b", "d1/f": "keep d1/f"}
    for name, text in decoys.items():
        (remote / name).write_text(text)
    (site / "result").write_text("result")
    backend = over_fake_ssh()
    try:
        task = backend.submit(DTN, TransferDirection.stage_out, [
            TransferFile(str(site / "result"), str(remote / "run[1].h5")),
            TransferFile(str(site / "result"), str(remote / "*.out")),
            TransferFile(str(site / "result"), str(remote / "new" / "q?.txt")),
            TransferFile(str(site / "result"), str(remote / "d?" / "f")),
        ])
        status = wait_for_tasks(backend, [task], timeout=BOUND)[task]
    finally:
        backend.close()
    for name, text in decoys.items():
        assert (remote / name).read_text() == text, f"{name} was overwritten"
    assert (remote / "run[1].h5").read_text() == "result" and (remote / "*.out").read_text() == "result"
    assert (remote / "new" / "q?.txt").read_text() == "result"
    # A wildcard in a directory of the destination cannot be avoided: a file error, nothing written.
    assert status.state == TaskState.done and list(status.file_errors) == [str(remote / "d?" / "f")]
    assert "cannot write" in status.file_errors[str(remote / "d?" / "f")]
    assert not (remote / "d?").exists()


def test_remote_names_rsync_cannot_name_exactly_fail_and_write_nothing(tmp_path: Path) -> None:
    """A source named with a backslash and a wildcard (fetched its decoy x[1], exit 0), and a
    recursive destination named with wildcards (merged into t1/): file errors now, nothing written."""
    remote, site = tmp_path / "remote", tmp_path / "site"
    (remote / "t1").mkdir(parents=True)
    (remote / "x\\[1]").write_text("right")
    (remote / "x[1]").write_text("WRONG")
    (site / "tree").mkdir(parents=True)
    (site / "tree" / "a.txt").write_text("a")
    backend = over_fake_ssh()
    try:
        fetch = backend.submit(DTN, TransferDirection.stage_in, [TransferFile(str(remote / "x\\[1]"), str(site / "x"))])
        push = backend.submit(DTN, TransferDirection.stage_out,
                              [TransferFile(str(site / "tree"), str(remote / "t[1]"), recursive=True)])
        statuses = wait_for_tasks(backend, [fetch, push], timeout=BOUND)
    finally:
        backend.close()
    assert "both a backslash and a wildcard" in statuses[fetch].file_errors[str(site / "x")]
    assert not (site / "x").exists()
    assert "cannot write" in statuses[push].file_errors[str(remote / "t[1]")]
    assert list((remote / "t1").iterdir()) == [] and not (remote / "t[1]").exists()


# -- a host that ssh would take for an option -----------------------------------------------------


def test_a_host_starting_with_a_dash_is_refused(tmp_path: Path) -> None:
    location = TransferLocation.parse("evil", "rsync://me@-oProxyCommand=id")
    with pytest.raises(TransferError, match="a host cannot start with '-'") as err:
        RsyncTransfer.check_location(location)
    assert not err.value.retryable and "rsync://me@-oProxyCommand=id" in str(err.value)
    backend = over_fake_ssh()
    try:
        with pytest.raises(TransferError, match="cannot start with '-'"):
            backend.submit(location, TransferDirection.stage_in, [TransferFile("/a", str(tmp_path / "a"))])
    finally:
        backend.close()


# -- no rsync outlives its agent ------------------------------------------------------------------


def wait_until(predicate, what: str, required: bool = True) -> None:
    event = threading.Event()
    for _ in range(int(BOUND / 0.05)):
        if predicate():
            return
        event.wait(0.05)
    if required:
        raise AssertionError(f"timed out waiting for {what}")


def running(pids) -> list[int]:
    """Those of ``pids`` still running (zombies are not: nothing runs in them)."""
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def in_session(sid: int) -> list[int]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc.pid)
        except OSError:
            pass
    return running(found)


@pytest.fixture
def leftovers():
    """Pids a test started or found; whatever of them still runs at the end is killed."""
    pids: list[int] = []
    yield pids
    for pid in running(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def transfers_module(site: Path, ssh: str) -> TransfersModule:
    """The agent's transfers module for a site (no API server needed to build its backends)."""
    site_config = SimpleNamespace(site_path=str(site), data_path=str(site / "data"), site_id=1)
    options = TransfersOptions(transfer_locations={"dtn": "rsync://me@dtn"},
                               backend_options={"rsync": {"ssh_command": ssh, "threads": 1}})
    return TransfersModule(site_config, options, client=None)


AGENT = """
import sys, threading
from pathlib import Path
sys.path.insert(0, {here!r})
from test_rsync_names_and_orphans import transfers_module
from balsam.states import TransferDirection
from balsam.transfer import TransferFile, TransferLocation
module = transfers_module(Path(sys.argv[1]), sys.argv[2])
module.backend("rsync").submit(TransferLocation.parse("dtn", "rsync://me@dtn"), TransferDirection.stage_in,
                               [TransferFile("/data/big.h5", sys.argv[3])])
threading.Event().wait(600)
"""


def test_a_killed_agents_rsync_is_ended_when_the_next_one_builds_its_backend(tmp_path: Path, leftovers) -> None:
    """SIGKILL of the process running the rsync backend while its rsync waits on a host that never
    answers: the rsync and its ssh ran on (timeout_sec no longer applied), and the next agent copied
    the same item beside them. Now the next agent's backend ends every process of that rsync's
    session before it is used, and the record of it is gone."""
    site = tmp_path / "site"
    site.mkdir()
    pids = tmp_path / "ssh-pids"
    pids.mkdir()
    ssh = tmp_path / "hung_ssh"
    ssh.write_text(f"#!/bin/sh\necho $$ > {pids}/$$\nexec sleep 600\n")
    ssh.chmod(0o755)
    agent = subprocess.Popen([sys.executable, "-c", AGENT.format(here=str(Path(__file__).parent)), str(site), str(ssh),
                              str(site / "data" / "job" / "big.h5")])
    leftovers.append(agent.pid)
    try:
        wait_until(lambda: any(pids.iterdir()) or agent.poll() is not None, "the rsync's ssh to start")
        assert agent.poll() is None, "the agent stand-in exited"
        ssh_pid = int(next(pids.iterdir()).name)
        session = in_session(os.getsid(ssh_pid))
        leftovers.extend(session)
        assert len(session) >= 2, f"rsync and its ssh: {session}"
        # Not to kill it between starting the rsync and recording it (the checks below tell).
        wait_until(lambda: any((site / RUNNING_DIR).glob("*.json")), "the rsync to be recorded", required=False)
    finally:
        agent.kill()
        agent.wait()
    assert running(session) == session, "precondition: the rsync outlives the killed agent"

    transfers_module(site, str(ssh)).backend("rsync")  # the agent starts again

    assert running(session) == [], "a process of the killed agent's rsync is still running"
    assert list((site / RUNNING_DIR).iterdir()) == []


def record(site: Path, owner: int, owner_started: float, rsyncs: list[tuple[int, float]]) -> Path:
    directory = site / RUNNING_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{socket.gethostname()}-{owner}-{int(owner_started * 1000)}.json"
    path.write_text(json.dumps({"host": socket.gethostname(), "rsyncs": [list(r) for r in rsyncs]}))
    return path


def exited_process() -> tuple[int, float]:
    """The pid and start time of a process that has exited (a killed agent)."""
    proc = subprocess.Popen(["sleep", "30"])
    started = psutil.Process(proc.pid).create_time()
    proc.kill()
    proc.wait()
    return proc.pid, started


#: bash: a ``sleep`` in the background, named (its first argument) ``$0``; prints its pid and exits.
LEAVE_A_CHILD = '(exec -a "$0" sleep 600 </dev/null >/dev/null 2>&1) & echo $!'


def group_left_behind(program: str, user: "int | None" = None) -> tuple[int, float, int]:
    """A process group whose leader has exited, leaving one process running: a ``sleep`` whose first
    argument (its name for ps) is ``program``. Returns (leader pid, leader start time, child pid)."""
    leader = subprocess.Popen(["bash", "-c", LEAVE_A_CHILD, program], stdout=subprocess.PIPE, text=True,
                              start_new_session=True, user=user, cwd="/")
    leader_started = psutil.Process(leader.pid).create_time()
    child = int(leader.stdout.readline())
    leader.stdout.close()
    leader.wait()
    # `$!` is printed as soon as the subshell is forked, maybe before it has exec'd the named sleep:
    # until then it runs bash, not `program` (a loaded CI host once let the backend look that early).
    deadline = time.monotonic() + BOUND
    while (psutil.Process(child).cmdline() or [""])[0] != program and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running([child]) == [child] and os.getpgid(child) == leader.pid
    assert psutil.Process(child).cmdline()[0] == program
    return leader.pid, leader_started, child


def test_only_the_recorded_processes_of_dead_owners_are_ended(tmp_path: Path, leftovers) -> None:
    """A recorded pid now held by another process (another start time) is left alone, and so is an
    rsync whose owner still runs; a dead owner's rsync is ended, and so is what is left of its
    session after the rsync itself is gone (its ssh)."""
    site = tmp_path / "site"
    other = subprocess.Popen(["sleep", "600"], start_new_session=True)
    leftovers.append(other.pid)
    other_started = psutil.Process(other.pid).create_time()
    dead_owner, dead_started = exited_process()
    me = os.getpid()
    me_started = psutil.Process(me).create_time()

    # The same pid, started 100 s later than recorded: a recycled pid, not the rsync.
    recycled = record(site, dead_owner, dead_started, [(other.pid, other_started - 100)])
    build_backend(RsyncTransfer, "rsync", {}, site_path=str(site)).close()
    assert running([other.pid]) == [other.pid] and not recycled.exists()

    # Its owner runs (this process): not an orphan, whatever it is.
    mine = record(site, me, me_started, [(other.pid, other_started)])
    build_backend(RsyncTransfer, "rsync", {}, site_path=str(site)).close()
    assert running([other.pid]) == [other.pid] and mine.exists()
    mine.unlink()

    # A dead owner's rsync still running: ended.
    record(site, dead_owner, dead_started, [(other.pid, other_started)])
    build_backend(RsyncTransfer, "rsync", {}, site_path=str(site)).close()
    other.wait(BOUND)

    # The rsync gone, its ssh still running in its process group: ended too.
    leader, leader_started, child = group_left_behind("ssh")
    leftovers.append(child)
    record(site, dead_owner, dead_started, [(leader, leader_started)])
    build_backend(RsyncTransfer, "rsync", {}, site_path=str(site)).close()
    assert running([child]) == []
    assert list((site / RUNNING_DIR).iterdir()) == []


def test_a_finished_rsync_is_no_longer_recorded(tmp_path: Path) -> None:
    (tmp_path / "src.txt").write_text("x")
    site = tmp_path / "site"
    site.mkdir()
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1, "ssh_command": f"{sys.executable} {FAKE_SSH}"},
                            site_path=str(site))
    try:
        task = backend.submit(DTN, TransferDirection.stage_in, [TransferFile(str(tmp_path / "src.txt"), str(site / "in"))])
        assert wait_for_tasks(backend, [task], timeout=BOUND)[task].state == TaskState.done
    finally:
        backend.close()
    assert (site / "in").read_text() == "x"
    assert list((site / RUNNING_DIR).iterdir()) == []


def test_a_recycled_group_id_left_by_a_daemon_is_not_taken_for_the_rsyncs(tmp_path: Path, leftovers) -> None:
    """Once a recorded rsync is gone its pid, so its group id, may be given again: to a process that
    made a group of its own and exited, leaving children (a double-forking daemon). Those started
    after the rsync, in a group of that id, were ended as the rsync's leftovers whatever they were;
    now only processes running rsync or the ssh command are, and never another user's."""
    site = tmp_path / "site"
    dead_owner, dead_started = exited_process()

    # The daemon's survivor: a group of the recorded pid, started after the recorded start time.
    daemon, daemon_started, survivor = group_left_behind("sleep")
    leftovers.append(survivor)
    record(site, dead_owner, dead_started, [(daemon, daemon_started - 100)])
    build_backend(RsyncTransfer, "rsync", {}, site_path=str(site)).close()
    assert running([survivor]) == [survivor], "an unrelated process in a recycled group was killed"
    assert list((site / RUNNING_DIR).iterdir()) == []

    # A program the dead agent's settings named (recorded with its rsyncs) counts as its ssh.
    leader, leader_started, wrapper = group_left_behind("site-ssh")
    leftovers.append(wrapper)
    path = record(site, dead_owner, dead_started, [(leader, leader_started)])
    path.write_text(json.dumps({**json.loads(path.read_text()), "commands": ["rsync", "site-ssh"]}))
    build_backend(RsyncTransfer, "rsync", {}, site_path=str(site)).close()
    assert running([wrapper]) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process of another user")
def test_another_users_process_is_never_ended(tmp_path: Path, leftovers) -> None:
    site = tmp_path / "site"
    dead_owner, dead_started = exited_process()
    leader, leader_started, theirs = group_left_behind("ssh", user=65534)
    leftovers.append(theirs)
    record(site, dead_owner, dead_started, [(leader, leader_started)])
    build_backend(RsyncTransfer, "rsync", {}, site_path=str(site)).close()
    assert running([theirs]) == [theirs], "another user's process was killed"
