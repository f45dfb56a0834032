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
import shutil
import socket
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from balsam.builtin.local_transfer import LocalTransfer
from balsam.builtin.rsync_transfer import RemoteNameError, RsyncTransfer, rsync_command
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


@pytest.mark.parametrize("name", ["out.txt", "out  put.txt"], ids=["plain", "two-spaces"])
def test_a_source_gone_when_rsync_runs_is_named_not_the_link_sent_for_it(tmp_path: Path, monkeypatch,
                                                                        name: str) -> None:
    """Review: a stage-out source that disappears after the backend looked at it (or cannot be
    read) failed with rsync's words about the link it is sent as (``/tmp/balsam-rsync-link-*/out.txt``),
    a path the job never named. Now the error names the source; also when the error is made one
    line (two spaces in the name became one first, and the link was no longer found in it)."""
    monkeypatch.setattr(RsyncTransfer, "_local_problem", lambda self, *args: "")  # gone after the look
    src = tmp_path / "job" / "gone.txt"
    dest = tmp_path / "dst" / name
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
    links.chmod(0o775)  # (an earlier agent's, made with the default mode under umask 002)
    first = build_backend(cls, name, options, site_path=str(site))
    try:
        alive = Path(first._links.make())
        assert alive.parent == links
        # Only this user may write in it (another could swap a link directory for one of theirs).
        assert stat.S_IMODE(links.stat().st_mode) == 0o700
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


def test_a_new_sites_link_directory_is_private_and_another_users_is_not_used(tmp_path: Path, monkeypatch) -> None:
    """Review: the site's ``.rsync-links`` was made with the default mode (group-writable under
    umask 002, no sticky bit). Now it is made 0700, and one owned by another user is not used."""
    from balsam.builtin.rsync_transfer import LinkDirs

    site = tmp_path / "site"
    site.mkdir()
    old = os.umask(0o002)
    try:
        made = Path(LinkDirs(str(site)).make())
    finally:
        os.umask(old)
    assert made.parent == site / LINKS_DIR and stat.S_IMODE((site / LINKS_DIR).stat().st_mode) == 0o700
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)  # the directory is now another user's
    elsewhere = Path(LinkDirs(str(site)).make())
    monkeypatch.undo()
    assert elsewhere.parent == Path(tempfile.gettempdir())
    os.rmdir(elsewhere)


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


def logged_ssh(tmp_path: Path, case: str = "") -> tuple[str, Path]:
    """The stand-in ssh, logging each command line, and first running the shell ``case`` (on "$*")."""
    log = tmp_path / "ssh.log"
    ssh = tmp_path / "ssh-logged"
    ssh.write_text(f'#!/bin/sh\necho "$*" >> {log}\n{case}\nexec {sys.executable} {FAKE_SSH} "$@"\n')
    ssh.chmod(0o755)
    return str(ssh), log


#: The remote command of each rsync over ssh (the stand-in ssh sees it): the look at a task's
#: destinations, a stage-in's copy (the host sends), a stage-out's copy (the host receives).
LISTING, STAGE_IN, STAGE_OUT = r"*--sender\ -sdkR*", r"*--sender\ -slLtp*", r"*--server\ -sltp*"


