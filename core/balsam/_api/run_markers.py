"""The ``run()`` markers in a job's output: what :mod:`balsam._api.python_runner` prints, and the
one scanner that reads them back (the site agent's processing, ``balsam.site.hooks_runner``, over
job.out in chunks; :func:`balsam._api.app.parse_run_markers` over a text).

The markers are written by our own runner: ``\\n<MARKER> <payload>\\n``, one per line, ASCII (the
payload is base64). So a line ends at ``\\n`` only, and the blanks stripped around a line and its
payload are ASCII whitespace (``bytes.strip()``: space, ``\\t``, ``\\r``, ``\\x0b``, ``\\x0c``; a
``\\r\\n`` line end is read as well). Anything else, non-ASCII whitespace included (``\\x85``,
``\\u2028``, a no-break space), is ordinary text: it neither ends a line nor is stripped. A marker
counts only at the start of its line (after blanks), followed by a space and a payload; the last
such line wins.
"""

from __future__ import annotations

from typing import Any, Optional

RETURN_MARKER = "BALSAM-RETURN-VALUE"
EXCEPTION_MARKER = "BALSAM-EXCEPTION"
#: A marker line is kept up to this length: well over the API's 512,000-character limit on a
#: payload (balsam.models.MAX_SERIALIZED_PAYLOAD_CHARS), which a longer one breaks either way.
MARKER_LINE_MAX_BYTES = 8 * 2**20
#: job.out is read this much at a time (by default).
MARKERS_CHUNK_BYTES = 2**20
#: A marker line's only line break.
_NL = b"\n"
_NL_BYTE = _NL[0]
#: ASCII whitespace, what ``bytes.strip()`` strips (``\n`` never occurs within a line).
_BLANKS = b" \t\r\x0b\x0c"
_BLANK_SET = frozenset(_BLANKS)
_PREFIXES = ((RETURN_MARKER + " ").encode(), (EXCEPTION_MARKER + " ").encode())


class MarkerScan:
    """The last ``run()`` marker line in output bytes fed in order, in bounded memory and at the
    speed of ``bytes.rfind``: in each chunk only the last marker at the start of a line is looked
    at, and of the line the chunk ends in (continued by the next chunk) only as much is kept as may
    be a marker line (up to :data:`MARKER_LINE_MAX_BYTES`). The text is never held in memory (a
    400 MB job.out took 888 MB of the agent when it was). ``mid_line``: the data starts inside a
    line, which is skipped."""

    def __init__(self, *, mid_line: bool = False) -> None:
        self.prefixes = _PREFIXES
        self.value: Optional[str] = None
        self.exc: Optional[str] = None
        self.found = False
        # The line being read (its leading blanks stripped) while it may be a marker line; None: it
        # is not, skip to its end (also the partial line a read from the middle of the file starts in).
        self._line: Optional[bytes] = None if mid_line else b""
        self._cut = False  # _line is a marker line cut at MARKER_LINE_MAX_BYTES: its rest is skipped

    def feed(self, data: bytes) -> None:
        first = data.find(_NL)
        if first < 0:
            self._extend(data, 0, len(data))
            return
        self._extend(data, 0, first)
        self._end_line()
        last = data.rfind(_NL)
        if last > first:
            self._last_marker_line(data, first + 1, last)
        self._extend(data, last + 1, len(data))

    def close(self) -> None:
        """The end of the data: its last line needs no line break."""
        self._end_line()

    def result(self) -> tuple[Optional[str], Optional[str]]:
        """``(serialized_return_value, serialized_exception)``, either None when absent."""
        return self.value, self.exc

    def _extend(self, data: bytes, start: int, end: int) -> None:
        """The line being read goes on with ``data[start:end]`` (no line break in it)."""
        if self._line is None or self._cut or start >= end:
            return
        line = (self._line + data[start:end]).lstrip(_BLANKS)
        if not any(line[:len(prefix)] == prefix[:len(line)] for prefix in self.prefixes):
            self._line = None  # not a marker line: skipped to its end
        elif len(line) >= MARKER_LINE_MAX_BYTES:
            self._line, self._cut = line[:MARKER_LINE_MAX_BYTES], True
        else:
            self._line = line

    def _end_line(self) -> None:
        line, self._line, self._cut = self._line, b"", False
        if line:
            self._take(line)

    def _take(self, line: bytes) -> bool:
        """A whole line (or a marker line cut at the limit): the last marker so far if it is one."""
        line = line.strip(_BLANKS)
        for kind, prefix in enumerate(self.prefixes):
            if line.startswith(prefix):
                payload = line[len(prefix):].strip(_BLANKS).decode("utf-8", "replace")
                self.value, self.exc = (payload, None) if kind == 0 else (None, payload)
                self.found = True
                return True
        return False

    def _last_marker_line(self, data: bytes, start: int, end: int) -> None:
        """The last marker line among the whole lines of ``data[start:end]`` (``start``: a line's
        start; ``end``: the line break after the last one), if there is one: the occurrences of the
        markers from the end back, until one starts a line and is a marker line."""
        found = [-1, -1]
        for kind, prefix in enumerate(self.prefixes):
            high = end
            while (pos := data.rfind(prefix, start, high)) > found[1 - kind]:
                head = pos
                while head > start and data[head - 1] in _BLANK_SET:
                    head -= 1
                if head == start or data[head - 1] == _NL_BYTE:  # it starts its line
                    line_end = data.find(_NL, pos, end + 1)
                    line = data[pos:line_end if line_end >= 0 else end]
                    if line.rstrip(_BLANKS) != prefix.rstrip(_BLANKS):  # not the marker alone: a marker line
                        found[kind] = pos
                        break
                high = pos  # look further back
        last = max(found)
        if last >= 0:
            line_end = data.find(_NL, last, end + 1)
            self._take(data[last:line_end if line_end >= 0 else end])

    def read(self, f: Any, offset: int, chunk_bytes: int = MARKERS_CHUNK_BYTES) -> "MarkerScan":
        """Feeds the binary file ``f`` from ``offset`` to its end, ``chunk_bytes`` at a time."""
        f.seek(offset)
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            self.feed(chunk)
        self.close()
        return self


def scan_run_markers(data: bytes) -> tuple[Optional[str], Optional[str]]:
    """:class:`MarkerScan` over ``data`` at once."""
    scan = MarkerScan()
    scan.feed(data)
    scan.close()
    return scan.result()
