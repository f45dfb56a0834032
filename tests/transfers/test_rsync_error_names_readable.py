"""rsync's errors name a non-ASCII file by its bytes in octal outside a UTF-8 locale (an agent
started by cron or a batch system usually runs in the C locale): an audit's stage-out of
``résult ü.txt`` failed its job with ``mkdir ".../r\\#303\\#251sult \\#303\\#274.txt" failed``, in the
item's error, the agent's log line and the job's FAILED event. The escapes of UTF-8 names are now
read back, so the error names the file as the job does; bytes that are not UTF-8, and control
characters (a newline in a name), stay escaped, so the error stays one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from balsam.builtin.rsync_transfer import RsyncTransfer
from balsam.states import TransferDirection
from balsam.testing import wait_for_tasks
from balsam.transfer import TaskState, TransferFile, TransferLocation, build_backend

FAKE_SSH = Path(__file__).with_name("fake_ssh")


def run(direction: TransferDirection, files: list[TransferFile]):
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1, "ssh_command": f"{sys.executable} {FAKE_SSH}"})
    try:
        task = backend.submit(TransferLocation.parse("r", "rsync://me@somehost"), direction, files)
        return wait_for_tasks(backend, [task])[task]
    finally:
        backend.close()


@pytest.fixture
def c_locale(monkeypatch):
    for name in ("LANG", "LC_CTYPE", "LANGUAGE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LC_ALL", "C")


def test_a_missing_unicode_source_is_named_as_the_job_names_it(tmp_path: Path, c_locale) -> None:
    src = tmp_path / "remote" / "in 7 ünï.txt"
    src.parent.mkdir()
    dest = tmp_path / "job" / "input data.txt"
    status = run(TransferDirection.stage_in, [TransferFile(str(src), str(dest))])
    assert status.state == TaskState.done
    error = status.file_errors[str(dest)]
    assert f'"{src}"' in error and "No such file or directory" in error, error
    assert "\\#" not in error and "\n" not in error


def test_a_refused_unicode_destination_is_named_as_the_job_names_it(tmp_path: Path, c_locale) -> None:
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "résult.txt").write_text("r\n")
    (tmp_path / "out").write_text("a file where a directory is wanted\n")
    dest = tmp_path / "out" / "o 11" / "résult ü.txt"
    status = run(TransferDirection.stage_out, [TransferFile(str(tmp_path / "job" / "résult.txt"), str(dest))])
    error = status.file_errors[str(dest)]
    assert "o 11/résult ü.txt\" failed: Not a directory" in error and "\\#" not in error, error


def test_only_utf8_names_without_control_characters_are_read_back() -> None:
    from balsam.builtin.rsync_transfer import _unescape_names

    assert _unescape_names(r'mkdir "/o/r\#303\#251sult \#303\#274.txt" failed') == 'mkdir "/o/résult ü.txt" failed'
    assert _unescape_names(r'link_stat "/x/a\#012b" failed') == r'link_stat "/x/a\#012b" failed'
    assert _unescape_names(r"bad \#377\#376 name") == r"bad \#377\#376 name"
    # rsync writes a name's own backslash before '#ddd' as \#134: the name is "a\#303b"
    assert _unescape_names(r"a\#134#303b") == r"a\#303b"
