"""The ``local`` and ``rsync`` backends agree on a slot given the wrong kind of path: one error naming
the path, the same words from each, and nothing written.

An audit found them disagreeing:

- a recursive slot given a *file*: ``local`` wrote the file where the directory should be and
  reported it done; rsync failed with ``change_dir ... Not a directory``. Now both:
  ``<src> is not a directory (the transfer slot is recursive)``;
- a file slot whose destination is an existing *directory*: ``local`` refused (``destination ... is
  a directory``); rsync wrote ``<dir>/<name>``, a path the job never named, and reported it done.
  Now both refuse, with the local backend's words (over ssh a file is sent by name into the
  destination's directory, so rsync refuses a non-empty directory there);
- a missing source: rsync's ``--mkpath`` had created the destination's directories first, and left
  them. Now a source on this machine is looked at before rsync runs.

``rsync-ssh`` is the real rsync through the stand-in ssh of this folder (``fake_ssh``: the "remote"
host is this machine), ``rsync-local`` rsync's local mode (``rsync:///``).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from balsam.builtin.local_transfer import LocalTransfer
from balsam.builtin.rsync_transfer import RsyncTransfer, rsync_command
from balsam.states import TransferDirection
from balsam.testing import wait_for_tasks
from balsam.transfer import TaskState, TransferFile, TransferLocation, build_backend

FAKE_SSH = Path(__file__).with_name("fake_ssh")
#: Where the rsync backend makes the directories of the links a stage-out file is sent as, and their names.
LINKS_DIR, LINK_PREFIX = ".rsync-links", "balsam-rsync-link-"
BACKENDS = {
    "local": (LocalTransfer, "local", {"threads": 1}, "local://"),
    "rsync-local": (RsyncTransfer, "rsync", {"threads": 1}, "rsync:///"),
    "rsync-ssh": (RsyncTransfer, "rsync", {"threads": 1, "ssh_command": f"{sys.executable} {FAKE_SSH}"}, "rsync://me@dtn"),
}
DIRECTIONS = [TransferDirection.stage_in, TransferDirection.stage_out]


def run(kind: str, direction: TransferDirection, f: TransferFile):
    cls, name, options, url = BACKENDS[kind]
    backend = build_backend(cls, name, options)
    try:
        task = backend.submit(TransferLocation.parse("x", url), direction, [f])
        return wait_for_tasks(backend, [task], timeout=60)[task]
    finally:
        backend.close()


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("direction", DIRECTIONS, ids=["in", "out"])
@pytest.mark.parametrize("kind", BACKENDS)
def test_a_recursive_slot_given_a_file_is_one_error_and_writes_nothing(tmp_path: Path, kind: str, direction) -> None:
    src = tmp_path / "src" / "data.txt"
    src.parent.mkdir()
    src.write_text("a file, not a directory\n")
    dest = tmp_path / "dst" / "results"
    status = run(kind, direction, TransferFile(str(src), str(dest), recursive=True))
    assert status.state == TaskState.done
    assert dict(status.file_errors) == {str(dest): f"{src} is not a directory (the transfer slot is recursive)"}
    assert not dest.exists()


@pytest.mark.parametrize("direction", DIRECTIONS, ids=["in", "out"])
@pytest.mark.parametrize("kind", BACKENDS)
def test_a_file_slot_whose_destination_is_a_directory_is_one_error_and_writes_nothing(tmp_path: Path, kind: str,
                                                                                      direction) -> None:
    src = tmp_path / "src" / "out.txt"
    src.parent.mkdir()
    src.write_text("result\n")
    dest = tmp_path / "dst" / "out.txt"
    dest.mkdir(parents=True)
    (dest / "keep.txt").write_text("kept\n")
    status = run(kind, direction, TransferFile(str(src), str(dest)))
    assert status.state == TaskState.done
    assert dict(status.file_errors) == {str(dest): f"destination {dest} is a directory"}
    assert tree(dest) == ["keep.txt"] and (dest / "keep.txt").read_text() == "kept\n"


@pytest.mark.parametrize("kind, direction", [(k, d) for k in BACKENDS for d in DIRECTIONS
                                             # A remote source is rsync's to report (in its words,
                                             # and it creates nothing first).
                                             if (k, d) != ("rsync-ssh", TransferDirection.stage_in)],
                         ids=lambda v: v if isinstance(v, str) else v.value)
@pytest.mark.parametrize("recursive", [False, True], ids=["file", "directory"])
def test_a_missing_source_is_one_error_and_creates_no_directory(tmp_path: Path, kind: str, direction,
                                                                recursive: bool) -> None:
    src = tmp_path / "src" / "missing"
    (tmp_path / "dst").mkdir()
    dest = tmp_path / "dst" / "new" / "sub" / "out"
    status = run(kind, direction, TransferFile(str(src), str(dest), recursive=recursive))
    assert status.state == TaskState.done
    assert dict(status.file_errors) == {str(dest): f"no such file or directory: {src}"}
    assert tree(tmp_path / "dst") == []


def test_over_ssh_a_file_item_lands_at_the_path_the_job_named(tmp_path: Path) -> None:
    """A stage-out over ssh is sent by name into its destination's directory: the file lands at the
    destination (created with its directories), under its destination's name, not its source's."""
    src = tmp_path / "job" / "result.txt"
    src.parent.mkdir()
    src.write_text("r\n")
    dest = tmp_path / "dst" / "a" / "b" / "renamed.txt"
    status = run("rsync-ssh", TransferDirection.stage_out, TransferFile(str(src), str(dest)))
    assert status.state == TaskState.done and not status.file_errors, status
    assert dest.read_text() == "r\n" and tree(tmp_path / "dst") == ["a", "a/b", "a/b/renamed.txt"]


@pytest.mark.parametrize("direction", DIRECTIONS, ids=["in", "out"])
@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("what", ["link-to-directory", "link-to-empty-directory", "empty-directory"])
def test_a_file_destination_that_is_a_link_to_a_directory_or_an_empty_one_is_refused(tmp_path: Path, kind: str,
                                                                                   direction, what: str) -> None:
    """Review: over ssh a stage-out file replaced a symbolic link to a directory at its destination
    (and an empty directory) with itself, silently, where ``local`` and ``rsync:///`` refuse both
    (``destination ... is a directory``). Now the host is asked what the destination is first."""
    src = tmp_path / "src" / "out.txt"
    src.parent.mkdir()
    src.write_text("result\n")
    real = tmp_path / "dst" / "real"
    real.mkdir(parents=True)
    if what == "link-to-directory":
        (real / "keep.txt").write_text("kept\n")
    dest = tmp_path / "dst" / "out.txt"
    if what == "empty-directory":
        dest.mkdir()
    else:
        dest.symlink_to(real)
    status = run(kind, direction, TransferFile(str(src), str(dest)))
    assert status.state == TaskState.done
    assert dict(status.file_errors) == {str(dest): f"destination {dest} is a directory"}
    assert dest.is_symlink() == (what != "empty-directory") and dest.is_dir()
    assert tree(real) == (["keep.txt"] if what == "link-to-directory" else [])


@pytest.mark.parametrize("direction", DIRECTIONS, ids=["in", "out"])
@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("ending, exists", [("/", False), ("/", True), ("/.", True)],
                         ids=["slash-missing", "slash-existing", "dot-existing"])
def test_a_file_destination_written_as_a_directory_name_is_refused(tmp_path: Path, kind: str, direction, ending: str,
                                                                   exists: bool) -> None:
    """Review: a file item's destination ``.../outdir/`` (or ``.../outdir/.``) over ssh wrote
    ``outdir/outdir`` (the name from PurePosixPath, the directory from the raw path; ``/.`` wrote
    ``outdir``'s parent's ``outdir``); rsync:/// wrote ``outdir/<source name>``; local a file
    ``outdir``. Each now refuses it, naming it, and writes nothing."""
    src = tmp_path / "src" / "result.txt"
    src.parent.mkdir()
    src.write_text("r\n")
    (tmp_path / "dst").mkdir()
    if exists:
        (tmp_path / "dst" / "outdir").mkdir()
    dest = f"{tmp_path / 'dst' / 'outdir'}{ending}"
    status = run(kind, direction, TransferFile(str(src), dest))
    assert status.state == TaskState.done
    assert dict(status.file_errors) == {dest: f"destination {dest} names a directory (the transfer slot is not recursive)"}
    assert tree(tmp_path / "dst") == (["outdir"] if exists else [])


def test_the_ssh_command_line_is_never_built_for_a_file_destination_named_as_a_directory() -> None:
    cls, name, options, url = BACKENDS["rsync-ssh"]
    backend = build_backend(cls, name, options)
    try:
        with pytest.raises(ValueError, match="names a directory"):
            rsync_command(backend.options, TransferLocation.parse("x", url), TransferDirection.stage_out,
                          TransferFile("/job/out.txt", "/dst/outdir/"), "/tmp/l/outdir")
    finally:
        backend.close()


def test_a_source_gone_when_rsync_runs_is_named_not_the_link_sent_for_it(tmp_path: Path, monkeypatch) -> None:
    """Review: a stage-out source that disappears after the backend looked at it (or cannot be
    read) failed with rsync's words about the link it is sent as (``/tmp/balsam-rsync-link-*/out.txt``),
    a path the job never named. Now the error names the source."""
    monkeypatch.setattr(RsyncTransfer, "_local_problem", lambda self, *args: "")  # gone after the look
    src = tmp_path / "job" / "gone.txt"
    dest = tmp_path / "dst" / "out.txt"
    status = run("rsync-ssh", TransferDirection.stage_out, TransferFile(str(src), str(dest)))
    (error,) = status.file_errors.values()
    assert f'"{src}"' in error and "balsam-rsync-link" not in error, error
    assert not dest.exists()


def test_link_directories_live_in_the_site_and_a_dead_agents_are_removed(tmp_path: Path, monkeypatch) -> None:
    """Review: the directory of the link a stage-out file is sent as was made in TMPDIR and stayed
    there for good when the agent was SIGKILLed; a full or unwritable TMPDIR failed every stage-out
    with a traceback's words. Now they are made in the site (``.rsync-links``), those of dead
    processes of this host are removed when the backend is built (a running one's stay), and when
    none can be made the file's error names each directory tried."""
    site = tmp_path / "site"
    site.mkdir()
    cls, name, options, url = BACKENDS["rsync-ssh"]
    host = socket.gethostname()
    links = site / LINKS_DIR
    links.mkdir()
    dead = links / f"{LINK_PREFIX}{host}-{os.getpid()}-1-abc_12"  # this pid, another start time: gone
    (dead / "out.txt").mkdir(parents=True)
    other_host = links / f"{LINK_PREFIX}elsewhere-{os.getpid()}-1-abc_12"
    other_host.mkdir()
    first = build_backend(cls, name, options, site_path=str(site))
    try:
        alive = Path(first._links.make())
        assert alive.parent == links
        second = build_backend(cls, name, options, site_path=str(site))
        second.close()
        assert not dead.exists() and alive.is_dir() and other_host.is_dir()
        src = tmp_path / "job" / "out.txt"
        src.parent.mkdir()
        src.write_text("r\n")
        dest = tmp_path / "dst" / "out.txt"
        task = first.submit(TransferLocation.parse("x", url), TransferDirection.stage_out, [TransferFile(str(src), str(dest))])
        assert not wait_for_tasks(first, [task], timeout=60)[task].file_errors and dest.read_text() == "r\n"
        assert sorted(links.iterdir()) == sorted([alive, other_host])  # the file's own was removed after
    finally:
        first.close()
    # Neither the site's nor the temporary directory can hold one: one error naming both.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "afile" / "tmp"))
    (tmp_path / "afile").write_text("not a directory\n")
    broken_site = tmp_path / "site2"
    broken_site.mkdir()
    (broken_site / LINKS_DIR).write_text("not a directory\n")
    backend = build_backend(cls, name, options, site_path=str(broken_site))
    try:
        task = backend.submit(TransferLocation.parse("x", url), TransferDirection.stage_out,
                              [TransferFile(str(src), str(tmp_path / "dst2" / "out.txt"))])
        (error,) = wait_for_tasks(backend, [task], timeout=60)[task].file_errors.values()
    finally:
        backend.close()
    assert error.startswith("cannot make a directory for the link a stage-out file is sent as (")
    assert str(broken_site / LINKS_DIR) in error and str(tmp_path / "afile" / "tmp") in error
    assert not (tmp_path / "dst2").exists()


def test_over_ssh_the_destinations_of_a_task_are_looked_at_with_one_connection(tmp_path: Path) -> None:
    """The check of the destinations (see the test above) lists them all with one rsync per task:
    a link to a directory named with wildcard characters, or reached through ``/./``, is found as
    well, and the other files of the task are written."""
    log = tmp_path / "ssh.log"
    ssh = tmp_path / "ssh-logged"
    ssh.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {sys.executable} {FAKE_SSH} "$@"\n')
    ssh.chmod(0o755)
    src = tmp_path / "job" / "out.txt"
    src.parent.mkdir()
    src.write_text("r\n")
    real = tmp_path / "dst" / "real"
    real.mkdir(parents=True)
    for name in ("link", "run[1].h5"):
        (tmp_path / "dst" / name).symlink_to(real)
    dests = [str(tmp_path / "dst" / "plain.txt"), str(tmp_path / "dst" / "link"), str(tmp_path / "dst" / "run[1].h5"),
             f"{tmp_path / 'dst'}/./link", str(tmp_path / "dst" / "new" / "file.txt")]
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1, "ssh_command": str(ssh)})
    try:
        task = backend.submit(TransferLocation.parse("x", "rsync://me@dtn"), TransferDirection.stage_out,
                              [TransferFile(str(src), d) for d in dests])
        status = wait_for_tasks(backend, [task], timeout=60)[task]
    finally:
        backend.close()
    assert dict(status.file_errors) == {d: f"destination {d} is a directory" for d in dests[1:4]}
    assert (tmp_path / "dst" / "plain.txt").read_text() == "r\n" and (tmp_path / "dst" / "new" / "file.txt").read_text() == "r\n"
    assert tree(real) == [] and (tmp_path / "dst" / "link").is_symlink()
    assert len(log.read_text().splitlines()) == 3  # the look at all five, then the two copies


