"""The agent reads a run() job's result from job.out in bounded memory.

``read_run_markers`` read the whole job.out into memory (and split it into lines): a run() app that
printed 400 MB took the site agent to 888 MB. The runner prints its marker last, so the end of the
file is read first, and the whole file (in chunks) only when the end holds no marker line."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import pytest

from balsam._api.app import EXCEPTION_MARKER, RETURN_MARKER, parse_run_markers
from balsam.site import hooks_runner
from balsam.site.hooks_runner import read_run_markers

MB = 2**20
#: What read_run_markers reads first (the end of job.out).
TAIL_BYTES = getattr(hooks_runner, "MARKERS_TAIL_BYTES", 4 * MB)


def _write_big(path: Path, size: int, head: bytes = b"", tail: bytes = b"") -> None:
    """``head``, then lines of output up to about ``size`` bytes, then ``tail``."""
    line = b"y" * 1023 + b"\n"
    block = line * 1024  # 1 MiB
    with open(path, "wb") as f:
        f.write(head)
        for _ in range(size // len(block)):
            f.write(block)
        f.write(tail)


def _peak(fn, *args):
    tracemalloc.start()
    try:
        result = fn(*args)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_200_mb_job_out_with_its_marker_at_the_end(tmp_path: Path) -> None:
    _write_big(tmp_path / "job.out", 200 * MB, tail=f"\n{RETURN_MARKER} gASVAgAAAAAAAABLKi4=\n".encode())
    (value, exc), peak = _peak(read_run_markers, tmp_path)
    assert (value, exc) == ("gASVAgAAAAAAAABLKi4=", "")
    assert peak < 20 * MB, f"peak {peak / MB:.1f} MB"


def test_a_marker_followed_by_more_than_the_tail_is_still_found(tmp_path: Path) -> None:
    """Output after the marker (threads, atexit handlers) longer than the tail read first: the
    whole file is scanned, in chunks."""
    _write_big(tmp_path / "job.out", TAIL_BYTES + 8 * MB,
               head=f"started\n{EXCEPTION_MARKER} early\n  {RETURN_MARKER} the-value==  \n".encode())
    (value, exc), peak = _peak(read_run_markers, tmp_path)
    assert (value, exc) == ("the-value==", "")
    assert peak < 20 * MB, f"peak {peak / MB:.1f} MB"


def test_no_marker_and_one_long_line(tmp_path: Path) -> None:
    """A run that printed no marker (sys.exit) and a single 50 MB line: nothing, in bounded memory."""
    with open(tmp_path / "job.out", "wb") as f:
        for _ in range(50):
            f.write(b"z" * MB)
    (value, exc), peak = _peak(read_run_markers, tmp_path)
    assert (value, exc) == ("", "")
    assert peak < 20 * MB, f"peak {peak / MB:.1f} MB"
    (tmp_path / "job.out").unlink()
    assert read_run_markers(tmp_path) == ("", "")  # no job.out at all


def test_a_marker_line_across_chunks_and_at_the_tails_edge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = "A" * 3000
    text = f"out\n{RETURN_MARKER} {payload}\n"
    path = tmp_path / "job.out"
    path.write_text(text)
    monkeypatch.setattr(hooks_runner, "MARKERS_CHUNK_BYTES", 7, raising=False)
    for tail in (1, 5, len(text) - len(RETURN_MARKER) - len(payload) - 2, len(text) - len(RETURN_MARKER) - len(payload) - 3, 10**6):
        monkeypatch.setattr(hooks_runner, "MARKERS_TAIL_BYTES", tail, raising=False)
        assert read_run_markers(tmp_path) == (payload, ""), tail


def test_the_same_answer_as_parse_run_markers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last marker line wins, a marker not at the start of its line or without a payload is
    none, blanks around are stripped: on random outputs, read in small chunks and tails."""
    pieces = [f"{RETURN_MARKER} ", f"{EXCEPTION_MARKER} ", RETURN_MARKER, "BALSAM-EXC", "abc", "xyz==", " ", "\t",
              "\n", "\r", "\r\n", "\x0c", "\x0b", "\x1e", "\x1f", "  \n", "yyyyyyyy", "B", "BALSAM-",
              "\x85", "\u2028", "\xa0", "\u3000"]
    rnd = random.Random(7)
    path = tmp_path / "job.out"
    for _ in range(1500):
        monkeypatch.setattr(hooks_runner, "MARKERS_CHUNK_BYTES", rnd.choice([1, 2, 3, 7, 64, 4096]), raising=False)
        monkeypatch.setattr(hooks_runner, "MARKERS_TAIL_BYTES", rnd.choice([1, 3, 10, 40, 10**6]), raising=False)
        text = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 40)))
        path.write_bytes(text.encode())
        value, exc = parse_run_markers(text)
        assert read_run_markers(tmp_path) == (value or "", exc or ""), repr(text)


@pytest.mark.parametrize("text, expected", [
    # Found by a fuzz check when the two readers were two implementations: non-ASCII whitespace is text.
    (f"{EXCEPTION_MARKER} \x85\t  {RETURN_MARKER} v", (None, f"\x85\t  {RETURN_MARKER} v")),
    (f"x\u2028{RETURN_MARKER} v\n", (None, None)),
    (f"{RETURN_MARKER} v\u2028{EXCEPTION_MARKER} e", (f"v\u2028{EXCEPTION_MARKER} e", None)),
    (f"\xa0{RETURN_MARKER} v\n", (None, None)),
    # Lines end at \n only; ASCII blanks (\r included) are stripped around a line and its payload.
    (f"out\r\n \t{RETURN_MARKER}  v== \r\n", ("v==", None)),
    (f"{RETURN_MARKER} a\r{EXCEPTION_MARKER} b\n", (f"a\r{EXCEPTION_MARKER} b", None)),
    (f"progress 10%\rprogress 100%\r\n{EXCEPTION_MARKER} e\n", (None, "e")),
])
def test_one_rule_for_line_breaks_and_blanks(tmp_path: Path, text: str, expected: tuple) -> None:
    """The markers are our runner's, one per line, ASCII: ``\\n`` ends a line, ASCII whitespace is
    stripped, anything else is text; the agent's reader and parse_run_markers are one scanner."""
    assert parse_run_markers(text) == expected
    (tmp_path / "job.out").write_bytes(text.encode())
    assert read_run_markers(tmp_path) == tuple(x or "" for x in expected)
