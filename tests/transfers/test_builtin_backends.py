"""The built-in ``local`` and ``rsync`` backends, for real, through the transfer contract kit.

rsync runs three ways: over real ssh to a private sshd started on 127.0.0.1 for these tests (key
authentication, its own host key and config; skipped when /usr/sbin/sshd is not installed or cannot
start), rsync's own local mode (``rsync:///``), and rsync's remote protocol over a stand-in remote
shell (tests/transfers/fake_ssh runs the remote side's ``rsync --server`` through a pipe, as sshd
would), which needs no sshd at all.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balsam.builtin.local_transfer import LocalTransfer, copy_into_place
from balsam.builtin.rsync_transfer import RsyncOptions, RsyncTransfer, rsync_command
from balsam.states import TransferDirection
from balsam.testing import TransferContract, wait_for_tasks
from balsam.transfer import TaskState, TransferError, TransferFile, TransferLocation, backend_name_for, build_backend

FAKE_SSH = Path(__file__).with_name("fake_ssh")


class TestLocalBackend(TransferContract):
    backend_class = LocalTransfer
    backend_name = "local"
    options = {"threads": 2}

    def location_url(self, tmp_path: Path) -> str:
        return "local://"


class TestRsyncLocalMode(TransferContract):
    backend_class = RsyncTransfer
    backend_name = "rsync"
    options = {"threads": 2}

    def location_url(self, tmp_path: Path) -> str:
        return "rsync:///"


class TestRsyncOverRemoteShell(TransferContract):
    backend_class = RsyncTransfer
    backend_name = "rsync"
    options = {"threads": 2, "ssh_command": f"{sys.executable} {FAKE_SSH}"}

    def location_url(self, tmp_path: Path) -> str:
        return f"rsync://{os.environ.get('USER', 'balsam')}@dtn.example.org"


SSHD = "/usr/sbin/sshd"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A private sshd on a free 127.0.0.1 port accepting one key for the current user; yields the
    ssh command line rsync should use."""
    if not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")):
        pytest.skip("no sshd installed (apt-get install openssh-server)")
    home = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)], check=True)
    (home / "authorized_keys").write_text((home / "user_key.pub").read_text())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (home / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {home / 'host_key'}\nPidFile {home / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {home / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(home / "sshd_config")], stderr=open(home / "sshd.log", "w"))
    ssh = (f"ssh -p {port} -i {home / 'user_key'} -o BatchMode=yes -o StrictHostKeyChecking=no "
           f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
    deadline = time.monotonic() + 20
    while True:
        probe = subprocess.run([*ssh.split(), f"{getpass.getuser()}@127.0.0.1", "true"], capture_output=True, text=True)
        if probe.returncode == 0:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.skip(f"sshd could not start or refused the key: {(home / 'sshd.log').read_text()[-300:]} {probe.stderr[-200:]}")
        time.sleep(0.2)
    yield ssh
    proc.terminate()
    proc.wait(10)


class TestRsyncOverSshd(TransferContract):
    """The rsync backend as a site uses it: rsync over ssh to user@host (here a private sshd)."""

    backend_class = RsyncTransfer
    backend_name = "rsync"

    @pytest.fixture
    def backend(self, sshd):
        backend = build_backend(RsyncTransfer, "rsync", {"threads": 2, "ssh_command": sshd})
        yield backend
        backend.close()

    def location_url(self, tmp_path: Path) -> str:
        return f"rsync://{getpass.getuser()}@127.0.0.1"


def test_protocols_name_their_backends() -> None:
    assert backend_name_for("file") == "local" and backend_name_for("GLOBUS") == "globus"
    loc = TransferLocation.parse("dtn", "rsync://me@dtn.example.org")
    assert (loc.protocol, loc.netloc, loc.backend_name) == ("rsync", "me@dtn.example.org", "rsync")
    with pytest.raises(TransferError, match="expected protocol://address"):
        TransferLocation.parse("bad", "dtn.example.org:/data")


def test_rsync_command_lines() -> None:
    opts = RsyncOptions(extra_args=["--bwlimit=10m"])
    loc = TransferLocation.parse("dtn", "rsync://me@dtn")
    line = rsync_command(opts, loc, TransferDirection.stage_in, TransferFile("/r/dir", "/s/job/dir", recursive=True))
    assert line == ["rsync", "--links", "--perms", "--times", "--protect-args", "--mkpath", "--recursive",
                    "--copy-unsafe-links", "--ignore-times", "-e", "ssh -o BatchMode=yes", "--bwlimit=10m", "--",
                    "me@dtn:/r/dir/", "/s/job/dir/"]
    out = rsync_command(opts, loc, TransferDirection.stage_out, TransferFile("/s/job/r.txt", "/r/out/r.txt"))
    assert out[-2:] == ["/s/job/r.txt", "me@dtn:/r/out/r.txt"] and "--recursive" not in out
    # A single file named by a symlink arrives as the file it names, not as a (dangling) link.
    assert "--copy-links" in out and "--copy-unsafe-links" not in out
    local = rsync_command(RsyncOptions(local_mode_for_localhost=True), TransferLocation.parse("l", "rsync://u@localhost"),
                          TransferDirection.stage_in, TransferFile("/a", "/b"))
    assert "-e" not in local and local[-2:] == ["/a", "/b"]


def test_rsync_program_is_this_sites_and_the_remote_one_is_chosen_through_extra_args() -> None:
    """``rsync`` names the program run here only (a path on this site need not exist on the remote
    host); ``--rsync-path`` reaches the remote host through extra_args, before the paths."""
    loc = TransferLocation.parse("dtn", "rsync://me@dtn")
    line = rsync_command(RsyncOptions(rsync="/opt/rsync/bin/rsync"), loc, TransferDirection.stage_in,
                         TransferFile("/r/a", "/s/a"))
    assert line[0] == "/opt/rsync/bin/rsync" and not any(arg.startswith("--rsync-path") for arg in line)
    line = rsync_command(RsyncOptions(extra_args=["--rsync-path=/usr/local/bin/rsync"]), loc,
                         TransferDirection.stage_out, TransferFile("/s/a", "/r/a"))
    assert line[line.index("--") - 1] == "--rsync-path=/usr/local/bin/rsync"
    assert line[-2:] == ["/s/a", "me@dtn:/r/a"]


def test_rsync_unreachable_host_is_one_line_per_file(tmp_path: Path) -> None:
    backend = build_backend(RsyncTransfer, "rsync", {"ssh_command": "false"})
    try:
        task = backend.submit(TransferLocation.parse("x", "rsync://me@nowhere"), TransferDirection.stage_in,
                              [TransferFile("/a", str(tmp_path / "a"))])
        status = wait_for_tasks(backend, [task])[task]
        assert status.state == TaskState.done and list(status.file_errors) == [str(tmp_path / "a")]
        assert status.file_errors[str(tmp_path / "a")].startswith("rsync exited")
    finally:
        backend.close()


def test_local_copy_of_a_directory_merges_into_an_existing_one(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "x").mkdir(parents=True)
    (src / "x" / "f").write_text("new")
    (dest / "x").mkdir(parents=True)
    (dest / "x" / "f").write_text("old")
    (dest / "other-input.txt").write_text("staged by another slot")
    (tmp_path / ".dest.balsam-partial-deadbeef").write_text("left by a killed agent")
    copy_into_place(src, dest, recursive=True)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["other-input.txt", "x", "x/f"]
    assert (dest / "x" / "f").read_text() == "new" and (dest / "other-input.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "src"]
    fresh = tmp_path / "fresh"
    copy_into_place(src, fresh, recursive=True)
    assert (fresh / "x" / "f").read_text() == "new"
    with pytest.raises(IsADirectoryError, match="not recursive"):
        copy_into_place(src, tmp_path / "other", recursive=False)


def test_stale_partials_are_matched_by_the_literal_name(tmp_path: Path) -> None:
    """The stale-partial glob was built from the raw name: copying into ``run[1].h5`` kept its own
    stale partial and deleted another copy's partial in progress (``[1]`` matched ``1``)."""
    (tmp_path / "src.h5").write_text("data")
    stale = tmp_path / ".run[1].h5.balsam-partial-aaaa"
    stale.write_text("left by a killed agent")
    other = tmp_path / ".run1.h5.balsam-partial-bbbb"
    other.write_text("another copy, in progress")
    copy_into_place(tmp_path / "src.h5", tmp_path / "run[1].h5", recursive=False)
    assert (tmp_path / "run[1].h5").read_text() == "data"
    assert not stale.exists()
    assert other.read_text() == "another copy, in progress"


def test_cancelling_a_local_task_mid_copy_writes_nothing_more(tmp_path: Path, monkeypatch) -> None:
    """Cancel used to refuse a started task ("cannot be stopped") and the copy landed anyway: now
    the file being copied is dropped before its rename and the rest of the batch is not copied."""
    import threading

    import balsam.builtin.local_transfer as local_transfer

    started, release = threading.Event(), threading.Event()
    real = local_transfer._copy_file

    def gated(src, dst, stop):
        started.set()
        release.wait(30)
        return real(src, dst, stop)

    monkeypatch.setattr(local_transfer, "_copy_file", gated)
    for name in ("a", "b"):
        (tmp_path / name).write_text(name)
    backend = build_backend(LocalTransfer, "local", {"threads": 1})
    try:
        task = backend.submit(TransferLocation.parse("here", "local://"), TransferDirection.stage_in, [
            TransferFile(str(tmp_path / "a"), str(tmp_path / "out" / "a")),
            TransferFile(str(tmp_path / "b"), str(tmp_path / "out" / "b")),
        ])
        # One thread: this one waits behind the first, and is cancelled before it starts.
        queued = backend.submit(TransferLocation.parse("here", "local://"), TransferDirection.stage_in, [
            TransferFile(str(tmp_path / "a"), str(tmp_path / "out" / "c"))])
        assert started.wait(30)
        backend.cancel(task)
        backend.cancel(queued)
        release.set()
        statuses = wait_for_tasks(backend, [task, queued])
        backend.cancel(task)  # finished: nothing left to cancel, no error
    finally:
        release.set()
        backend.close()
    assert {(s.state, s.error) for s in statuses.values()} == {(TaskState.failed, "cancelled")}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no file, no partial


def test_bad_backend_options_are_one_line() -> None:
    with pytest.raises(TransferError, match=r"transfers.backend_options.local.*thread"):
        build_backend(LocalTransfer, "local", {"thread": 3})
    with pytest.raises(TransferError, match="at least 1"):
        build_backend(LocalTransfer, "local", {"threads": 0})


def test_local_errors_are_filed_under_the_dest_the_agent_passed_with_a_prefix(tmp_path: Path) -> None:
    """local:///prefix: the copy goes to prefix + dest, but a failure is filed under dest itself (the
    key the agent looks its items up by). It was filed under the prefixed path, and the agent,
    finding no item with that dest, called the stage-out done with nothing copied."""
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (tmp_path / "result.txt").write_text("r")
    backend = build_backend(LocalTransfer, "local", {"threads": 1})
    try:
        task = backend.submit(TransferLocation.parse("proj", f"local://{prefix}"), TransferDirection.stage_out, [
            TransferFile(str(tmp_path / "missing.txt"), "/out/0.txt"),
            TransferFile(str(tmp_path / "result.txt"), "/out/1.txt"),
        ])
        status = wait_for_tasks(backend, [task])[task]
    finally:
        backend.close()
    assert status.state == TaskState.done and list(status.file_errors) == ["/out/0.txt"]
    assert "no such file or directory" in status.file_errors["/out/0.txt"]
    assert (prefix / "out" / "1.txt").read_text() == "r" and not (prefix / "out" / "0.txt").exists()


@pytest.mark.parametrize("direction", [TransferDirection.stage_in, TransferDirection.stage_out])
@pytest.mark.parametrize("remote_shell", [False, True], ids=["local-mode", "fake-ssh"])
def test_rsync_directory_in_a_non_recursive_slot_is_a_file_error(tmp_path: Path, direction, remote_shell) -> None:
    """rsync skips a directory source without --recursive ("skipping directory", exit 0): the slot
    was reported done with nothing copied. It is a file error, worded as the local backend's."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text("a")
    dest = tmp_path / "out" / "input"
    options = {"threads": 1, **({"ssh_command": f"{sys.executable} {FAKE_SSH}"} if remote_shell else {})}
    url = "rsync://me@dtn.example.org" if remote_shell else "rsync:///"
    backend = build_backend(RsyncTransfer, "rsync", options)
    try:
        task = backend.submit(TransferLocation.parse("x", url), direction,
                              [TransferFile(str(tmp_path / "dir"), str(dest), recursive=False)])
        status = wait_for_tasks(backend, [task])[task]
    finally:
        backend.close()
    assert status.state == TaskState.done
    assert status.file_errors == {str(dest): f"{tmp_path / 'dir'} is a directory (the transfer slot is not recursive)"}
    assert not dest.exists()


def test_rsync_port_goes_to_ssh_and_the_path_prefix_to_the_remote_path() -> None:
    """rsync://me@host:2222 became the remote path 'host:2222:/path' (a file named '2222:' on the
    remote home) and a path after the host was dropped."""
    opts = RsyncOptions()
    f = TransferFile("/s/job/r.txt", "/results/r.txt")
    port = rsync_command(opts, TransferLocation.parse("c", "rsync://me@dtn:2222"), TransferDirection.stage_out, f)
    assert port[port.index("-e") + 1] == "ssh -o BatchMode=yes -p 2222" and port[-2:] == ["/s/job/r.txt", "me@dtn:/results/r.txt"]
    prefix = rsync_command(opts, TransferLocation.parse("c", "rsync://me@dtn/scratch/"), TransferDirection.stage_in,
                           TransferFile("/in/a", "/s/job/a"))
    assert prefix[-2:] == ["me@dtn:/scratch/in/a", "/s/job/a"]
    local = rsync_command(opts, TransferLocation.parse("c", "rsync:///scratch"), TransferDirection.stage_out, f)
    assert "-e" not in local and local[-2:] == ["/s/job/r.txt", "/scratch/results/r.txt"]
    # A port means a connection, even where localhost would be copied locally.
    via_ssh = rsync_command(RsyncOptions(local_mode_for_localhost=True), TransferLocation.parse("c", "rsync://localhost:2222"),
                            TransferDirection.stage_out, f)
    assert "-e" in via_ssh and via_ssh[-1] == "localhost:/results/r.txt"


def test_rsync_port_and_prefix_through_a_remote_shell(tmp_path: Path, monkeypatch) -> None:
    """The real rsync over the stand-in ssh (its remote side starts in the current directory, as
    ssh starts in $HOME): the file lands at prefix + dest, nothing under the remote home, and a
    failure is filed under the dest the agent passed."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(home)
    (tmp_path / "r.txt").write_text("r")
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1, "ssh_command": f"{sys.executable} {FAKE_SSH}"})
    try:
        port = backend.submit(TransferLocation.parse("c", "rsync://me@dtn.example.org:2222"), TransferDirection.stage_out,
                              [TransferFile(str(tmp_path / "r.txt"), str(tmp_path / "results" / "x.txt"))])
        prefixed = backend.submit(TransferLocation.parse("c", f"rsync://me@dtn.example.org{tmp_path}/remote"),
                                  TransferDirection.stage_out,
                                  [TransferFile(str(tmp_path / "r.txt"), "/out/x.txt"),
                                   TransferFile(str(tmp_path / "missing.txt"), "/out/y.txt")])
        statuses = wait_for_tasks(backend, [port, prefixed])
    finally:
        backend.close()
    assert statuses[port].state == TaskState.done and not statuses[port].file_errors
    assert (tmp_path / "results" / "x.txt").read_text() == "r" and not any(home.iterdir())
    assert (tmp_path / "remote" / "out" / "x.txt").read_text() == "r" and not (tmp_path / "out").exists()
    assert list(statuses[prefixed].file_errors) == ["/out/y.txt"]


@pytest.mark.parametrize("url, problem", [
    ("local://scratch/inputs", "local:// takes no host, got 'scratch': write local:///scratch/inputs"),
    ("rsync://me@dtn:22x", "rsync://user@host[:port]: bad port '22x'"),
    ("rsync://me@", "bad rsync host 'me@'"),
    ("rsync://me@dtn::1", "bad rsync host"),
])
def test_builtin_backends_refuse_locations_they_cannot_honour(url: str, problem: str) -> None:
    location = TransferLocation.parse("x", url)
    backend = LocalTransfer if location.backend_name == "local" else RsyncTransfer
    with pytest.raises(TransferError, match=problem.replace("[", "\\[").replace("]", "\\]")) as err:
        backend.check_location(location)
    assert not err.value.retryable


@pytest.mark.parametrize("url", ["local://", "file:///scratch/in", "file://localhost/scratch", "rsync:///",
                                 "rsync://", "rsync://me@dtn", "rsync://me@dtn:2222/scratch", "rsync://me@[::1]:22"])
def test_builtin_backends_accept_well_formed_locations(url: str) -> None:
    location = TransferLocation.parse("x", url)
    (LocalTransfer if location.backend_name == "local" else RsyncTransfer).check_location(location)
