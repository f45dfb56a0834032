"""What every ``balsam`` command does when its output goes away: one mechanism, installed by the
group's entry (:meth:`balsam.cli.BalsamGroup.main`) for all commands.

Python ignores SIGPIPE, so ``balsam job ls | head -1`` gets a BrokenPipeError at the first write
after ``head`` exits (click answered it with a silent status 1, which a script reads as a failure).
Here, as a process killed by SIGPIPE would be (128 + 13), it ends with status 141 and nothing on
stderr, its stdout pointed at /dev/null first (Python's docs on SIGPIPE: the interpreter flushes
the standard streams at exit, and the data a failed write left in the buffer raised again there,
"Exception ignored ... BrokenPipeError").

When it ends depends on what the command does, so that nothing is lost on the server:

- a command that only reads and prints (:func:`read_only`: listings, ``--watch``, help) stops at
  the failed write: no more pages are read, a watch does not loop on;
- a command that changes something (:func:`changes_something`: ``job modify``, ``app rm --all``,
  ``site sync`` ...) goes on to its end with its output dropped, then exits 141: a closed pipe
  never stops it between two of its requests (``app rm --all | head -1`` deleted the first app
  only). A confirmation it cannot show is not asked: the command stops there
  (:func:`refuse_unseen_question`), before any change.

A command says which it is with one of those two decorators (an attribute on the click command).
For the core's commands that declare nothing, :data:`STOPS_AT_CLOSED_OUTPUT` says it (the rest of
the core changes something; :func:`_is_core`). A plugin's command that declares nothing stops: a
follow or watch loop written before this mechanism must not print into a closed pipe for ever (it
stopped at the first failed write then too), and a command that would be left half done says so
with ``@changes_something``.

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

The guarded stream's ``buffer`` is guarded the same way: click writes to ``sys.stdout.buffer``
through a wrapper of its own when the stream's encoding is ASCII (``PYTHONIOENCODING=ascii``, a C
locale with ``PYTHONUTF8=0``). A stdout closed at the start (``>&-``) shows no question either. The
descriptors 1 and 2 are given back as they were when the command ends (``main([...],
standalone_mode=False)`` in a process that goes on printing).
"""

from __future__ import annotations

import errno
import io
import os
import sys
from typing import Any, Optional, TypeVar

import click

#: Exit status of a command whose output was closed by its reader (``balsam job ls | head -1``):
#: what a shell reports for a process that SIGPIPE killed (128 + 13).
OUTPUT_CLOSED_EXIT_CODE = 141

#: The core's commands (their path below ``balsam``) that only read and print: a closed output
#: ends them at once; the core's other commands change something. Groups (``balsam job --help``) do too.
#: ``demo`` handles its own closed output (it names what it started and leaves running) and needs
#: the failed write to reach it.
STOPS_AT_CLOSED_OUTPUT = frozenset({
    "job ls", "job show", "app ls", "queue ls", "site ls", "site status", "site sample-settings",
    "site check-settings", "server status", "server credentials", "server user ls", "plugins ls",
    "plugins show", "transfer ls", "analytics throughput", "analytics utilization", "demo",
})


#: The attribute of a click command (or of its callback) that :func:`read_only` and
#: :func:`changes_something` set: whether a closed output ends the command at once.
STOPS_ATTRIBUTE = "balsam_stops_at_closed_output"

_Declared = TypeVar("_Declared")


def read_only(command: _Declared) -> _Declared:
    """Declare a command that only reads and prints (a listing, a follow or watch loop): a closed
    output (``| head``) ends it at the first failed write, status 141. Put it above or below
    ``@click.command``. A plugin's command that declares nothing is treated so."""
    setattr(command, STOPS_ATTRIBUTE, True)
    return command


def changes_something(command: _Declared) -> _Declared:
    """Declare a command that changes something (on the server, in files): a closed output does not
    stop it between two of its changes; it finishes with its output dropped, then exits 141. A
    confirmation it cannot show is still refused first (:func:`refuse_unseen_question`)."""
    setattr(command, STOPS_ATTRIBUTE, False)
    return command


def _declared(command: click.Command) -> Optional[bool]:
    for holder in (command, command.callback):
        value = getattr(holder, STOPS_ATTRIBUTE, None)
        if value is not None:
            return bool(value)
    return None


