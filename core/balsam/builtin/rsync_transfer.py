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
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import PurePosixPath
from typing import Mapping, Optional, Sequence

import attrs

from ..options import option
from ..states import TransferDirection
from .local_transfer import ThreadedTasks
from ..transfer import TaskState, TaskStatus, TransferBackend, TransferError, TransferFile, TransferLocation, one_line

__all__ = ["RsyncOptions", "RsyncTransfer", "rsync_command"]


@attrs.frozen
class RsyncOptions:
    rsync: str = option(
        "rsync", "The rsync program on this site. The remote host runs the rsync on its own PATH; "
        "extra_args: ['--rsync-path=/path/to/rsync'] picks another there."
    )
    ssh_command: str = option("ssh -o BatchMode=yes", "Remote shell rsync connects through (rsync -e).")
    extra_args: list[str] = option(help="More rsync arguments, e.g. ['--bwlimit=50m'].", factory=list)
    timeout_sec: int = option(3600, "A single rsync (one file or directory) is stopped after this many seconds.")
    threads: int = option(4, "Tasks running at the same time (one thread each).")
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
        args.append("--recursive")
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


class RsyncTransfer(TransferBackend):
    """rsync over ssh (``rsync://user@host``)."""

    options_schema = RsyncOptions
    description = "the rsync binary over ssh (rsync://user@host locations)"

    def __init__(self, options: object = None, *, site_path: Optional[str] = None) -> None:
        super().__init__(options, site_path=site_path)
        if self.options.threads < 1:
            raise TransferError("transfers.backend_options.rsync.threads: must be at least 1", retryable=False)
        self._tasks = ThreadedTasks(self.options.threads, "balsam-rsync")

    def _run_one(self, location: TransferLocation, direction: TransferDirection, f: TransferFile) -> str:
        """'' on success, else one line saying what went wrong."""
        not_recursive = f"{f.src} is a directory (the transfer slot is not recursive)"
        if not f.recursive and direction == TransferDirection.stage_out and os.path.isdir(f.src):
            # rsync itself would only say "skipping directory" (not with -q) and exit 0.
            return not_recursive
        args = rsync_command(self.options, location, direction, f)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RSYNC_")}
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=self.options.timeout_sec,
                                  stdin=subprocess.DEVNULL, env=env)
        except FileNotFoundError:
            return f"cannot run {self.options.rsync!r}: not found on PATH"
        except subprocess.TimeoutExpired:
            return f"rsync of {f.src} did not finish within {self.options.timeout_sec} s"
        if proc.returncode == 0:
            if not f.recursive and any(line.startswith(SKIPPED_DIRECTORY)
                                       for line in (proc.stdout + "\n" + proc.stderr).splitlines()):
                return not_recursive
            return ""
        return one_line(f"rsync exited {proc.returncode}: {_last_error_line(proc.stderr or proc.stdout)}")

    def _run_task(self, location: TransferLocation, direction: TransferDirection, files: Sequence[TransferFile]) -> TaskStatus:
        errors: dict[str, str] = {}
        for f in files:
            error = self._run_one(location, direction, f)
            if error:
                errors[f.dest] = error
        info = {"files": len(files), "files_done": len(files) - len(errors)}
        return TaskStatus(TaskState.done, info=info, file_errors=errors)

    def submit_batch(self, location: TransferLocation, direction: TransferDirection, files: Sequence[TransferFile]) -> str:
        for f in files:
            for side in (f.src, f.dest):
                if not PurePosixPath(side).is_absolute():
                    raise TransferError(f"rsync transfer needs absolute paths, got {side!r}", retryable=False)
        self.check_location(location)
        return self._tasks.start(self._run_task, location, direction, list(files))

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