def test_stage_outs_whose_destinations_cannot_be_looked_at_are_copied_and_use_their_tries(tmp_path: Path,
                                                                                           caplog) -> None:
    """Review: when the look at the destinations got no answer (a hung directory there), no file
    ran and none used a try while an rsync to the host answered in between (a stage-in), so
    stage-outs went round for ever: after 6 rounds no try used, still pending (before the look,
    they failed out after ``max_attempts``). Now the files are
    copied unchecked (one WARNING per task), each failing on its own: the items end in error after
    ``max_attempts`` tries. (The listing hangs until ``timeout_sec`` kills it; the stage-out copies
    fail as ssh does, exit 255; the stage-ins work. Tries counted as the transfers module does: a
    file error not listed ``not_tried``.)"""
    ssh, log = logged_ssh(tmp_path, f'case "$*" in {LISTING}) exec sleep 300;; {STAGE_OUT}) '
                                    'echo "ssh: connect to host dtn port 22: Connection refused" >&2; exit 255;; esac')
    src = tmp_path / "job" / "out.txt"
    src.parent.mkdir()
    src.write_text("r\n")
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "in.txt").write_text("i\n")
    outs = {n: TransferFile(str(src), str(tmp_path / "dst" / f"{n}.txt")) for n in "ab"}
    stage_in = [TransferFile(str(tmp_path / "remote" / "in.txt"), str(tmp_path / "job" / "in.txt"))]
    max_attempts, tries, pending = 1, {n: 0 for n in outs}, list(outs)
    location = TransferLocation.parse("x", "rsync://me@dtn")
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1, "timeout_sec": 1, "ssh_command": ssh})
    try:
        for _ in range(3 * max_attempts * len(outs)):  # (at least one try used per round: 2 rounds)
            if not pending:
                break
            task = backend.submit(location, TransferDirection.stage_out, [outs[n] for n in pending])
            status = wait_for_tasks(backend, [task], timeout=60)[task]
            for n in list(pending):
                if outs[n].dest in status.file_errors and outs[n].dest not in status.info.get("not_tried", []):
                    # (255, or 12 or 10 when rsync sees the closed pipe first: see CONNECTION_FAILED)
                    assert ": ssh: connect to host dtn port 22: Connection refused" in status.file_errors[outs[n].dest]
                    tries[n] += 1
                    if tries[n] == max_attempts:
                        pending.remove(n)
            task = backend.submit(location, TransferDirection.stage_in, stage_in)
            assert not wait_for_tasks(backend, [task], timeout=60)[task].file_errors
    finally:
        backend.close()
    assert pending == [] and tries == {"a": 1, "b": 1}
    lines = log.read_text().splitlines()
    assert sum("--sender -sdkR" in line for line in lines) == 2  # a look per stage-out task
    assert sum("--server -sltp" in line for line in lines) == 2  # one copy per try (b spared in the first)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and warnings[0].startswith(
        "rsync: could not look at the destinations of 2 stage-out file(s) on me@dtn (no answer within 1 s): they are "
        "copied without checking")


def test_a_missing_rsync_program_fails_each_stage_out_saying_so(tmp_path: Path, caplog) -> None:
    """Review: with ``rsync`` naming a program that does not exist, a stage-out task failed with
    ``IndexError: list index out of range`` (the look at its destinations could not start). Now it
    is the stage-in's error: ``cannot run '...': not found on PATH``, for each file."""
    src = tmp_path / "job" / "out.txt"
    src.parent.mkdir()
    src.write_text("r\n")
    missing = str(tmp_path / "no" / "rsync")
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1, "rsync": missing,
                                                     "ssh_command": f"{sys.executable} {FAKE_SSH}"})
    files = [TransferFile(str(src), str(tmp_path / "dst" / f"{n}.txt")) for n in "ab"]
    try:
        task = backend.submit(TransferLocation.parse("x", "rsync://me@dtn"), TransferDirection.stage_out, files)
        status = wait_for_tasks(backend, [task], timeout=60)[task]
    finally:
        backend.close()
    assert status.state == TaskState.done, status
    assert dict(status.file_errors) == {f.dest: f"cannot run {missing!r}: not found on PATH" for f in files}
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"rsync: could not look at the destinations of 2 stage-out file(s) on me@dtn (cannot run {missing!r}: No such "
        "file or directory): they are copied without checking for a directory or a link to one there (which the file "
        "would replace)"]


def test_the_destinations_of_a_big_task_are_looked_at_500_at_a_time(tmp_path: Path) -> None:
    """Review: rsync's client fails past about 990 paths (``internal: args[] overflowed in
    do_cmd()``, exit 1), and that was taken for "no directory there": a link to a directory among
    1000 destinations was not found (and 4000 long paths, over the system's limit on arguments,
    failed the task with an IndexError). Now at most 500 paths go to one listing, and only rsync's
    0, 23 and 24 count as a listing."""
    (tmp_path / "dst" / "real").mkdir(parents=True)
    (tmp_path / "dst" / "link").symlink_to(tmp_path / "dst" / "real")
    files = [TransferFile("/job/out.txt", str(tmp_path / "dst" / f"f{i:04d}.txt")) for i in range(1000)]
    files.append(TransferFile("/job/out.txt", str(tmp_path / "dst" / "link")))
    backend = build_backend(*BACKENDS["rsync-ssh"][:3])
    try:
        found = backend._remote_directories(TransferLocation.parse("x", "rsync://me@dtn"), TransferDirection.stage_out,
                                            files)
    finally:
        backend.close()
    assert found == {os.fsencode(str(tmp_path / "dst" / "link").lstrip("/"))}


