"""What every ``balsam`` command does when its output goes away: one mechanism, installed by the
group's entry (:meth:`balsam.cli.BalsamGroup.main`) for all commands.

Python ignores SIGPIPE, so ``balsam job ls | head -1`` gets a BrokenPipeError at the first write
after ``head`` exits (click answered it with a silent status 1, which a script reads as a failure).
Here, as a process killed by SIGPIPE would be (128 + 13), it ends with status 141 and nothing on
stderr, its stdout pointed at /dev/null first (Python's docs on SIGPIPE: the interpreter flushes
the standard streams at exit, and the data a failed write left in the buffer raised again there,
"Exception ignored ... BrokenPipeError").

When it ends depends on what the command does, so that nothing is lost on the server:

- a command that only reads and prints (:data:`STOPS_AT_CLOSED_OUTPUT`: listings, ``--watch``,
  help) stops at the failed write: no more pages are read, a watch does not loop on;
- every other command changes something (``job modify``, ``app rm --all``, ``site sync`` ...) and
  goes on to its end with its output dropped, then exits 141: a closed pipe never stops it between
  two of its requests (``app rm --all | head -1`` deleted the first app only). A confirmation it
  cannot show is not asked: the command stops there (:func:`refuse_unseen_question`), before any
  change.

Standard error is for diagnostics: one that cannot be written (closed, a full disk, a reader gone)
is dropped and changes no exit status (``job ls 2>/dev/full`` listed the jobs and exited 1 because
"No matching jobs." could not be written; a Ctrl-C with stderr closed exited 1, not 130). Only a
read-only command stops at a broken stderr pipe, as SIGPIPE would stop it (``balsam demo``, which
says what it leaves running on stderr, writes that line to its log instead). A standard stream
closed when the command starts (``2>&-``, ``<&-``) is opened on /dev/null: ``input()`` refused to
prompt without a stderr ("lost sys.stderr", status 1 and nothing said), and a socket or file the
command opened took the free descriptor, where a write or a child process's output then went.

Any other error writing stdout (``>/dev/full``) is one line naming it, ``Error: cannot write to
standard output: [Errno 28] No space left on device``, status 1 (a command that changes something
first finishes).
"""

from __future__ import annotations

import errno
import io
import os
import sys
from typing import Any, Optional

import click

#: Exit status of a command whose output was closed by its reader (``balsam job ls | head -1``):
#: what a shell reports for a process that SIGPIPE killed (128 + 13).
OUTPUT_CLOSED_EXIT_CODE = 141

#: Commands (their path below ``balsam``) that only read and print: a closed output ends them at
#: once. Groups (``balsam job --help``) do too. ``demo`` handles its own closed output (it names
#: what it started and leaves running) and needs the failed write to reach it.
STOPS_AT_CLOSED_OUTPUT = frozenset({
    "job ls", "job show", "app ls", "queue ls", "site ls", "site status", "site sample-settings",
    "site check-settings", "server status", "server credentials", "server user ls", "plugins ls",
    "plugins show", "transfer ls", "analytics throughput", "analytics utilization", "demo",
})


