"""The server directory's lock where the file system has no flock ($BALSAM_HOME on NFS without
lockd: ENOLCK): `balsam server start` failed outright ("OSError"); it now locks a file of the same
name on this host's temporary directory, which still keeps a second server of that BALSAM_HOME out."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import balsam.server.embedded as embedded


def test_no_flock_on_the_server_directory_falls_back_to_a_local_lock(tmp_path: Path, monkeypatch, capsys) -> None:
    real = embedded.try_exclusive_flock
    lock = tmp_path / "server" / "server.lock"
    lock.parent.mkdir()

    def no_flock_here(path):
        if Path(path) == lock:
            raise OSError(errno.ENOLCK, "No locks available")
        return real(path)

    monkeypatch.setattr(embedded, "try_exclusive_flock", no_flock_here)
    first = embedded.lock_server_dir(lock)
    try:
        assert first is not None and "cannot lock" in capsys.readouterr().err
        assert embedded.lock_server_dir(lock) is None  # a second start of the same BALSAM_HOME is kept out
    finally:
        os.close(first)