def test_a_listing_rsync_refuses_is_no_listing_and_its_files_are_copied(tmp_path: Path, caplog) -> None:
    """An ``rsync --list-only`` exiting 1 (a usage error) was taken for "no directory there": now
    the files are copied unchecked, with one WARNING saying so."""
    rsync = tmp_path / "rsync-no-listing"
    rsync.write_text('#!/bin/sh\ncase "$*" in *--list-only*) echo "internal: args[] overflowed in do_cmd()" >&2; '
                     f'exit 1;; esac\nexec {shutil.which("rsync")} "$@"\n')
    rsync.chmod(0o755)
    src = tmp_path / "job" / "out.txt"
    src.parent.mkdir()
    src.write_text("r\n")
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1, "rsync": str(rsync),
                                                     "ssh_command": f"{sys.executable} {FAKE_SSH}"})
    try:
        task = backend.submit(TransferLocation.parse("x", "rsync://me@dtn"), TransferDirection.stage_out,
                              [TransferFile(str(src), str(tmp_path / "dst" / "out.txt"))])
        status = wait_for_tasks(backend, [task], timeout=60)[task]
    finally:
        backend.close()
    assert not status.file_errors and (tmp_path / "dst" / "out.txt").read_text() == "r\n"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "(rsync exited 1: internal: args[] overflowed in do_cmd()): they are copied without checking" in warning


def test_the_look_at_the_destinations_is_given_no_extra_argument_of_a_copy() -> None:
    """Review: the listing got all of ``extra_args``: ``-a`` made it recurse into each directory
    there (links to one too), ``--exclude`` hid a destination from it. Now it keeps those that say
    how to reach and run the remote rsync."""
    from balsam.builtin.rsync_transfer import _looking_args

    assert _looking_args(["-a", "--exclude=link", "--rsync-path=/opt/rsync", "--timeout", "30", "-4", "--bwlimit=5m",
                          "--files-from", "list", "--contimeout=5", "--rsync-path"]) == [
        "--rsync-path=/opt/rsync", "--timeout", "30", "-4", "--contimeout=5", "--rsync-path"]


def test_over_ssh_a_link_to_a_directory_is_found_however_its_path_is_spelled(tmp_path: Path) -> None:
    """Review: the look at the destinations missed a link to a directory written ``dst/./link`` or
    ``/./dst/link`` (rsync lists the name after ``/./``), named with a newline or a carriage return
    (listed escaped, ``\\#012``) or with a backslash and a wildcard (not listed), and the file replaced
    it. Now each is refused, with one listing."""
    ssh, log = logged_ssh(tmp_path)
    src = tmp_path / "job" / "out.txt"
    src.parent.mkdir()
    src.write_text("r\n")
    real = tmp_path / "dst" / "real"
    real.mkdir(parents=True)
    names = ["dot", "top", "new\nline", "cr\rx", "bs\\[1]", "hash\\#101", "tab\tx", "r\u00e9sum\u00e9", "trail "]
    for name in names:
        (tmp_path / "dst" / name).symlink_to(real)
    dests = [f"{tmp_path / 'dst'}/./dot", f"{tmp_path}/./dst/top", *(str(tmp_path / "dst" / n) for n in names[2:]),
             str(tmp_path / "dst" / "bs[1]")]
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1, "ssh_command": ssh})
    try:
        task = backend.submit(TransferLocation.parse("x", "rsync://me@dtn"), TransferDirection.stage_out,
                              [TransferFile(str(src), d) for d in dests])
        status = wait_for_tasks(backend, [task], timeout=60)[task]
    finally:
        backend.close()
    assert dict(status.file_errors) == {d: f"destination {d} is a directory" for d in dests[:-1]}
    assert all((tmp_path / "dst" / n).is_symlink() for n in names) and tree(real) == []
    assert (tmp_path / "dst" / "bs[1]").read_text() == "r\n"  # (listed with bs\[1]: not taken for it)
    assert len(log.read_text().split("rsync --server")) == 3  # the look at all, then the one copy


