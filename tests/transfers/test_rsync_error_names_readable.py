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


def test_text_that_is_not_a_byte_escape_keeps_the_error(tmp_path: Path) -> None:
    """A ``\\#777`` in an error (a shell's text, not rsync's: a byte is at most \\#377) crashed the
    read-back with ``ValueError: bytes must be in range(0, 256)``: the task failed with that and
    the real error was lost. It stays as written now; the item fails with its own error."""
    from balsam.builtin.rsync_transfer import _unescape_names

    assert _unescape_names(r"cannot open /r/run\#777/in.txt") == r"cannot open /r/run\#777/in.txt"
    assert _unescape_names(r"x \#400\#303\#251 y") == r"x \#400é y"
    fake_ssh = tmp_path / "fake_ssh_bad"
    fake_ssh.write_text(
        "import sys\n"
        "sys.stderr.write('sh: 1: cannot open /home/me/run\\\\#777/in.txt: No such file\\n')\n"
        "sys.exit(255)\n"
    )
    backend = build_backend(RsyncTransfer, "rsync", {"threads": 1, "ssh_command": f"{sys.executable} {fake_ssh}"})
    dest = str(tmp_path / "a.txt")
    try:
        task = backend.submit(
            TransferLocation.parse("r", "rsync://me@somehost"),
            TransferDirection.stage_in,
            [TransferFile("/home/me/a.txt", dest), TransferFile("/home/me/b.txt", str(tmp_path / "b.txt"))],
        )
        status = wait_for_tasks(backend, [task])[task]
    finally:
        backend.close()
    assert status.state == TaskState.done, status
    assert r"cannot open /home/me/run\#777/in.txt" in status.file_errors[dest], status


def test_invisible_format_characters_stay_escaped() -> None:
    """A name holding U+202E (RIGHT-TO-LEFT OVERRIDE) read back would show ``a<RLO>gpj.exe`` as
    ``aexe.jpg``; format characters (Cf: bidi controls, zero-width ones) and line/paragraph
    separators stay escaped, as control characters do."""
    from balsam.builtin.rsync_transfer import _unescape_names

    def escaped(name: str) -> str:
        return "".join(chr(c) if c < 0x80 else f"\\#{c:03o}" for c in name.encode())

    for name in ("a\u202egpj.exe", "a\u200bb", "a\u2028b", "a\u2029b", "a\ufeffb", "a\ue000b"):
        assert _unescape_names(f'open "{escaped(name)}" failed') == f'open "{escaped(name)}" failed', repr(name)
    assert _unescape_names(f'open "{escaped("résult ü.txt")}" failed') == 'open "résult ü.txt" failed'
