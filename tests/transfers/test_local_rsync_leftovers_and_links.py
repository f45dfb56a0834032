"""The ``local`` and ``rsync`` backends at scale (an audit with a real server, agent and rsync over
ssh):

- ``local``: a recursive item holding a symlink loop (A -> B -> A) raised RuntimeError from
  Path.resolve(), which failed the whole task: every file batched with it was charged a try (1 bad
  job failed 20 good ones). Now the loop is copied as links (as rsync does), and any error of one
  item fails that item only;
- ``local``: a directory copied into an existing one wrote through a symlinked subdirectory of the
  destination, into the link's target outside it. Now the link is replaced by a real directory,
  as rsync does;
- ``local``: a copy that succeeded removed every ``.NAME.balsam-partial-*`` next to its
  destination, the temporary of another copy to the same destination still in progress included
  (which then failed). Now only those of processes that no longer run are removed;
- ``rsync``: an rsync killed by SIGKILL (the OOM killer, the backend's own after its grace) left
  its temporary ``.NAME.XXXXXX`` at the destination for good, a successful retry included. Now a
  successful copy to a local destination removes those older than itself.

Nothing here measures time: waits have generous bounds only so that a regression fails instead of
hanging.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import balsam.builtin.local_transfer as lt
from balsam.builtin.rsync_transfer import RsyncTransfer
from balsam.states import TransferDirection
from balsam.testing import wait_for_tasks
from balsam.transfer import TaskState, TransferFile, TransferLocation, build_backend
from balsam.util import process_start_time

FAKE_SSH = Path(__file__).with_name("fake_ssh")


def run_local(files: list[TransferFile]):
    backend = build_backend(lt.LocalTransfer, "local", {"threads": 1})
    try:
        task = backend.submit(TransferLocation.parse("l", "local://"), TransferDirection.stage_in, files)
        return wait_for_tasks(backend, [task])[task]
    finally:
        backend.close()


def test_a_symlink_loop_is_copied_as_links_and_fails_nothing_else(tmp_path):
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "data.txt").write_text("d")
    os.symlink("B", loop / "A")
    os.symlink("A", loop / "B")
    (tmp_path / "good.txt").write_text("g")
    status = run_local([TransferFile(str(loop), str(tmp_path / "d1" / "loop"), recursive=True),
                        TransferFile(str(tmp_path / "good.txt"), str(tmp_path / "d2" / "good.txt"))])
    assert status.state == TaskState.done, status
    assert status.file_errors == {}
    assert (tmp_path / "d2" / "good.txt").read_text() == "g"
    copied = tmp_path / "d1" / "loop"
    assert (copied / "data.txt").read_text() == "d"
    assert os.readlink(copied / "A") == "B" and os.readlink(copied / "B") == "A"


def test_an_unexpected_error_of_one_item_fails_that_item_only(tmp_path, monkeypatch):
    (tmp_path / "bad.txt").write_text("b")
    (tmp_path / "good.txt").write_text("g")
    real = lt.copy_into_place

    def copy(src, dest, recursive, *, stop=None):
        if src.name == "bad.txt":
            raise RuntimeError("something no one expected")
        return real(src, dest, recursive, stop=stop)

    monkeypatch.setattr(lt, "copy_into_place", copy)
    bad, good = str(tmp_path / "out" / "bad.txt"), str(tmp_path / "out" / "good.txt")
    status = run_local([TransferFile(str(tmp_path / "bad.txt"), bad), TransferFile(str(tmp_path / "good.txt"), good)])
    assert status.state == TaskState.done, status
    assert status.file_errors == {bad: "RuntimeError: something no one expected"}
    assert Path(good).read_text() == "g"


def test_a_merge_replaces_a_symlinked_subdirectory_instead_of_writing_through_it(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("new")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "f.txt").write_text("precious")
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(precious, dest / "sub")
    lt.copy_into_place(src, dest, True)
    assert (precious / "f.txt").read_text() == "precious"
    assert not (dest / "sub").is_symlink()
    assert (dest / "sub" / "f.txt").read_text() == "new"


def test_a_merge_replaces_a_file_where_the_source_has_a_directory(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "g.txt").write_text("g")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").write_text("a file where the source has a directory")
    lt.copy_into_place(src, dest, True)
    assert (dest / "sub" / "g.txt").read_text() == "g"


def test_a_finished_copy_leaves_another_copy_in_progress_to_the_same_destination(tmp_path, monkeypatch):
    big, small = tmp_path / "big", tmp_path / "small"
    big.write_bytes(b"B" * 1000)
    small.write_bytes(b"S")
    dest = tmp_path / "out" / "same.bin"
    started, release = threading.Event(), threading.Event()
    real = lt._copy_file

    def held(src, dst, stop):
        real(src, dst, stop)
        if src == big:  # the big copy waits under its temporary name until the small one is done
            started.set()
            release.wait(30)

    monkeypatch.setattr(lt, "_copy_file", held)
    errors: list[BaseException] = []

    def copy_big():
        try:
            lt.copy_into_place(big, dest, False)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=copy_big)
    thread.start()
    assert started.wait(30)
    try:
        lt.copy_into_place(small, dest, False)
        assert dest.read_bytes() == b"S"
    finally:
        release.set()
        thread.join(30)
    assert errors == []
    assert dest.read_bytes() == b"B" * 1000
    assert sorted(p.name for p in dest.parent.iterdir()) == ["same.bin"]


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dest = tmp_path / "out" / "f.txt"
    dest.parent.mkdir()
    (tmp_path / "f.txt").write_text("new")
    host, me = socket.gethostname(), os.getpid()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone_pid = int(gone.stdout)
    prefix = f".f.txt{lt.PARTIAL_MARK}"
    names = {
        "live": f"{prefix}{host}-{me}-{int(process_start_time(me) * 1000)}-aaaaaaaaaaaa",
        "dead": f"{prefix}{host}-{gone_pid}-1000-bbbbbbbbbbbb",
        "recycled pid": f"{prefix}{host}-{me}-1000-cccccccccccc",
        "other host": f"{prefix}another-host-{me}-1000-dddddddddddd",
        "old name": f"{prefix}eeeeeeeeeeee",
    }
    for name in names.values():
        (dest.parent / name).write_text("partial")
    (dest.parent / f"{prefix}{host}-{gone_pid}-1000-ffffffffffff").mkdir()  # a directory's partial copy
    lt.copy_into_place(tmp_path / "f.txt", dest, False)
    assert dest.read_text() == "new"
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted(["f.txt", names["live"], names["other host"]])


def killing_rsync(tmp_path: Path) -> Path:
    """An ``rsync`` that leaves a temporary of its destination as rsync names it, then is SIGKILLed."""
    script = tmp_path / "rsync-killed"
    script.write_text('#!/bin/bash\nd="${@: -1}"\nd="${d%/}"\n'
                      'if [ -d "$d" ]; then mkdir -p "$d/sub"; echo half > "$d/sub/.g.txt.Q7x2Kp"\n'
                      'else mkdir -p "$(dirname "$d")"; echo half > "$(dirname "$d")/.$(basename "$d").VV5L5J"; fi\n'
                      'kill -9 $$\n')
    script.chmod(0o755)
    return script


def rsync_backend(rsync: str = "rsync"):
    return build_backend(RsyncTransfer, "rsync",
                         {"threads": 1, "rsync": rsync, "ssh_command": f"{sys.executable} {FAKE_SSH}"})


def run_rsync(backend, url: str, direction: TransferDirection, files: list[TransferFile]):
    try:
        task = backend.submit(TransferLocation.parse("r", url), direction, files)
        return wait_for_tasks(backend, [task])[task]
    finally:
        backend.close()


def test_a_retry_removes_the_temporary_of_a_sigkilled_rsync(tmp_path):
    src = tmp_path / "remote" / "big.bin"
    src.parent.mkdir()
    src.write_bytes(b"x" * 4096)
    dest = tmp_path / "dst" / "big.bin"
    (tmp_path / "dst").mkdir()
    item = TransferFile(str(src), str(dest))
    killed = run_rsync(rsync_backend(str(killing_rsync(tmp_path))), "rsync://me@somehost",
                       TransferDirection.stage_in, [item])
    assert killed.file_errors.keys() == {str(dest)}
    assert sorted(p.name for p in dest.parent.iterdir()) == [".big.bin.VV5L5J"]
    (dest.parent / ".big.bin.not_rsyncs").write_text("not rsync's name")
    (dest.parent / ".other.bin.AAAAAA").write_text("another file's")
    retried = run_rsync(rsync_backend(), "rsync://me@somehost", TransferDirection.stage_in, [item])
    assert retried.state == TaskState.done and retried.file_errors == {}, retried
    assert dest.read_bytes() == b"x" * 4096
    assert sorted(p.name for p in dest.parent.iterdir()) == [".big.bin.not_rsyncs", ".other.bin.AAAAAA", "big.bin"]


def test_a_retry_of_a_directory_removes_the_temporaries_in_its_tree(tmp_path):
    src = tmp_path / "results"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "g.txt").write_text("g")
    dest = tmp_path / "archive" / "results"
    dest.mkdir(parents=True)
    # A file of the destination's own that merely looks like a temporary, next to one the copy does
    # not write: not the copy's to remove.
    (dest / "keep.txt").write_text("k")
    (dest / ".keep.txt.ABCDEF").write_text("the user's")
    item = TransferFile(str(src), str(dest), recursive=True)
    killed = run_rsync(rsync_backend(str(killing_rsync(tmp_path))), "rsync:///", TransferDirection.stage_out, [item])
    assert killed.file_errors.keys() == {str(dest)}
    retried = run_rsync(rsync_backend(), "rsync:///", TransferDirection.stage_out, [item])
    assert retried.state == TaskState.done and retried.file_errors == {}, retried
    assert sorted(p.name for p in (dest / "sub").iterdir()) == ["g.txt"]
    assert sorted(p.name for p in dest.iterdir()) == [".keep.txt.ABCDEF", "keep.txt", "sub"]


def test_the_temporary_of_an_rsync_still_writing_is_left(tmp_path):
    """Another rsync to the same destination, writing while this one runs: its temporary changed
    after this copy started, so it is not a leftover."""
    src = tmp_path / "remote" / "f.txt"
    src.parent.mkdir()
    src.write_text("f")
    dest = tmp_path / "dst" / "f.txt"
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "f.txt").write_text("old")
    concurrent = tmp_path / "rsync-beside-another"
    concurrent.write_text(f'#!/bin/bash\necho writing > "{dest.parent}/.f.txt.Zz9Zz9"\nexec rsync "$@"\n')
    concurrent.chmod(0o755)
    status = run_rsync(rsync_backend(str(concurrent)), "rsync://me@somehost", TransferDirection.stage_in,
                       [TransferFile(str(src), str(dest))])
    assert status.state == TaskState.done and status.file_errors == {}, status
    assert dest.read_text() == "f"
    assert sorted(p.name for p in dest.parent.iterdir()) == [".f.txt.Zz9Zz9", "f.txt"]