def test_a_stage_out_name_too_long_to_link_is_that_files_error_not_its_tasks(tmp_path: Path) -> None:
    """Review: a stage-out over ssh whose destination's name is over 255 bytes failed its whole task
    (``OSError: [Errno 36] File name too long`` making the link it is sent as): its batch mates,
    copied, were charged a try with it and ended in error. Now it is that file's error."""
    src = tmp_path / "job" / "out.txt"
    src.parent.mkdir()
    src.write_text("r\n")
    good, long = (TransferFile(str(src), str(tmp_path / "dst" / name)) for name in ("good.txt", "x" * 256))
    backend = build_backend(*BACKENDS["rsync-ssh"][:3])
    try:
        task = backend.submit(TransferLocation.parse("x", "rsync://me@dtn"), TransferDirection.stage_out, [good, long])
        status = wait_for_tasks(backend, [task], timeout=60)[task]
    finally:
        backend.close()
    assert status.state == TaskState.done, status
    assert dict(status.file_errors) == {long.dest: "cannot make the link the file is sent as, named as its destination "
                                                   f"(File name too long): {long.dest}"}
    assert (tmp_path / "dst" / "good.txt").read_text() == "r\n"
    assert "not_tried" not in status.info


@pytest.mark.parametrize("direction", DIRECTIONS, ids=["in", "out"])
def test_an_rsync_program_that_cannot_run_fails_each_file_saying_so(tmp_path: Path, direction) -> None:
    """Review: an ``rsync`` option naming a file that is not executable failed every task with
    ``PermissionError`` (only a missing program was a file error). Now each file says why."""
    rsync = tmp_path / "rsync"
    rsync.write_text("#!/bin/sh\n")
    rsync.chmod(0o644)
    (tmp_path / "remote").mkdir()
    (tmp_path / "job").mkdir()
    for side in ("remote", "job"):
        (tmp_path / side / "f.txt").write_text("f\n")
    other = "job" if direction == TransferDirection.stage_in else "remote"
    files = [TransferFile(str(tmp_path / ("remote" if other == "job" else "job") / "f.txt"), str(tmp_path / other / n))
             for n in ("a.txt", "b.txt")]
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1, "rsync": str(rsync),
                                                     "ssh_command": f"{sys.executable} {FAKE_SSH}"})
    try:
        task = backend.submit(TransferLocation.parse("x", "rsync://me@dtn"), direction, files)
        status = wait_for_tasks(backend, [task], timeout=60)[task]
    finally:
        backend.close()
    assert status.state == TaskState.done, status
    assert dict(status.file_errors) == {f.dest: f"cannot run {str(rsync)!r}: Permission denied" for f in files}


def _long_path(base: Path, size: int, tail: str = "") -> str:
    """A path under ``base`` of ``size`` bytes (``tail`` included), in components of at most 200 bytes."""
    path = str(base)
    while len(path) + len(tail) < size:
        path += "/" + "y" * min(200, size - len(path) - len(tail) - 1)
    assert len(path + tail) == size
    return path + tail


@pytest.mark.parametrize("direction, recursive", [(TransferDirection.stage_out, False), (TransferDirection.stage_out, True),
                                                  (TransferDirection.stage_in, False)],
                         ids=["out-file", "out-directory", "in-file"])
