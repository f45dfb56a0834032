"""A real tmpfs mounted for a test and filled to its last inode: making a directory or a file in
it fails ENOSPC, as on a full project file system (tests of the local queue and the processing
module). Needs root (``mount``): the fixture that uses it skips where a tmpfs cannot be mounted."""

from __future__ import annotations

import contextlib
import errno
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


class FullTmpfs:
    """A mounted tmpfs; ``fill()`` takes every inode left, ``make_room()`` gives them back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fillers: list[Path] = []

    def fill(self) -> None:
        for i in range(1000):
            filler = self.path / f".filler-{i}"
            try:
                filler.touch()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return
            self.fillers.append(filler)
        raise AssertionError(f"{self.path}: still room after 1000 files")

    def make_room(self) -> None:
        for filler in self.fillers:
            filler.unlink()
        self.fillers = []


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, nr_inodes: int) -> Iterator[FullTmpfs]:
    """A tmpfs of 1 MiB and ``nr_inodes`` inodes at ``mount_point`` (made if missing), unmounted
    at the end; the test is skipped where it cannot be mounted (not root, no mount namespace)."""
    mount_point.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=1m,nr_inodes={nr_inodes}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield FullTmpfs(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
