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

import sys
from pathlib import Path

import pytest

from balsam.builtin.local_transfer import LocalTransfer
from balsam.builtin.rsync_transfer import RsyncTransfer
from balsam.states import TransferDirection
from balsam.testing import wait_for_tasks
from balsam.transfer import TaskState, TransferFile, TransferLocation, build_backend

FAKE_SSH = Path(__file__).with_name("fake_ssh")
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