def _command_path(ctx: click.Context) -> str:
    names = []
    while ctx.parent is not None:
        names.append(ctx.command.name or ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(reversed(names))


def stops_at_closed_output(outside: bool = True) -> bool:
    """Whether the command running now ends at a failed write (see the module's docstring);
    ``outside``: the answer when no command runs (click reporting an error once it ended)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return outside
    if isinstance(ctx.command, click.Group):
        return True
    return _command_path(ctx) in STOPS_AT_CLOSED_OUTPUT


def _to_devnull(fd: int) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class _GuardedStream:
    """``sys.stdout`` or ``sys.stderr`` while a command runs: a failed write points the stream's
    descriptor at /dev/null and is recorded; it raises only where the command stops at it."""

    def __init__(self, stream: Any, guard: "StreamGuard", is_stdout: bool) -> None:
        self._stream = stream
        self._guard = guard
        self._is_stdout = is_stdout
        self.error: Optional[OSError] = None

    def _failed(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc
            try:
                _to_devnull(self._stream.fileno())
            except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
                pass  # not a real file (click's CliRunner): nothing buffered to lose at exit
            try:  # what the failed write left in the buffer goes to /dev/null now, not at exit
                self._stream.flush()
            except (OSError, ValueError):
                pass
        if self._is_stdout:
            if stops_at_closed_output():
                raise exc
        elif exc.errno == errno.EPIPE and stops_at_closed_output(outside=False):
            raise exc

    def _gone(self) -> bool:
        """After a failure: later writes go nowhere; on stdout they stop a read-only command again
        (one that caught the first error, as an ``except OSError`` around a file read with an echo
        in it, must not go on reading pages)."""
        if self.error is None:
            return False
        if self._is_stdout and stops_at_closed_output():
            raise self.error
        return True

    def write(self, text: Any) -> int:
        if self._gone():
            return len(text)
        try:
            return self._stream.write(text)
        except OSError as exc:
            self._failed(exc)
            return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._gone():
            return
        try:
            self._stream.flush()
        except OSError as exc:
            self._failed(exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _open_if_closed(fd: int, name: str) -> None:
    """Give ``sys.<name>``, None when ``fd`` was closed at start (``2>&-``), a stream on /dev/null,
    on ``fd`` itself when it is still free (so that nothing opened later takes it)."""
    if getattr(sys, name) is not None:
        return
    try:
        os.fstat(fd)
        taken = True  # something opened since then holds it: leave it alone
    except OSError:
        taken = False
    new = os.open(os.devnull, os.O_RDWR)
    if not taken and new != fd:
        os.dup2(new, fd)
        os.close(new)
        new = fd
    stream = open(new, "r" if fd == 0 else "w", encoding="utf-8", errors="backslashreplace", closefd=new != fd,
                  **({} if fd == 0 else {"buffering": 1}))
    setattr(sys, name, stream)


class StreamGuard:
    """Installs the guarded streams for one command and gives its exit status."""

    def __init__(self) -> None:
        self.saved: tuple[Any, Any] = (None, None)
        self.stdout: Optional[_GuardedStream] = None
        self.stderr: Optional[_GuardedStream] = None

    def install(self) -> None:
        for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
            _open_if_closed(fd, name)
        self.saved = (sys.stdout, sys.stderr)
        self.stdout = _GuardedStream(sys.stdout, self, is_stdout=True)
        self.stderr = _GuardedStream(sys.stderr, self, is_stdout=False)
        sys.stdout, sys.stderr = self.stdout, self.stderr  # type: ignore[assignment]

    def uninstall(self) -> None:
        if self.stdout is not None and sys.stdout is self.stdout:
            sys.stdout = self.saved[0]
        if self.stderr is not None and sys.stderr is self.stderr:
            sys.stderr = self.saved[1]

    @property
    def stdout_error(self) -> Optional[OSError]:
        return self.stdout.error if self.stdout is not None else None

    def owns(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the failed write of a standard stream (not a file or socket's)."""
        return any(s is not None and s.error is exc for s in (self.stdout, self.stderr))

    def stop(self, exc: OSError) -> "click.exceptions.Exit | click.ClickException":
        """What ends a command stopped by the failed write ``exc`` (see :meth:`owns`)."""
        if exc.errno == errno.EPIPE:
            return click.exceptions.Exit(OUTPUT_CLOSED_EXIT_CODE)
        return click.ClickException(self._cannot_write(exc))

    @staticmethod
    def _cannot_write(exc: OSError) -> str:
        return f"cannot write to standard output: [Errno {exc.errno}] {exc.strerror or exc}"

    def exit_status(self, code: Any) -> Any:
        """The exit status of a command that ended with ``code``: a success whose output was lost
        is 141 (closed by its reader) or 1 with one line saying why (another error)."""
        if self.stdout is not None:
            try:  # print() without flush: its last lines fail here, not at exit
                self.stdout.flush()
            except OSError:
                pass  # recorded: its error is read below
        exc = self.stdout_error
        if exc is None or code not in (0, None):
            return code
        if exc.errno == errno.EPIPE:
            return OUTPUT_CLOSED_EXIT_CODE
        tell(f"Error: {self._cannot_write(exc)}")
        return 1


def tell(line: str) -> None:
    """Write ``line`` on stderr for certain: a diagnostic that cannot be written is dropped."""
    try:
        click.echo(line, err=True)
    except (OSError, ValueError):
        pass


def refuse_unseen_question() -> None:
    """Before a confirmation: a question whose output is closed is not asked (no one sees it, and
    an answer read from stdin would be a guess): the command stops there, before any change."""
    stream = sys.stdout
    error = getattr(stream, "error", None)
    if isinstance(stream, _GuardedStream) and error is not None:
        raise error
