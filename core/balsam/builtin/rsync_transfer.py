"""The ``rsync`` transfer backend (``rsync://user@host`` locations): the ``rsync`` binary over ssh,
for sites without Globus.

A task runs in a worker thread: one ``rsync`` per file or directory, through
``options.ssh_command`` (``ssh -o BatchMode=yes`` by default: keys or an agent must already let the
site log in, nothing prompts). ``rsync://`` with no host (``rsync:///`` or ``rsync://localhost``
with ``local_mode_for_localhost``) copies locally with rsync's own local mode. rsync writes each
file under a temporary name and renames it into place, so a destination is never half-written;
a directory slot (``recursive``) is synchronised into the destination directory; a directory in a
slot that is not recursive is a file error (rsync itself only says "skipping directory", exit 0).
``rsync://user@host:PORT`` reaches ssh as ``-p PORT``; ``rsync://user@host/prefix`` puts the
location's paths under ``/prefix`` on the host. Task ids live in
this process: after an agent restart they are ``unknown`` and the agent runs those items again
(rsync then only sends what differs).

Symbolic links: a single-file item whose source is a symlink arrives as the file it points to
(``--copy-links``); inside a recursive item, links pointing out of the copied tree arrive as the
files they point to and links within it stay links (``--copy-unsafe-links``), so nothing arrives
dangling.

Each rsync runs in a session of its own (``start_new_session``): a timeout, a cancel (the agent's,
or ``transfers.task_timeout_sec``) or :meth:`RsyncTransfer.close` (the agent stopping) kill its
whole process group, the ssh it started included. After a file timed out or ssh itself failed
(exit 255: host unreachable, login refused) the task's remaining files fail at once with that
reason, untried: a batch to a hung host costs one ``timeout_sec``, not one per file (rsync's exit
statuses 10, 12, 30 and 35 say the same as ssh's 255: see ``CONNECTION_FAILED``).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
from pathlib import PurePosixPath
from typing import Mapping, Optional, Sequence

import attrs

from ..options import option
from ..states import TransferDirection
from .local_transfer import StopFlag, ThreadedTasks, at_least_one
from ..transfer import TaskState, TaskStatus, TransferBackend, TransferError, TransferFile, TransferLocation, one_line

__all__ = ["RsyncOptions", "RsyncTransfer", "rsync_command"]


def _positive(instance: object, attribute: "attrs.Attribute", value: float) -> None:
    if value <= 0:
        raise ValueError(f"must be more than 0, got {value!r}")


def _string_list(instance: object, attribute: "attrs.Attribute", value: object) -> None:
    # A plain string would be split into one argument per character.
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}" +
                         (f" (write [{value!r}])" if isinstance(value, str) else ""))


#: Seconds a killed rsync gets after SIGTERM to remove its temporary file, before SIGKILL.
TERM_GRACE_SEC = 1.0
#: rsync's exit statuses that say the connection failed, not a file: 255 the remote shell (ssh)
#: failed (host unreachable, login refused); 12 (protocol data stream) and 10 (socket I/O) are what
#: rsync reports instead when it notices the closed pipe before ssh's exit status (a race: a third
#: of the time on a loaded machine); 30 and 35 its own I/O timeouts (--timeout, --contimeout).
CONNECTION_FAILED = frozenset({10, 12, 30, 35, 255})


@attrs.frozen
class RsyncOptions:
    rsync: str = option(
        "rsync", "The rsync program on this site. The remote host runs the rsync on its own PATH; "
        "extra_args: ['--rsync-path=/path/to/rsync'] picks another there."
    )
    ssh_command: str = option("ssh -o BatchMode=yes", "Remote shell rsync connects through (rsync -e).")
    extra_args: list[str] = option(help="More rsync arguments, a list of strings, e.g. ['--bwlimit=50m'].",
                                   factory=list, validator=_string_list)
    timeout_sec: int = option(
        3600, "A single rsync (one file or directory) is stopped after this many seconds (more than 0); the task's "
        "remaining files then fail untried.", validator=_positive)
    threads: int = option(4, "Tasks running at the same time (one thread each); at least 1.", validator=at_least_one)
    skip_unchanged: bool = option(
        False, "Skip files whose size and modification time match the destination (rsync's quick check): faster "
        "re-runs of big directories, but a same-size rewrite within the same second is missed. Off: --ignore-times.",
    )
    local_mode_for_localhost: bool = option(
        False, "Treat rsync://localhost as a local copy (no ssh) instead of ssh to localhost."
    )


#: What rsync prints (exit 0) for a directory source without --recursive: nothing was copied.
SKIPPED_DIRECTORY = "skipping directory"


def split_address(netloc: str) -> tuple[str, Optional[int]]:
    """``user@host[:port]`` -> (``user@host``, port or None). Raises ValueError for a bad port."""
    user, at, hostport = netloc.rpartition("@")
    host, colon, port = hostport.rpartition(":")
    if not colon or (hostport.startswith("[") and not host.endswith("]")):
        return netloc, None  # no port (an IPv6 address in brackets has colons of its own)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port {port!r}")
    return f"{user}{at}{host}", int(port)


def _local_mode(options: RsyncOptions, location: TransferLocation) -> bool:
    address, port = split_address(location.netloc)
    # A port means a connection: rsync://localhost:2222 always goes through ssh.
    return not address or (options.local_mode_for_localhost and port is None and address.split("@")[-1] == "localhost")


def rsync_command(options: RsyncOptions, location: TransferLocation, direction: TransferDirection,
                  f: TransferFile) -> list[str]:
    """The rsync command line moving one file (pure; tests check it). The location's path prefix
    (rsync://me@host/scratch) is applied to the remote side; its port goes to ssh as ``-p``, since
    rsync's own ``host:path`` syntax has no place for one (``host:2222:/path`` is a remote path)."""
    local_mode = _local_mode(options, location)
    address, port = split_address(location.netloc)
    args = [options.rsync, "--links", "--perms", "--times", "--protect-args", "--mkpath"]
    if f.recursive:
        # Links out of the tree would dangle at the destination: their targets are copied instead.
        args += ["--recursive", "--copy-unsafe-links"]
    else:
        # One file named by a link (latest.h5 -> run42.h5): its content is what the job wants.
        args.append("--copy-links")
    if not options.skip_unchanged:
        args.append("--ignore-times")
    if not local_mode:
        args += ["-e", options.ssh_command if port is None else f"{options.ssh_command} -p {port}"]
    args += list(options.extra_args)
    src, dest = f.src, f.dest
    if f.recursive:
        # Directory into directory (dest/ gets src's content, not dest/<name>/).
        src, dest = src.rstrip("/") + "/", dest.rstrip("/") + "/"
    if direction == TransferDirection.stage_in:
        src = location.remote_path(src) if local_mode else f"{address}:{location.remote_path(src)}"
    else:
        dest = location.remote_path(dest) if local_mode else f"{address}:{location.remote_path(dest)}"
    return [*args, "--", src, dest]


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    meaningful = [ln for ln in lines if not ln.startswith("rsync error:")] or lines
    return meaningful[0] if meaningful else "no output"


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop rsync and everything it started (its session's process group): SIGTERM, which lets rsync
    remove its temporary file, then SIGKILL after TERM_GRACE_SEC."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return  # already gone
        try:
            proc.wait(TERM_GRACE_SEC)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            # rsync is gone; ssh (same group) may linger: it gets the SIGKILL too.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return


class RsyncTransfer(TransferBackend):
    """rsync over ssh (``rsync://user@host``)."""

    options_schema = RsyncOptions
    description = "the rsync binary over ssh (rsync://user@host locations)"

    def __init__(self, options: object = None, *, site_path: Optional[str] = None) -> None:
        super().__init__(options, site_path=site_path)
        self._tasks = ThreadedTasks(self.options.threads, "balsam-rsync")

    def _run_one(self, location: TransferLocation, direction: TransferDirection, f: TransferFile,
                 stop: Optional[StopFlag] = None) -> tuple[str, bool]:
        """('' on success, else one line saying what went wrong; whether the task's remaining files
        should be failed untried: a timeout or ssh failing say the host is not answering)."""
        not_recursive = f"{f.src} is a directory (the transfer slot is not recursive)"
        if not f.recursive and direction == TransferDirection.stage_out and os.path.isdir(f.src):
            # rsync itself would only say "skipping directory" (not with -q) and exit 0.
            return not_recursive, False
        args = rsync_command(self.options, location, direction, f)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RSYNC_")}
        try:
            # A session of its own: killing its process group kills the ssh it starts too (killing
            # rsync alone left ssh running, one per timed-out file).
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        except FileNotFoundError:
            return f"cannot run {self.options.rsync!r}: not found on PATH", False
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            _kill_group(proc)

        if stop is not None:
            stop.add_callback(kill)
        try:
            try:
                out, err = proc.communicate(timeout=self.options.timeout_sec)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                try:
                    proc.communicate(timeout=TERM_GRACE_SEC)
                except subprocess.TimeoutExpired:
                    pass  # a process that left the group still holds its pipes: not ours to wait for
                return f"rsync of {f.src} did not finish within {self.options.timeout_sec} s", True
        finally:
            if stop is not None:
                stop.remove_callback(kill)
            if proc.poll() is None:  # an exception above: never leave it running
                _kill_group(proc)
                proc.wait()
        if killed.is_set():
            return "cancelled", True
        if proc.returncode == 0:
            if not f.recursive and any(line.startswith(SKIPPED_DIRECTORY) for line in (out + "\n" + err).splitlines()):
                return not_recursive, False
            return "", False
        message = one_line(f"rsync exited {proc.returncode}: {_last_error_line(err or out)}")
        return message, proc.returncode in CONNECTION_FAILED

    def _run_task(self, location: TransferLocation, direction: TransferDirection, files: Sequence[TransferFile],
                  stop: Optional[StopFlag] = None) -> TaskStatus:
        errors: dict[str, str] = {}
        give_up = ""
        for f in files:
            if stop is not None and stop.is_set():
                return TaskStatus(TaskState.failed, "cancelled", retryable=False)
            if give_up:
                errors[f.dest] = give_up
                continue
            error, host_down = self._run_one(location, direction, f, stop)
            if stop is not None and stop.is_set():
                return TaskStatus(TaskState.failed, "cancelled", retryable=False)
            if error:
                errors[f.dest] = error
            if host_down:
                give_up = one_line(f"not tried: an earlier file of this task failed ({error})")
        info = {"files": len(files), "files_done": len(files) - len(errors)}
        return TaskStatus(TaskState.done, info=info, file_errors=errors)

    def submit_batch(self, location: TransferLocation, direction: TransferDirection, files: Sequence[TransferFile]) -> str:
        for f in files:
            for side in (f.src, f.dest):
                if not PurePosixPath(side).is_absolute():
                    raise TransferError(f"rsync transfer needs absolute paths, got {side!r}", retryable=False)
        self.check_location(location)
        return self._tasks.start(self._run_task, location, direction, list(files), stoppable=True)

    @classmethod
    def check_location(cls, location: TransferLocation) -> None:
        try:
            address, _ = split_address(location.netloc)
        except ValueError as exc:
            raise TransferError(f"rsync://user@host[:port]: {exc} in {location.url!r}", retryable=False) from None
        host = address.rpartition("@")[2]
        if address and (shlex.split(address) != [address] or not host or (":" in host and not host.startswith("["))):
            raise TransferError(f"bad rsync host {location.netloc!r} in {location.url!r}", retryable=False)

    def poll_tasks(self, task_ids: Sequence[str]) -> Mapping[str, TaskStatus]:
        return self._tasks.statuses(task_ids)

    def cancel_task(self, task_id: str) -> None:
        self._tasks.cancel(task_id)

    def close(self) -> None:
        self._tasks.close()
