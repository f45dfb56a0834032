"""The ``local`` backend and sparse files (an audit staging a 1 GB sparse file among 1,000 jobs):
the copy wrote every zero of the holes, so a 1 GB file holding 4 bytes of data took 1 GB of the
destination's disk (and quota) per job. Now a source with holes (fewer blocks than its size) is
copied range by range (``SEEK_DATA``/``SEEK_HOLE``), its holes left holes; the content is the same
byte for byte, the copy still stops between chunks when asked, and a file system that cannot say
where the data is gets every byte as before."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import balsam.builtin.local_transfer as lt
from balsam.states import TransferDirection
from balsam.testing import wait_for_tasks
from balsam.transfer import TaskState, TransferFile, TransferLocation, build_backend

SIZE = 1 << 30


def sparse_file(path: Path, size: int = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"HEAD")
        f.seek(size // 2)
        f.write(b"MIDDLE")
        f.truncate(size)
        f.seek(size - 4)
        f.write(b"END\n")
    if path.stat().st_blocks * 512 >= size or not hasattr(os, "SEEK_DATA"):
        pytest.skip("this file system does not keep holes")
    return path


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def same_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 << 20), fb.read(16 << 20)
            if x != y:
                return False
            if not x:
                return True


def run_local(files: list[TransferFile]):
    backend = build_backend(lt.LocalTransfer, "local", {"threads": 1})
    try:
        task = backend.submit(TransferLocation.parse("l", "local://"), TransferDirection.stage_in, files)
        return wait_for_tasks(backend, [task])[task]
    finally:
        backend.close()


def test_a_sparse_file_arrives_sparse_with_the_same_content(tmp_path: Path) -> None:
    src = sparse_file(tmp_path / "remote" / "big sparse ü.dat")
    tree = tmp_path / "remote" / "tree"
    sparse_file(tree / "sub" / "inner.dat", 64 << 20)
    (tree / "plain.txt").write_text("plain\n")
    dest = tmp_path / "job" / "big.dat"
    status = run_local([TransferFile(str(src), str(dest)), TransferFile(str(tree), str(tmp_path / "job" / "tree"), recursive=True)])
    assert status.state == TaskState.done and not status.file_errors, status
    assert dest.stat().st_size == SIZE and same_content(src, dest)
    assert allocated(dest) < 8 << 20, f"{allocated(dest)} bytes allocated for {SIZE} bytes of mostly holes"
    inner = tmp_path / "job" / "tree" / "sub" / "inner.dat"
    assert same_content(tree / "sub" / "inner.dat", inner) and allocated(inner) < 8 << 20
    assert (tmp_path / "job" / "tree" / "plain.txt").read_text() == "plain\n"
    assert oct(dest.stat().st_mode & 0o777) == oct(src.stat().st_mode & 0o777)


def test_a_sparse_copy_stops_between_chunks(tmp_path: Path, monkeypatch) -> None:
    """A sparse file whose data spans several chunks: the stop flag is looked at between them, and
    the partial file is never renamed into place."""
    monkeypatch.setattr(lt, "CHUNK_BYTES", 1 << 20)
    src = tmp_path / "remote" / "s.dat"
    src.parent.mkdir()
    with open(src, "wb") as f:
        f.write(os.urandom(4 << 20))
        f.truncate(64 << 20)
    if allocated(src) >= 64 << 20:
        pytest.skip("this file system does not keep holes")
    stop = threading.Event()
    calls = []
    real = lt._check_stop

    def check(flag, dest):
        calls.append(dest)
        if len(calls) == 3:
            stop.set()
        real(flag, dest)

    monkeypatch.setattr(lt, "_check_stop", check)
    dest = tmp_path / "job" / "s.dat"
    with pytest.raises(lt.CopyCancelled):
        lt.copy_into_place(src, dest, False, stop=stop)
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir()] == []


def test_without_seek_data_every_byte_is_copied(tmp_path: Path, monkeypatch) -> None:
    src = sparse_file(tmp_path / "remote" / "s.dat", 32 << 20)
    monkeypatch.setattr(lt, "_data_ranges", lambda fd, size: None, raising=False)
    dest = tmp_path / "job" / "s.dat"
    lt.copy_into_place(src, dest, False)
    assert same_content(src, dest)