def _command_path(ctx: click.Context) -> str:
    names = []
    while ctx.parent is not None:
        names.append(ctx.command.name or ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(reversed(names))


def _is_core(command: click.Command) -> bool:
    """Whether ``command`` is the core's (its callback in the ``balsam`` package; a plugin's lives
    in its own, ``balsam_transfer_globus`` ...), whichever plugin's hook attached it or its group."""
    module = getattr(command.callback, "__module__", None) or ""
    return module == "balsam" or module.startswith("balsam.")


def stops_at_closed_output(outside: bool = True) -> bool:
    """Whether the command running now ends at a failed write (see the module's docstring);
    ``outside``: the answer when no command runs (click reporting an error once it ended)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return outside
    if isinstance(ctx.command, click.Group):
        return True
    declared = _declared(ctx.command)
    if declared is not None:
        return declared
    if _is_core(ctx.command):  # the core's declaration: its list (the rest changes something)
        return _command_path(ctx) in STOPS_AT_CLOSED_OUTPUT
    return True  # a plugin's that declares nothing: a loop must not run on into a closed pipe


def _to_devnull(fd: int) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class _GuardedStream:
    """``sys.stdout`` or ``sys.stderr`` while a command runs: a failed write points the stream's
    descriptor at /dev/null and is recorded; it raises only where the command stops at it."""

    def __init__(self, stream: Any, guard: "StreamGuard", is_stdout: bool,
                 text: "Optional[_GuardedStream]" = None) -> None:
        self._stream = stream
        self._guard = guard
        self._is_stdout = is_stdout
        #: The stream whose error this one shares: itself, or for a ``buffer`` its text stream (one
        #: descriptor: a failure through either ends both).
        self._root: _GuardedStream = text if text is not None else self
        self._error: Optional[OSError] = None
        self._buffer: Optional[_GuardedStream] = None

    @property
    def error(self) -> Optional[OSError]:
        return self._root._error

    @error.setter
    def error(self, exc: Optional[OSError]) -> None:
        self._root._error = exc

    @property
    def buffer(self) -> "_GuardedStream":
        """The binary stream below, guarded alike: click writes there itself when the text
        stream's encoding is ASCII (``PYTHONIOENCODING=ascii``), and the raw one failed with
        click's silent status 1 (``app rm --all -y | head`` left 5 of 6 apps)."""
        if self._buffer is None:
            self._buffer = _GuardedStream(self._stream.buffer, self._guard, self._is_stdout, text=self)
        return self._buffer

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


def _open_if_closed(fd: int, name: str) -> bool:
    """Give ``sys.<name>``, None when ``fd`` was closed at start (``2>&-``), a stream on /dev/null,
    on ``fd`` itself when it is still free (so that nothing opened later takes it); whether it did."""
    if getattr(sys, name) is not None:
        return False
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
    return True


def _dup(fd: int) -> Optional[int]:
    try:
        return os.dup(fd)
    except OSError:
        return None


class StreamGuard:
    """Installs the guarded streams for one command and gives its exit status."""

    def __init__(self) -> None:
        self.saved: tuple[Any, Any] = (None, None)
        self.stdout: Optional[_GuardedStream] = None
        self.stderr: Optional[_GuardedStream] = None
        #: Whether stdout was closed when the command started (``>&-``): a question is not seen.
        self.stdout_closed_at_start = False
        #: Copies of descriptors 1 and 2 as they were, put back at :meth:`uninstall` (a failed write
        #: points them at /dev/null; a process that goes on after ``main(..., standalone_mode=False)``
        #: printed into /dev/null).
        self._fds: dict[int, Optional[int]] = {}

    def install(self) -> None:
        opened = {name: _open_if_closed(fd, name) for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr"))}
        self.stdout_closed_at_start = opened["stdout"]
        self._fds = {fd: _dup(fd) for fd in (1, 2)}
        self.saved = (sys.stdout, sys.stderr)
        self.stdout = _GuardedStream(sys.stdout, self, is_stdout=True)
        self.stderr = _GuardedStream(sys.stderr, self, is_stdout=False)
        sys.stdout, sys.stderr = self.stdout, self.stderr  # type: ignore[assignment]

    def uninstall(self) -> None:
        if self.stdout is not None and sys.stdout is self.stdout:
            sys.stdout = self.saved[0]
        if self.stderr is not None and sys.stderr is self.stderr:
            sys.stderr = self.saved[1]
        for fd, (copy, stream) in zip((1, 2), ((self._fds.get(1), self.stdout), (self._fds.get(2), self.stderr))):
            if copy is None:
                continue
            try:
                if stream is not None and stream.error is not None:
                    try:  # what is left buffered goes to /dev/null, not to the reader gone at exit
                        stream._stream.flush()
                    except (OSError, ValueError):
                        pass
                    os.dup2(copy, fd)
            finally:
                os.close(copy)
        self._fds = {}

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
    if not isinstance(stream, _GuardedStream):
        return
    if stream.error is not None:
        raise stream.error
    if stream._guard.stdout_closed_at_start:  # `>&-`: opened on /dev/null, where no one reads
        raise click.ClickException("cannot ask: standard output was closed when the command started, so the "
                                   "question would not be seen")