def test_over_ssh_a_host_that_does_not_answer_the_look_at_the_destinations_spares_then_charges(tmp_path: Path) -> None:
    """No file ran when the look at the destinations got no answer: the first time the task's files
    go back without a try, the second time in a row (no answer in between) they fail one."""
    src = tmp_path / "job" / "out.txt"
    src.parent.mkdir()
    src.write_text("r\n")
    files = [TransferFile(str(src), str(tmp_path / "dst" / f"{n}.txt")) for n in ("a", "b")]
    cls, name, options, _ = BACKENDS["rsync-ssh"]
    backend = build_backend(cls, name, options)
    try:
        statuses = []
        for _ in range(2):
            task = backend.submit(TransferLocation.parse("x", "rsync://me@unreachable"), TransferDirection.stage_out, files)
            statuses.append(wait_for_tasks(backend, [task], timeout=60)[task])
    finally:
        backend.close()
    first, second = statuses
    assert first.info.get("not_tried") == [f.dest for f in files]
    assert first.file_errors[files[0].dest].startswith("not tried: looking at the destinations on me@unreachable failed: "
                                                        "rsync exited 255: ssh: connect to host unreachable")
    assert "not_tried" not in second.info and set(second.file_errors) == {f.dest for f in files}
    assert second.file_errors[files[1].dest].endswith(", the second rsync in a row to me@unreachable that got no answer")
    assert not (tmp_path / "dst").exists()