def test_a_remote_path_the_remote_rsync_would_cut_is_refused(tmp_path: Path, direction, recursive: bool) -> None:
    """Review: a stage-out over ssh to a remote directory of 4,096 bytes or more was written at a
    path cut at 4,095 bytes (the remote rsync cuts a protected argument at MAXPATHLEN, silently) and
    reported done; a stage-in fetched the file at the cut path. Now such a remote path is that
    file's error, naming the limit; nothing is written."""
    job = tmp_path / "job"
    (job / "tree").mkdir(parents=True)
    (job / "tree" / "a.txt").write_text("a\n")
    (job / "out.txt").write_text("r\n")
    stage_out = direction == TransferDirection.stage_out
    remote = _long_path(tmp_path / "dst", 5000, "" if recursive else "/out.txt" if stage_out else "/in.txt")
    if stage_out:
        f = TransferFile(str(job / ("tree" if recursive else "out.txt")), remote, recursive=recursive)
    else:
        # What the remote rsync fetched instead: the file at the path cut to 4,095 bytes.
        cut = Path(remote[:4095])
        cut.parent.mkdir(parents=True)
        cut.write_text("not the file the job named\n")
        f = TransferFile(remote, str(job / "in.txt"))
    status = run("rsync-ssh", direction, f)
    assert status.state == TaskState.done, status
    assert list(status.file_errors) == [f.dest]
    assert status.file_errors[f.dest].startswith(
        f"rsync over ssh cannot {'write' if stage_out else 'fetch'} a remote path of 4096 bytes or more exactly (the "
        "remote rsync cuts it to 4095, MAXPATHLEN less one, and uses that); this one is ")
    written = [p for p in (tmp_path / "dst").rglob("*") if p.is_file()]
    assert written == ([] if stage_out else [cut]) and not (job / "in.txt").exists()


def test_the_remote_path_argument_may_be_4095_bytes_not_4096() -> None:
    location = TransferLocation.parse("x", "rsync://me@dtn")
    for size, refused in ((4095, False), (4096, True)):
        dest = "/" + "d" * (size - 2) + "/"  # (a recursive item's destination: passed as it is)
        f = TransferFile("/job/tree", dest, recursive=True)
        if refused:
            with pytest.raises(RemoteNameError, match="this one is 4096 bytes"):
                rsync_command(RsyncTransfer.options_schema(), location, TransferDirection.stage_out, f)
        else:
            assert rsync_command(RsyncTransfer.options_schema(), location, TransferDirection.stage_out,
                                 f)[-1] == f"me@dtn:{dest}"


def test_the_look_at_the_destinations_and_the_host_check_keep_the_remote_shell_of_extra_args() -> None:
    """Review: ``--rsh``/``-e`` in ``extra_args`` was dropped from the listing and the host check,
    which then went through ``ssh_command`` (that could not log in). Kept in all its spellings, after
    ``-e ssh_command``: the last one wins, as in a copy."""
    from balsam.builtin.rsync_transfer import _looking_args

    assert _looking_args(["-a", "--rsh", "ssh -i key", "--rsh=ssh -i k2", "-e", "ssh -i k3", "-essh -i k4",
                          "--exclude=x", "-v"]) == ["--rsh", "ssh -i key", "--rsh=ssh -i k2", "-e", "ssh -i k3",
                                                    "-essh -i k4"]


@pytest.mark.parametrize("spelling", ["--rsh X", "-eX"])
def test_a_remote_shell_set_in_extra_args_reaches_the_host_for_the_look_and_the_check(tmp_path: Path,
                                                                                      spelling: str, caplog) -> None:
    """The end of the above: with ``ssh_command`` failing (exit 255) and the working ssh named in
    ``extra_args``, a link to a directory there is found (not replaced) and the host answers a check."""
    failing = tmp_path / "ssh-fails"
    failing.write_text('#!/bin/sh\necho "ssh: connect to host dtn port 22: Connection refused" >&2\nexit 255\n')
    failing.chmod(0o755)
    shell = f"{sys.executable} {FAKE_SSH}"
    extra = ["--rsh", shell] if spelling == "--rsh X" else [f"-e{shell}"]
    src = tmp_path / "job" / "out.txt"
    src.parent.mkdir()
    src.write_text("r\n")
    real = tmp_path / "dst" / "real"
    real.mkdir(parents=True)
    (tmp_path / "dst" / "link").symlink_to(real)
    files = [TransferFile(str(src), str(tmp_path / "dst" / n)) for n in ("a.txt", "link")]
    location = TransferLocation.parse("x", "rsync://me@dtn")
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1, "ssh_command": str(failing), "extra_args": extra})
    try:
        task = backend.submit(location, TransferDirection.stage_out, files)
        status = wait_for_tasks(backend, [task], timeout=60)[task]
        assert backend._host_answers(location, TransferDirection.stage_out, files[0])
    finally:
        backend.close()
    assert dict(status.file_errors) == {files[1].dest: f"destination {files[1].dest} is a directory"}
    assert (tmp_path / "dst" / "a.txt").read_text() == "r\n" and (tmp_path / "dst" / "link").is_symlink()
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []
