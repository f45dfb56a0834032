"""The ``rsync`` transfer backend (``rsync://user@host`` locations): the ``rsync`` binary over ssh,
for sites without Globus.

A task runs in a worker thread: one ``rsync`` per file or directory, through
``options.ssh_command`` (``ssh -o BatchMode=yes`` by default: keys or an agent must already let the
site log in, nothing prompts). ``rsync://`` with no host (``rsync:///`` or ``rsync://localhost``
with ``local_mode_for_localhost``) copies locally with rsync's own local mode. rsync writes each
file under a temporary name and renames it into place, so a destination is never half-written
(the temporary ``.NAME.XXXXXX`` of an rsync killed by SIGKILL stays: a later successful copy to a
destination on this machine removes it, see :func:`remove_stale_temporaries`);
a directory slot (``recursive``) is synchronised into the destination directory; a directory in a
slot that is not recursive is a file error (rsync itself only says "skipping directory", exit 0).
``rsync://user@host:PORT`` reaches ssh as ``-p PORT``; ``rsync://user@host/prefix`` puts the
location's paths under ``/prefix`` on the host. Task ids live in
this process: after an agent restart they are ``unknown`` and the agent runs those items again
(rsync then only sends what differs).

Symbolic links: a single-file item whose source is a symlink arrives as the file it points to
(``--copy-links``); inside a recursive item, links pointing out of the copied tree arrive as the
files they point to and links within it stay links (``--copy-unsafe-links``, judged on their text:
one naming what the tree does not hold arrives dangling; one out of it leading nowhere fails the
item). The ``local`` backend does the same (see docs/transfers.md, Symbolic links).

Each rsync runs in a session of its own (``start_new_session``): a timeout, a cancel (the agent's,
or ``transfers.task_timeout_sec``) or :meth:`RsyncTransfer.close` (the agent stopping) kill its
whole process group, the ssh it started included. After a file timed out or ssh itself failed
(exit 255: host unreachable, login refused) the task's remaining files are not tried (rsync's exit
statuses 10, 12, 30 and 35 say the same as ssh's 255: see ``CONNECTION_FAILED``): listed in the
task's ``info[NOT_TRIED]`` (the agent submits them again, no try used) when the host had answered
since its last such failure, the file that timed out running last in its next task, so one slow
file does not fail its batch; failing a try when it had not (no answer twice in a row: the second
rsync started after the first failure was recorded) and a quick check of the host (an
``rsync --list-only`` of the file's directory there, at most :data:`PROBE_TIMEOUT_SEC`) gets no
answer either, so a hung host costs one ``timeout_sec``, the check and (stage-outs over ssh) the
look at the destinations (at most :data:`LISTING_TIMEOUT_SEC`) per task, not one ``timeout_sec`` per file (see
:meth:`RsyncTransfer._run_task`). What the backend knows of its hosts lives in this process: an
agent restart forgets it (the next first failure is a first again).
Nothing else ends such a session when the agent dies: each running rsync is recorded in the site
(:class:`RunningRsyncs`), and the next agent's backend ends those of a dead agent when it is built.

A source or destination on this machine is looked at before rsync runs, with the ``local``
backend's words for the same faults: a missing source (``--mkpath`` created the destination's
directories first, and left them), a recursive item given a file, a file item whose destination is
a directory (rsync writes ``<dir>/<name>``, a path the job never named), a file item's destination
written as a directory's name (``out/``, ``out/.``). A remote stage-out file is sent by name into
its destination's directory, after an ``rsync --list-only`` of the task's destinations (one more
connection per task, per 500 files) found no directory there, links followed (sent by name, the file would
replace a link to a directory, or an empty directory); a listing that is not made (no answer, an
rsync error) leaves the files unchecked, not unsent (a WARNING says so), and a destination holding
``..`` is not listed; see :meth:`RsyncTransfer._remote_directories` and
:meth:`RsyncTransfer._explain`. The link it is sent as is made in the site's ``.rsync-links`` (see
:class:`LinkDirs`).

Remote names holding wildcard characters (``run[1].h5``) are taken literally, although the remote
rsync expands wildcards even with ``--protect-args``: escaped in a source, sent as a link of that
name into the directory of a destination; what cannot be named exactly is a file error (see
:func:`remote_source` and :func:`remote_dest_link_name`), as is a remote path the remote rsync
would cut (4,096 bytes or more: see :data:`REMOTE_PATH_MAX`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import unicodedata
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping, Optional, Sequence

import attrs

from ..options import option
from ..states import TransferDirection
from .local_transfer import StopFlag, ThreadedTasks, at_least_one, names_a_directory, symlink_problem
from .local_transfer import names_a_directory_error as _names_a_directory
from ..transfer import TaskState, TaskStatus, TransferBackend, TransferError, TransferFile, TransferLocation, one_line
from ..util import START_TIME_TOLERANCE_SEC, process_start_time, same_process, terminate_processes

__all__ = ["RsyncOptions", "RsyncTransfer", "RunningRsyncs", "rsync_command"]

logger = logging.getLogger(__name__)


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
    extra_args: list[str] = option(help="More rsync arguments, a list of strings, e.g. ['--bwlimit=50m']. The rsyncs "
                                        "that only look (at a task's destinations, at a host) get only those saying "
                                        "how to reach and run the remote rsync (--rsh/-e, --rsync-path, --timeout, ...).",
                                   factory=list, validator=_string_list)
    timeout_sec: int = option(
        3600, "A single rsync (one file or directory) is stopped after this many seconds (more than 0); the task's "
        "remaining files are then not tried: submitted again without using a try, unless the host got no answer "
        "twice in a row and then none to a quick check either (then they fail a try).", validator=_positive)
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
#: What the remote sender says of a recursive item's source that is a file (``src/`` is not a directory).
SOURCE_NOT_A_DIRECTORY = re.compile(r'change_dir "(?P<path>.*)" failed: Not a directory \(20\)$', re.MULTILINE)
#: What rsync says when a file sent by name (a link named as the destination, into its directory)
#: meets a non-empty directory of that name: it does not write into it, and without --force it does
#: not delete it either.
DEST_IS_A_DIRECTORY = re.compile(r"^(?:cannot delete non-empty directory|could not make way for new regular file): (.*)$",
                                 re.MULTILINE)

#: What one rsync says of its host (see :meth:`RsyncTransfer._run_task`): it answered (the file was
#: copied, or failed for a reason of its own), it did not (ssh or the connection failed), it timed
#: out (``timeout_sec``: no answer either), or no rsync ran (a file error found before running one,
#: a cancel): that says nothing of the host.
ANSWERED, NO_ANSWER, TIMED_OUT, NOT_RUN = "answered", "no answer", "timed out", "not run"
#: ``TaskStatus.info`` key: the ``file_errors`` keys of the files a task did not try because an
#: earlier file got no answer, when the host had answered since its last such failure (the transfers
#: module puts their items back to pending without using a try). Files not tried because the host
#: got no answer twice in a row, nor then to a quick check, are not listed: they fail a try, so a
#: hung host costs one ``timeout_sec`` per task (with the check, and a stage-out's listing), not one per file.
NOT_TRIED = "not_tried"
#: Files remembered as having timed out (run last in their next task): at most this many.
TIMED_OUT_MEMORY = 10_000
#: Seconds the check of a host gets (an ``rsync --list-only`` of a directory there, see
#: :meth:`RsyncTransfer._host_answers`) before its files are charged a try. Not bounded by
#: ``timeout_sec``: that says how long a copy may take, not how long ssh takes to log in.
PROBE_TIMEOUT_SEC = 10
#: At most this many destinations per ``rsync --list-only`` of a task's stage-out destinations
#: (see :meth:`RsyncTransfer._remote_directories`): rsync 3.5's client fails with "args[]
#: overflowed in do_cmd()" past about 990, and the command line must stay under the system's
#: limit on arguments (about 2 MB); :data:`LISTING_MAX_BYTES` bounds their length.
LISTING_CHUNK = 500
LISTING_MAX_BYTES = 256 * 1024
#: Seconds one such listing gets (``timeout_sec`` if less). It only stats the destinations: one
#: that takes longer (a hung directory on the host) costs the files their check, not their copy.
LISTING_TIMEOUT_SEC = 60
#: rsync's exit statuses for a listing that was made: 0, 23 (some destinations missing: no
#: directory there) and 24 (vanished). Any other (1 for a usage error, 4 for a name rsync would not
#: list, a connection failure) says the destinations could not be looked at.
LISTED = frozenset({0, 23, 24})
#: What :meth:`RsyncTransfer._run_bounded` returns for an rsync that could not start (a killed
#: one's status is minus its signal: -1 to -64).
NOT_STARTED = -1000
#: The ``extra_args`` an rsync that only looks (a listing, a check of the host) is given, with
#: their value (``--rsync-path=P`` or ``--rsync-path P``): those saying how to reach and run the
#: remote rsync. The others are a copy's (``-a`` would make a listing recurse, through links too;
#: ``--exclude`` would hide a destination from it).
#: The remote shell too (``--rsh``, ``-e``): a site that names its ssh there (``['--rsh', 'ssh -i
#: key']``) reaches the host only with it; given after ``-e ssh_command``, it wins, as in a copy.
LOOKING_OPTIONS = frozenset({"--rsync-path", "--timeout", "--contimeout", "--protocol", "--iconv", "--rsh", "-e"})
LOOKING_FLAGS = frozenset({"-4", "-6", "--ipv4", "--ipv6", "--blocking-io", "--no-blocking-io"})


def _looking_args(extra_args: Sequence[str]) -> list[str]:
    """The part of ``extra_args`` an rsync that only looks is given (see :data:`LOOKING_OPTIONS`)."""
    kept: list[str] = []
    args = iter(extra_args)
    for arg in args:
        if (arg in LOOKING_FLAGS or ("=" in arg and arg.partition("=")[0] in LOOKING_OPTIONS)
                or (arg.startswith("-e") and len(arg) > 2)):  # (-eCOMMAND: the short option and its value in one)
            kept.append(arg)
        elif arg in LOOKING_OPTIONS:
            value = next(args, None)  # (--rsync-path P: its value is the next argument)
            kept += [arg] if value is None else [arg, value]
    return kept


def split_address(netloc: str) -> tuple[str, Optional[int]]:
    """``user@host[:port]`` -> (``user@host``, port or None). Raises ValueError for a bad port."""
    user, at, hostport = netloc.rpartition("@")
    host, colon, port = hostport.rpartition(":")
    if not colon or (hostport.startswith("[") and not host.endswith("]")):
        return netloc, None  # no port (an IPv6 address in brackets has colons of its own)
    if not port.isdecimal() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port {port!r}")
    return f"{user}{at}{host}", int(port)


def _local_mode(options: RsyncOptions, location: TransferLocation) -> bool:
    address, port = split_address(location.netloc)
    # A port means a connection: rsync://localhost:2222 always goes through ssh.
    return not address or (options.local_mode_for_localhost and port is None and address.split("@")[-1] == "localhost")


#: The characters the remote rsync takes as wildcards. With ``--protect-args`` the path reaches the
#: remote rsync whole (no shell), and that rsync expands wildcards in it itself (rsync's manual:
#: "Wildcards are expanded on the remote host by rsync instead of a shell"): a source ``run[1].h5``
#: fetched ``run1.h5``, exit 0. Local mode (``rsync:///``) expands nothing.
WILDCARDS = frozenset("*?[]")


class RemoteNameError(ValueError):
    """A remote path rsync over ssh cannot name exactly (the message is the file's error)."""


#: The remote rsync reads each ``--protect-args`` argument into a buffer of MAXPATHLEN (4,096
#: bytes, its final NUL included) and silently cuts what does not fit: a destination of 4,096 bytes
#: or more was written at its first 4,095 bytes and reported done. Such an argument is refused.
REMOTE_PATH_MAX = 4096


def _remote_argument(address: str, path: str, named: str, verb: str) -> str:
    """``address:path``, the argument naming a remote path (``named``, the path the job gave);
    raises :class:`RemoteNameError` when ``path`` is too long for the remote rsync to take whole."""
    size = len(os.fsencode(path))
    if size >= REMOTE_PATH_MAX:
        # (The reason first: one_line cuts a long error, and the path is long.)
        raise RemoteNameError(
            f"rsync over ssh cannot {verb} a remote path of {REMOTE_PATH_MAX} bytes or more exactly (the remote rsync "
            f"cuts it to {REMOTE_PATH_MAX - 1}, MAXPATHLEN less one, and uses that); this one is {size} bytes, shorten "
            f"it or use a local:// location: {named}")
    return f"{address}:{path}"


def _has_wildcards(path: str) -> bool:
    return any(c in WILDCARDS for c in path)


def remote_source(path: str) -> str:
    """A remote source path as the remote rsync must receive it to take it literally: its wildcard
    characters backslash-escaped (the remote rsync's glob then matches the one name, and the local
    rsync accepts the file it sends back). A name holding a backslash *and* a wildcard character
    cannot be named so (rsync 3.5: escaping the backslash too makes the local rsync reject the file
    the remote one sends, "rejecting unrequested file-list name"; leaving it unescaped fetches the
    wrong file): refused (:class:`RemoteNameError`). A backslash alone needs no escape (no
    wildcard, no glob: the name is used as it is)."""
    if not _has_wildcards(path):
        return path
    if "\\" in path:
        raise RemoteNameError(
            f"rsync over ssh cannot fetch {path} exactly: its name holds both a backslash and a wildcard "
            "character (* ? [ ]), which the remote rsync expands; rename it, or use a local:// location")
    return "".join("\\" + c if c in WILDCARDS else c for c in path)


def remote_dest_link_name(options: RsyncOptions, location: TransferLocation, direction: TransferDirection,
                          f: TransferFile) -> Optional[str]:
    """For a stage-out whose remote destination's *name* holds wildcard characters: that name. The
    remote rsync expands wildcards in its destination argument too, and an escape does not help
    there (with nothing matching, the name is created with the backslashes in it; unescaped, an
    existing ``run1.h5`` is overwritten for ``run[1].h5``). So such a file is sent as a link of that
    name (followed: ``--copy-links``) into its directory, and the name travels in rsync's file list,
    which nothing expands. None when the destination needs nothing of the sort (local mode, no
    wildcard). Raises :class:`RemoteNameError` for what cannot be sent so: a wildcard in a directory
    of the destination, or in a recursive item's destination (rsync would then judge the links of
    the tree against the link's directory)."""
    if direction != TransferDirection.stage_out or _local_mode(options, location):
        return None
    dest = location.remote_path(f.dest.rstrip("/") if f.recursive else f.dest)
    if not _has_wildcards(dest):
        return None
    parent, _, name = dest.rpartition("/")
    if f.recursive or _has_wildcards(parent) or not name:
        where = "a directory of it" if _has_wildcards(parent) else "a recursive item's destination"
        raise RemoteNameError(
            f"rsync over ssh cannot write {dest} exactly: the remote rsync expands wildcard characters (* ? [ ]) "
            f"in {where} and may write elsewhere; rename it, or use a local:// location")
    return name


def rsync_command(options: RsyncOptions, location: TransferLocation, direction: TransferDirection,
                  f: TransferFile, link: Optional[str] = None) -> list[str]:
    """The rsync command line moving one file (pure; tests check it). The location's path prefix
    (rsync://me@host/scratch) is applied to the remote side; its port goes to ssh as ``-p``, since
    rsync's own ``host:path`` syntax has no place for one (``host:2222:/path`` is a remote path).

    A remote source's wildcard characters are escaped (:func:`remote_source`). A stage-out whose
    remote destination is named with wildcard characters (:func:`remote_dest_link_name`) sends
    ``link`` (a symbolic link to ``f.src`` named as the destination) into the destination's
    directory instead. Raises :class:`RemoteNameError` for a remote path that cannot be named
    exactly."""
    local_mode = _local_mode(options, location)
    address, port = split_address(location.netloc)
    link_name = remote_dest_link_name(options, location, direction, f)
    if link_name is not None and (link is None or PurePosixPath(link).name != link_name):
        raise ValueError(f"the destination {f.dest} needs a link named {link_name!r} to its source")
    sent_as_link = link is not None and direction == TransferDirection.stage_out and not local_mode and not f.recursive
    if sent_as_link and names_a_directory(f.dest):
        # (PurePosixPath("/out/dir/").name is "dir", "/out/dir/".rpartition("/")[0] "/out/dir": /out/dir/dir)
        raise ValueError(f"the file destination {f.dest} names a directory")
    if sent_as_link and PurePosixPath(link).name != PurePosixPath(location.remote_path(f.dest)).name:
        raise ValueError(f"the link sent for {f.dest} must be named as it, not {PurePosixPath(link).name!r}")
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
        src = location.remote_path(src) if local_mode else _remote_argument(
            address, remote_source(location.remote_path(src)), location.remote_path(f.src), "fetch")
    elif local_mode:
        dest = location.remote_path(dest)
    elif sent_as_link:  # (checked above: given when the name needs it, named as the destination)
        # The link (named as the destination) into the destination's directory: the name travels in
        # rsync's file list, so a directory there is refused, not written into (see RsyncTransfer._run_one).
        src, dest = link, _remote_argument(address, f"{location.remote_path(dest).rpartition('/')[0]}/",
                                           location.remote_path(f.dest), "write")
    else:
        dest = _remote_argument(address, location.remote_path(dest), location.remote_path(f.dest), "write")
    return [*args, "--", src, dest]


#: How rsync writes a byte it will not print (outside a UTF-8 locale: every byte of a non-ASCII
#: name): a backslash, '#' and its three octal digits (``résult`` as ``r\#303\#251sult``). A byte
#: is at most \#377: ``\#400`` to ``\#777`` are not rsync's (a shell's or a name's own text) and stay.
RSYNC_ESCAPES = re.compile(r"(?:\\#[0-3][0-7]{2})+")

#: Characters a read-back name must not hold, so they stay escaped: controls (a newline would
#: split the error), format characters (U+202E RIGHT-TO-LEFT OVERRIDE shows ``a\u202egpj.exe`` as
#: ``aexe.jpg``; zero-width characters hide), line and paragraph separators, surrogates, private
#: use and unassigned code points.
_KEPT_ESCAPED = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def _unescape_names(text: str) -> str:
    r"""rsync's ``\#ooo`` escapes of a name's bytes back to the name where they are UTF-8 and hold
    no control, format or separator character (a newline in a name stays escaped: the error
    stays one line; a bidi override stays escaped: the name reads as it is)."""

    def name(match: re.Match) -> str:
        escaped = match.group(0)
        try:
            raw = bytes(int(escaped[i + 2:i + 5], 8) for i in range(0, len(escaped), 5))
            decoded = raw.decode("utf-8")
        except ValueError:  # not UTF-8 (UnicodeDecodeError), or not a byte: the text as rsync wrote it
            return escaped
        return escaped if any(unicodedata.category(c) in _KEPT_ESCAPED for c in decoded) else decoded

    return RSYNC_ESCAPES.sub(name, text)


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    meaningful = [ln for ln in lines if not ln.startswith("rsync error:")] or lines
    return _unescape_names(meaningful[0]) if meaningful else "no output"


def _not_recursive(src: str) -> str:
    return f"{src} is a directory (the transfer slot is not recursive)"


def _not_a_directory(src: str) -> str:
    # The local backend's words: a recursive slot given a file wrote the file where the directory
    # should be (local) or failed with rsync's "change_dir ... Not a directory" (rsync).
    return f"{src} is not a directory (the transfer slot is recursive)"


def _dest_is_a_directory(dest: str) -> str:
    return f"destination {dest} is a directory"


def _listed_name(path: str) -> Optional[str]:
    """An absolute remote path as ``rsync --list-only --relative`` lists it once listed as
    ``"/" + _listed_name(path)`` (see :meth:`RsyncTransfer._remote_directories`): without its
    leading ``/``, empty and ``.`` components (given ``/./``, rsync would start the relative part
    there); None for ``/`` and for a path holding ``..``: rsync takes ``sub/..`` away by name, the
    host's file system follows a link ``sub`` (the copy writes elsewhere than the listing looks)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return None if not parts or ".." in parts else "/".join(parts)


def _listing_target(name: str) -> str:
    """The remote path to list for ``_listed_name`` ``name``: the remote rsync expands wildcards,
    so they are escaped; a name that holds a backslash too cannot be escaped (see
    :func:`remote_source`), and its backslashes are matched by ``?`` instead. That lists the name
    and maybe others like it: only the exact name is looked up (:func:`_listed_bytes`)."""
    path = "/" + name
    if not _has_wildcards(path):
        return path
    return "".join("\\" + c if c in WILDCARDS else "?" if c == "\\" else c for c in path)


#: A line of ``rsync --list-only``: mode, size, date, time, then (after one space) the name.
LISTING_LINE = re.compile(r"(?P<mode>\S+) +\S+ \S+ \S+ (?P<name>.*)")
#: One byte rsync escaped in a name it lists (see :data:`RSYNC_ESCAPES`).
RSYNC_ESCAPE = re.compile(r"\\#([0-3][0-7]{2})")


def _listed_bytes(name: str) -> bytes:
    r"""A name as ``rsync --list-only`` wrote it, back to the bytes of the name: every ``\#ooo``
    (rsync escapes a control character, a byte it cannot print, and a backslash before ``#``),
    compared with :func:`os.fsencode` of the path looked up."""
    raw, end = bytearray(), 0
    for m in RSYNC_ESCAPE.finditer(name):
        raw += name[end:m.start()].encode("utf-8", "surrogateescape") + bytes([int(m.group(1), 8)])
        end = m.end()
    return bytes(raw + name[end:].encode("utf-8", "surrogateescape"))


def _quoted(path: str) -> str:
    """``path`` in double quotes, as rsync quotes the paths of its errors."""
    return f'"{path}"'


#: rsync's temporary file for ``NAME``: ``.NAME.`` and six characters of mkstemp's (``.big.bin.VV5L5J``).
RSYNC_TEMP = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9]{6}")


def _reference_ctime(directory: str) -> Optional[float]:
    """The file system's clock in ``directory`` now: the change time of a file created there (and
    removed at once), or None where there is no such directory (nothing stale can be in it)."""
    try:
        fd, path = tempfile.mkstemp(prefix=".balsam-rsync-ref-", dir=directory)
    except OSError:
        return None
    try:
        return os.fstat(fd).st_ctime
    finally:
        os.close(fd)
        os.unlink(path)


def remove_stale_temporaries(dest: str, recursive: bool, before: float) -> list[str]:
    """Remove the temporary files an rsync killed by SIGKILL left at a local destination (rsync
    removes its own on SIGTERM, but a SIGKILL, the OOM killer's or the backend's own after
    TERM_GRACE_SEC, leaves ``.NAME.XXXXXX`` for good). Called after a successful copy of ``dest``
    (a file, or with ``recursive`` the directory synchronised into); only files named as rsync names
    them, next to a ``NAME`` this copy wrote, and not changed since ``before`` (the file system's
    time when this copy started, read in the destination's own directory so that a file server's
    clock is compared with itself: another rsync still writing to the same destination changes its
    file after that, and is left alone). Returns the paths removed."""
    if recursive:
        walk = [(top, files) for top, _, files in os.walk(dest)]
    else:
        parent = os.path.dirname(dest)
        walk = [(parent, _listdir(parent))]
    wanted = None if recursive else os.path.basename(dest)
    removed = []
    for top, names in walk:
        for n in names:
            m = RSYNC_TEMP.fullmatch(n)
            if m is None or (wanted is not None and m["name"] != wanted):
                continue
            path = os.path.join(top, n)
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_ctime >= before:
                    continue
                # Only next to a file this copy wrote (renamed into place since ``before``): a user's
                # own file that merely looks like a temporary, in a tree synchronised into, stays.
                if os.lstat(os.path.join(top, m["name"])).st_ctime < before:
                    continue
                os.unlink(path)
            except OSError:
                continue
            removed.append(path)
    return removed


def _listdir(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


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


#: The site's directory of running rsyncs (see :class:`RunningRsyncs`).
RUNNING_DIR = ".rsync-running"


def command_names(options: "RsyncOptions") -> list[str]:
    """The program names an rsync of ``options`` runs as: ``rsync`` and ``ssh``, and the basenames of
    ``options.rsync`` and of the first word of ``options.ssh_command``."""
    names = ["rsync", "ssh", os.path.basename(options.rsync)]  # (a wrapper script may exec the real ones)
    try:
        ssh = shlex.split(options.ssh_command)
    except ValueError:
        ssh = options.ssh_command.split()
    if ssh:
        names.append(os.path.basename(ssh[0]))
    return sorted({n for n in names if n})


def _runs_one_of(proc: "object", names: Sequence[str]) -> bool:
    """Whether a ``psutil.Process`` runs one of the programs ``names``: its name (the kernel's
    ``comm``: a script's own name), or the basename of its executable or of its first argument."""
    import psutil

    seen = {proc.info.get("name") or ""}  # type: ignore[attr-defined]
    for read in (lambda: proc.exe(), lambda: (proc.cmdline() or [""])[0]):  # type: ignore[attr-defined]
        try:
            seen.add(os.path.basename(read()))
        except (psutil.Error, OSError):
            continue
    return bool(seen & set(names))


def _mine(proc: "object") -> bool:
    """Whether a ``psutil.Process`` belongs to this process's user (its real and effective uid)."""
    uids = proc.info.get("uids")  # type: ignore[attr-defined]
    return uids is not None and uids.real == os.getuid() and uids.effective == os.geteuid()


def end_rsync_group(pid: int, started: float, names: Sequence[str] = ("rsync", "ssh"),
                    grace_sec: float = TERM_GRACE_SEC) -> list[int]:
    """End what is left of the process group of an rsync started as ``pid`` at ``started`` (its
    session's: the rsync and the ssh it started); SIGTERM, then SIGKILL after ``grace_sec``.

    While that rsync runs (``pid`` is the process started at ``started``; a zombie too), every
    process of its group is its own, whatever it runs (an ssh ``ProxyCommand``'s shell included): a
    process joins a group of its own session only, and the group id cannot be given again while the
    pid or the group is in use. Once the rsync is gone, the group's id
    may have been given again (the pid reused by a process that made a group of its own and
    exited, leaving children: a daemon): only the processes of the group started after the rsync
    that run one of ``names`` (rsync, or the ssh command in use) are taken for its leftovers.
    A process that holds the pid now (another start time) means the group is not the rsync's:
    nothing is touched. Never a process of another user. Returns the pids ended."""
    import psutil

    leader = same_process(pid, started, running=False)
    procs = []
    for proc in psutil.process_iter(["create_time", "status", "name", "uids"]):
        try:
            if os.getpgid(proc.pid) != pid:
                continue
        except OSError:
            continue
        if proc.pid == pid and not leader:
            return []  # another process, with rsync's old pid: the group is not rsync's
        if proc.info["status"] == psutil.STATUS_ZOMBIE or not _mine(proc):
            continue
        if leader or ((proc.info["create_time"] or 0) >= started - START_TIME_TOLERANCE_SEC
                      and _runs_one_of(proc, names)):
            procs.append(proc)
    return terminate_processes(procs, grace_sec) if procs else []


class RunningRsyncs:
    """The rsyncs this process runs for a site, on disk: ``<site>/.rsync-running/<host>-<pid>-<ms>.json``
    (this process's host, pid and start time) lists each running rsync's pid and start time, and the
    programs they run as (``commands``: see :func:`end_rsync_group`).

    Each rsync runs in a session of its own (so that a timeout or cancel kills the ssh it started
    too), so nothing else ends it when the agent dies: a SIGKILLed agent's rsync ran on (its
    ``timeout_sec`` no longer applied: one to a hung host never ended) beside the next agent's copy of
    the same item. :meth:`end_orphans`, called when the backend is built (before the agent polls or
    submits anything through it), ends the recorded rsyncs of processes of this host that are gone.

    One file per process, replaced whole (a crash never leaves half a file): two processes never
    write the same one, so no lock is needed. A process that dies between starting an rsync and
    recording it (microseconds) leaves that one unrecorded."""

    def __init__(self, site_path: str, names: Sequence[str] = ("rsync", "ssh")) -> None:
        self.directory = Path(site_path) / RUNNING_DIR
        self.host = socket.gethostname()
        #: The programs this process's rsyncs run as (:func:`command_names`), recorded with them:
        #: once an rsync is gone, only leftovers of its group running one of them are ended.
        self.names = sorted(set(names))
        started = process_start_time(os.getpid()) or 0.0
        self.path = self.directory / f"{self.host}-{os.getpid()}-{int(started * 1000)}.json"
        self._lock = threading.Lock()
        self._groups: dict[int, float] = {}

    def add(self, pid: int) -> None:
        started = process_start_time(pid)
        if started is None:
            return  # already over
        with self._lock:
            self._groups[pid] = started
            self._save()

    def remove(self, pid: int) -> None:
        with self._lock:
            if self._groups.pop(pid, None) is not None:
                self._save()

    def _save(self) -> None:
        try:
            if not self._groups:
                self.path.unlink(missing_ok=True)
                return
            self.directory.mkdir(exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"host": self.host, "commands": self.names,
                                       "rsyncs": [[pid, t] for pid, t in self._groups.items()]}))
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("cannot record the running rsyncs in %s (a killed agent's would not be ended by the "
                           "next): %s", self.path, exc)

    def end_orphans(self) -> list[int]:
        """End the recorded rsyncs of processes of this host that no longer run; returns the pids ended."""
        try:
            names = sorted(p.name for p in self.directory.iterdir())
        except FileNotFoundError:
            return []
        ended: list[int] = []
        for name in names:
            stem, _, suffix = name.rpartition(".")  # <host>-<pid>-<ms>.json (or .tmp: being written)
            parts = stem.rsplit("-", 2)
            if suffix not in ("json", "tmp") or len(parts) != 3 or not (parts[1].isdecimal() and parts[2].isdecimal()):
                continue
            host, owner, owner_ms = parts[0], int(parts[1]), int(parts[2])
            if host != self.host:
                continue  # another host's agent: its pids mean nothing here
            if same_process(owner, owner_ms / 1000):
                continue  # its process runs (this one, or another on this host)
            path = self.directory / name
            if suffix == "json":
                commands = list(self.names)
                try:
                    recorded = json.loads(path.read_text())
                    rsyncs = recorded["rsyncs"]
                    # The programs of the dead agent's settings too (a changed ssh_command).
                    commands += [c for c in recorded.get("commands") or [] if isinstance(c, str)]
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                    logger.warning("unreadable record of running rsyncs %s: %s", path, exc)
                    rsyncs = []
                for entry in rsyncs:
                    try:
                        pid, started = int(entry[0]), float(entry[1])
                    except (ValueError, TypeError, IndexError):
                        continue
                    ended += end_rsync_group(pid, started, commands)
            path.unlink(missing_ok=True)
        return ended


#: The site's directory of the links a stage-out file is sent as (see :class:`LinkDirs`).
LINKS_DIR = ".rsync-links"
LINK_PREFIX = "balsam-rsync-link-"


def _private_directory(path: str) -> None:
    """Make ``path`` a directory only this user can write in (0700), or check that the one there
    belongs to this user (and make it so: an older agent made it with the default mode). Another
    user who could write in it (a group-writable one, without the sticky bit) could rename a link
    directory of it away and put one of their own in its place. Raises OSError saying what is wrong."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    if st.st_uid != os.getuid():
        raise OSError(errno.EPERM, f"owned by uid {st.st_uid}, not by this user (uid {os.getuid()})")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


class LinkDirs:
    """Where the links a remote stage-out file is sent as are made: one temporary directory per
    file, ``<base>/balsam-rsync-link-<host>-<pid>-<ms>-XXXXXXXX`` (this process's host, pid and
    start time), removed once its rsync is over. The base is the site's ``.rsync-links`` (no
    ``TMPDIR`` to fill up, and the next agent of the site sees what a killed one left; 0700, this
    user's: see :func:`_private_directory`), else (no site, or the site's cannot be written or is
    another user's) the system's temporary directory. :meth:`clean` (called
    when the backend is built) removes those of processes of this host that no longer run."""

    def __init__(self, site_path: Optional[str]) -> None:
        #: The site's ``.rsync-links``, kept to this user (see :func:`_private_directory`).
        self.own = str(Path(site_path) / LINKS_DIR) if site_path else None
        self.bases = ([self.own] if self.own else []) + [tempfile.gettempdir()]
        self.host = socket.gethostname()
        started = process_start_time(os.getpid()) or 0.0
        self.prefix = f"{LINK_PREFIX}{self.host}-{os.getpid()}-{int(started * 1000)}-"

    def make(self) -> str:
        """A new directory; raises OSError naming each directory tried when none can be made."""
        failures = []
        for base in self.bases:
            try:
                if base == self.own:
                    _private_directory(base)
                return tempfile.mkdtemp(prefix=self.prefix, dir=base)
            except OSError as exc:
                failures.append(f"{base}: {exc.strerror or exc}")
        raise OSError(f"cannot make a directory for the link a stage-out file is sent as ({'; '.join(failures)})")

    def clean(self) -> list[str]:
        """Remove the directories of processes of this host that no longer run (a SIGKILLed
        agent's); returns those removed."""
        removed = []
        for base in self.bases:
            for name in _listdir(base):
                if not name.startswith(LINK_PREFIX):
                    continue
                parts = name[len(LINK_PREFIX):].rsplit("-", 3)
                if len(parts) != 4 or parts[0] != self.host or not (parts[1].isdecimal() and parts[2].isdecimal()):
                    continue
                if same_process(int(parts[1]), int(parts[2]) / 1000):
                    continue  # its process runs (this one, or another agent of this host)
                path = os.path.join(base, name)
                try:
                    if os.lstat(path).st_uid != os.getuid():
                        continue
                except OSError:
                    continue
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed


class RsyncTransfer(TransferBackend):
    """rsync over ssh (``rsync://user@host``)."""

    options_schema = RsyncOptions
    description = "the rsync binary over ssh (rsync://user@host locations)"
    #: Small copies end in about a second: polled soon after their submission (see TransferBackend).
    quick_poll = True

    def __init__(self, options: object = None, *, site_path: Optional[str] = None) -> None:
        super().__init__(options, site_path=site_path)
        #: The running rsyncs, recorded in the site (none without one: a test's backend).
        self._running: Optional[RunningRsyncs] = None
        if site_path:
            self._running = RunningRsyncs(site_path, command_names(self.options))
            try:
                # Before anything is submitted: a killed agent's rsync must not write the
                # destinations its items are copied to again (nor outlive it at all).
                ended = self._running.end_orphans()
            except OSError as exc:
                logger.warning("rsync: cannot look for the rsyncs a previous agent left running in %s: %s",
                               self._running.directory, exc)
            else:
                if ended:
                    logger.warning("rsync: ended %d processes (rsync and its ssh) that a previous agent left running "
                                   "(pids %s); their items are copied again", len(ended), ", ".join(map(str, ended)))
        self._links = LinkDirs(site_path)
        leftovers = self._links.clean()
        if leftovers:
            logger.info("rsync: removed %d link directories a previous agent left (%s)", len(leftovers), leftovers[0])
        self._tasks = ThreadedTasks(self.options.threads, "balsam-rsync")
        self._hosts_lock = threading.Lock()
        #: Per host (a location's netloc; "" for local mode): how many rsyncs to it got no answer
        #: (timed out, ssh or the connection failed) since this backend was built (read when an
        #: rsync starts: see :meth:`_heard`).
        self._failures: dict[str, int] = {}
        #: The hosts whose last rsync got no answer, none having answered since: the number (in
        #: ``_failures``) of the first such failure (see :meth:`_run_task`).
        self._unanswered: dict[str, int] = {}
        #: Files whose last rsync timed out, by (location URL, direction, src, dest): their next
        #: task runs them last, so that one slow file does not hold up the files batched with it
        #: again (oldest forgotten first, past TIMED_OUT_MEMORY; a success forgets one).
        self._timed_out: dict[tuple[str, str, str, str], None] = {}

    @staticmethod
    def _host(options: RsyncOptions, location: TransferLocation) -> str:
        return "" if _local_mode(options, location) else location.netloc

    def _file_key(self, location: TransferLocation, direction: TransferDirection, f: TransferFile) -> tuple[str, str, str, str]:
        return (location.url, TransferDirection(direction).value, f.src, f.dest)

    def _slow_last(self, location: TransferLocation, direction: TransferDirection,
                   files: Sequence[TransferFile]) -> list[TransferFile]:
        """``files`` with those that timed out last time at the end (else in their order)."""
        with self._hosts_lock:
            slow = [self._file_key(location, direction, f) in self._timed_out for f in files]
        return [f for f, s in zip(files, slow) if not s] + [f for f, s in zip(files, slow) if s]

    def _failures_now(self, location: TransferLocation) -> int:
        """The host's failure count, read as an rsync to it starts (given back to :meth:`_heard`)."""
        with self._hosts_lock:
            return self._failures.get(self._host(self.options, location), 0)

    def _heard(self, location: TransferLocation, direction: TransferDirection, f: Optional[TransferFile], outcome: str,
               seen: int = 0) -> bool:
        """Record what an rsync of ``f`` said of its host; returns whether the host got no answer
        twice in a row: this rsync's, and one recorded before it started (``seen``: the host's
        failure count then), none answering in between. Two rsyncs running at once that both time
        out are not that: the second had started before the first's failure was known. ``f`` None:
        an rsync of no one file (see :meth:`_remote_directories`)."""
        host = self._host(self.options, location)
        key = self._file_key(location, direction, f) if f is not None else None
        with self._hosts_lock:
            if key is None:
                pass
            elif outcome == TIMED_OUT:
                self._timed_out.pop(key, None)
                self._timed_out[key] = None
                while len(self._timed_out) > TIMED_OUT_MEMORY:
                    del self._timed_out[next(iter(self._timed_out))]
            elif outcome == ANSWERED:
                self._timed_out.pop(key, None)
            if outcome == ANSWERED:
                self._unanswered.pop(host, None)
                return False
            if outcome in (NO_ANSWER, TIMED_OUT):
                first = self._unanswered.get(host)
                count = self._failures[host] = self._failures.get(host, 0) + 1
                self._unanswered.setdefault(host, count)
                return first is not None and first <= seen
            return False

    def _host_answers(self, location: TransferLocation, direction: TransferDirection, f: TransferFile,
                      stop: Optional[StopFlag] = None) -> bool:
        """Whether the host of ``location`` answers a quick check: an ``rsync --list-only`` of the
        directory of ``f``'s side there (only that entry: ``--dirs``, no trailing slash), stopped
        after :data:`PROBE_TIMEOUT_SEC`. Any exit but a connection failure is an answer (a missing
        directory too). In local mode the "host" is the file system holding that directory (a hung
        mount hangs the check too). An answer is recorded: the host's next failure is a first again."""
        local_mode = _local_mode(self.options, location)
        address, port = split_address(location.netloc)
        side = location.remote_path(f.src if direction == TransferDirection.stage_in else f.dest)
        directory = os.path.dirname(side.rstrip("/")) or "/"
        args = [self.options.rsync, "--list-only", "--dirs", "--protect-args"]
        if local_mode:
            target = directory
        else:
            args += ["-e", self.options.ssh_command if port is None else f"{self.options.ssh_command} -p {port}"]
            try:
                target = f"{address}:{remote_source(directory)}"
            except RemoteNameError:
                target = f"{address}:/"  # (only the host's answer matters)
        args += [*_looking_args(self.options.extra_args), "--", target]
        returncode = self._run_bounded(args, PROBE_TIMEOUT_SEC, stop)
        answered = returncode is not None and returncode not in CONNECTION_FAILED
        if answered:
            with self._hosts_lock:
                self._unanswered.pop(self._host(self.options, location), None)
        logger.info("rsync: %s %s a check after two rsyncs in a row got no answer", location.netloc or "this machine",
                    "answered" if answered else "did not answer")
        return answered

    def _run_bounded(self, args: list[str], timeout: float, stop: Optional[StopFlag] = None,
                     output: Optional[list[str]] = None) -> Optional[int]:
        """Run ``args`` (an rsync that only looks) in a session of its own, recorded like a copy;
        its exit status, or None when it ran past ``timeout`` or was cancelled; :data:`NOT_STARTED`
        when it could not start (its copies then fail saying why).
        Its standard output and error ('' and why, if it could not start) are appended to ``output`` when given;
        undecodable bytes are kept (``surrogateescape``: a listed name is compared byte for byte)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RSYNC_")}
        pipe = subprocess.PIPE if output is not None else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(args, stdout=pipe, stderr=pipe, stdin=subprocess.DEVNULL, encoding="utf-8",
                                    errors="surrogateescape", env=env, start_new_session=True)
        except OSError as exc:
            if output is not None:
                output += ["", exc.strerror or str(exc)]
            return NOT_STARTED
        if self._running is not None:
            self._running.add(proc.pid)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            _kill_group(proc)

        if stop is not None:
            stop.add_callback(kill)
        try:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
            if output is not None:
                output += [out, err]
            returncode = proc.returncode
        finally:
            if stop is not None:
                stop.remove_callback(kill)
            if proc.poll() is None:
                _kill_group(proc)
                try:
                    proc.communicate(timeout=TERM_GRACE_SEC)
                except subprocess.TimeoutExpired:
                    pass
            if self._running is not None:
                self._running.remove(proc.pid)
        return None if killed.is_set() else returncode

    def _local_problem(self, location: TransferLocation, direction: TransferDirection, f: TransferFile) -> str:
        """A file error found on this machine before running rsync, worded as the local backend's
        ('' when none): a missing source (rsync's --mkpath would first create the destination's
        directories, and leave them), a recursive item whose source is a file or a file item's a
        directory, a file item whose destination is a directory (rsync writes ``<dir>/<name>``, a
        path the job never named). Remote sides are rsync's to report (see :meth:`_explain`)."""
        local_mode = _local_mode(self.options, location)
        stage_in = direction == TransferDirection.stage_in
        if not f.recursive and names_a_directory(f.dest):
            return _names_a_directory(f.dest if stage_in else location.remote_path(f.dest))
        src = f.src if not stage_in else location.remote_path(f.src) if local_mode else None
        dest = f.dest if stage_in else location.remote_path(f.dest) if local_mode else None
        if src is not None:
            if not os.path.exists(src):
                # A link to nothing or a loop is named as such (ls lists it), in the agent's words.
                return symlink_problem(src) or f"no such file or directory: {src}"
            if f.recursive and not os.path.isdir(src):
                return _not_a_directory(src)
            if not f.recursive and os.path.isdir(src):
                return _not_recursive(src)  # rsync itself only says "skipping directory", exit 0
        if dest is not None and not f.recursive and os.path.isdir(dest):
            return _dest_is_a_directory(dest)
        return ""

    def _run_one(self, location: TransferLocation, direction: TransferDirection, f: TransferFile,
                 stop: Optional[StopFlag] = None, remote_directories: Optional[set[bytes]] = None) -> tuple[str, str]:
        """('' on success, else one line saying what went wrong; what the host said: ANSWERED,
        NO_ANSWER, TIMED_OUT or NOT_RUN)."""
        problem = self._local_problem(location, direction, f)
        if problem:
            return problem, NOT_RUN
        try:
            link_name = remote_dest_link_name(self.options, location, direction, f)
        except RemoteNameError as exc:
            return one_line(exc), NOT_RUN
        if (link_name is None and direction == TransferDirection.stage_out and not f.recursive
                and not _local_mode(self.options, location)):
            # A remote file is sent by name, as a link named as its destination into the
            # destination's directory: rsync given the path itself writes into a directory found
            # there (<dir>/<name>, a path the job never named); by name, a non-empty directory is
            # refused (DEST_IS_A_DIRECTORY: one made after the check below).
            link_name = PurePosixPath(location.remote_path(f.dest)).name or None
        if link_name is None:
            return self._run_rsync(location, direction, f, stop)
        # Sent by name, a file would replace a link to a directory there (see _remote_directories).
        name = _listed_name(location.remote_path(f.dest))
        if name is not None and os.fsencode(name) in (remote_directories or ()):
            return _dest_is_a_directory(location.remote_path(f.dest)), NOT_RUN
        # A link of the destination's name to the source is sent into the destination's directory
        # (see remote_dest_link_name for a name holding wildcard characters).
        try:
            holder = self._links.make()
        except OSError as exc:
            return one_line(exc), NOT_RUN
        try:
            link = os.path.join(holder, link_name)
            try:
                os.symlink(os.path.abspath(f.src), link)
            except OSError as exc:
                # A name over 255 bytes (ENAMETOOLONG): this file's error, not its whole task's.
                return one_line(f"cannot make the link the file is sent as, named as its destination "
                                f"({exc.strerror or exc}): {location.remote_path(f.dest)}"), NOT_RUN
            return self._run_rsync(location, direction, f, stop, link)
        finally:
            shutil.rmtree(holder, ignore_errors=True)

    def _remote_directories(self, location: TransferLocation, direction: TransferDirection,
                            files: Sequence[TransferFile], stop: Optional[StopFlag] = None) -> set[bytes]:
        """For a task's remote stage-out files (over ssh), the destinations that are directories,
        links followed, as :func:`os.fsencode` of their :func:`_listed_name`: ``rsync --list-only
        --dirs --copy-dirlinks --relative`` of them all (one connection per :data:`LISTING_CHUNK`
        destinations, each stopped after :data:`LISTING_TIMEOUT_SEC`). A missing destination is
        no directory. Sent by name (see :meth:`_run_one`), a file would replace a symbolic link
        there, one to a directory too, and an empty directory; local and rsync:/// refuse a
        destination that is a directory, links followed (``--keep-dirlinks`` only concerns
        directories being sent, so it does not help).

        A listing that is not made (it timed out, could not start, or rsync exited other than
        :data:`LISTED`) leaves its destinations and the later ones unchecked: one WARNING, and
        their files are copied all the same, each bounded by its own ``timeout_sec`` (so a hung
        directory there costs its files a try, as before the listing). Not listed either: a
        destination holding ``..`` (see :func:`_listed_name`). A listing that was made is an
        answer of the host (see :meth:`_heard`); one that was not is not counted as a failure:
        the files say that themselves."""
        if direction != TransferDirection.stage_out or _local_mode(self.options, location):
            return set()
        address, port = split_address(location.netloc)
        targets: list[str] = []
        for f in files:
            name = _listed_name(location.remote_path(f.dest))
            # (A path the remote rsync would cut is not looked at: its copy is refused, see _remote_argument.)
            if (not f.recursive and not names_a_directory(f.dest) and name is not None
                    and len(os.fsencode(_listing_target(name))) < REMOTE_PATH_MAX):
                targets.append(f"{address}:{_listing_target(name)}")
        # Several sources need a destination, which --list-only never writes.
        command = [self.options.rsync, "--list-only", "--dirs", "--copy-dirlinks", "--relative", "--no-implied-dirs",
                   "--protect-args", "-e",
                   self.options.ssh_command if port is None else f"{self.options.ssh_command} -p {port}",
                   *_looking_args(self.options.extra_args), "--"]
        chunks: list[list[str]] = []
        size = 0
        for target in targets:
            if not chunks or len(chunks[-1]) == LISTING_CHUNK or size + len(os.fsencode(target)) > LISTING_MAX_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(target)
            size += len(os.fsencode(target)) + 1
        timeout = min(LISTING_TIMEOUT_SEC, self.options.timeout_sec)
        directories: set[bytes] = set()
        for done, chunk in enumerate(chunks):
            output: list[str] = []
            returncode = self._run_bounded([*command, *chunk, os.devnull], timeout, stop, output)
            if stop is not None and stop.is_set():
                return directories
            if returncode not in LISTED:
                why = (f"no answer within {timeout} s" if returncode is None else
                       f"cannot run {self.options.rsync!r}: {output[1]}" if returncode == NOT_STARTED else
                       f"rsync exited {returncode}: {_last_error_line(output[1] or output[0])}")
                logger.warning("rsync: %s", one_line(
                    f"could not look at the destinations of {sum(map(len, chunks[done:]))} stage-out file(s) on "
                    f"{location.netloc} ({why}): they are copied without checking for a directory or a link to one "
                    "there (which the file would replace)"))
                return directories
            self._heard(location, direction, None, ANSWERED)
            for line in output[0].split("\n"):
                m = LISTING_LINE.fullmatch(line)
                if m is not None and m["mode"].startswith("d"):
                    directories.add(_listed_bytes(m["name"]))
        return directories

    def _explain(self, location: TransferLocation, direction: TransferDirection, f: TransferFile,
                 link: Optional[str], returncode: int, output: str) -> str:
        """A failed rsync's error where rsync's own words would mislead ('' for rsync's words): the
        local backend's words for a remote source of a recursive item that is a file, and for a
        remote file destination that is a non-empty directory; a file sent by name into its
        directory (see :meth:`_run_one`) named as the destination the job gave, not that directory."""
        output = _unescape_names(output)
        if f.recursive and direction == TransferDirection.stage_in and not _local_mode(self.options, location):
            src = location.remote_path(f.src)
            if any(m["path"].rstrip("/") == src.rstrip("/") for m in SOURCE_NOT_A_DIRECTORY.finditer(output)):
                return _not_a_directory(src)
        if link is None or direction != TransferDirection.stage_out:
            return ""
        dest = location.remote_path(f.dest)
        if any(m.group(1).strip() == os.path.basename(link) for m in DEST_IS_A_DIRECTORY.finditer(output)):
            return _dest_is_a_directory(dest)
        # rsync names the directory it was given ("mkdir "/out/sub/" failed"): given the destination
        # itself, it names that ("mkdir "/out/sub/r.txt" failed"), the path the job wrote.
        parent = f'"{dest.rpartition("/")[0]}/"'
        line = _last_error_line(output)
        return f"rsync exited {returncode}: {line.replace(parent, _quoted(dest))}" if parent in line else ""

    def _run_rsync(self, location: TransferLocation, direction: TransferDirection, f: TransferFile,
                   stop: Optional[StopFlag], link: Optional[str] = None) -> tuple[str, str]:
        try:
            args = rsync_command(self.options, location, direction, f, link)
        except RemoteNameError as exc:
            return one_line(exc), NOT_RUN
        # A destination on this machine: rsync temporaries a SIGKILLed rsync left there are removed
        # once this copy succeeds (those of a remote host are out of reach).
        local_dest = None
        if direction == TransferDirection.stage_in:
            local_dest = f.dest
        elif _local_mode(self.options, location):
            local_dest = location.remote_path(f.dest)
        before = None
        if local_dest is not None:
            before = _reference_ctime(local_dest.rstrip("/") if f.recursive else os.path.dirname(local_dest))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RSYNC_")}
        try:
            # A session of its own: killing its process group kills the ssh it starts too (killing
            # rsync alone left ssh running, one per timed-out file).
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        except FileNotFoundError:
            return f"cannot run {self.options.rsync!r}: not found on PATH", NOT_RUN
        except OSError as exc:  # not executable (PermissionError), not a program (ENOEXEC), ...: each file says so
            return one_line(f"cannot run {self.options.rsync!r}: {exc.strerror or exc}"), NOT_RUN
        if self._running is not None:
            # Recorded until it is over: the next agent ends it if this process dies first.
            self._running.add(proc.pid)
        # rsync names the link it was given (<site>/.rsync-links/balsam-rsync-link-*/out.txt): the
        # job named its source (replaced before the error is made one line, and maybe cut).
        named = (lambda text: text) if link is None else (lambda text: text.replace(link, f.src))
        try:
            result = self._wait_rsync(proc, f, stop,
                                      lambda rc, output: self._explain(location, direction, f, link, rc, output), named)
        finally:
            if self._running is not None:
                self._running.remove(proc.pid)
        if not result[0] and local_dest is not None and before is not None:
            removed = remove_stale_temporaries(local_dest.rstrip("/") if f.recursive else local_dest, f.recursive, before)
            if removed:
                logger.info("rsync: removed %d temporary file(s) a killed rsync left (%s)", len(removed), ", ".join(removed[:3]))
        return result

    def _wait_rsync(self, proc: subprocess.Popen, f: TransferFile, stop: Optional[StopFlag],
                    explain: Callable[[int, str], str] = lambda returncode, output: "",
                    named: Callable[[str], str] = lambda text: text) -> tuple[str, str]:
        """Wait for the rsync of ``f``: ('' on success, else its error, ``named`` applied before it
        is made one line; what the host said)."""
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
                return f"rsync of {f.src} did not finish within {self.options.timeout_sec} s", TIMED_OUT
        finally:
            if stop is not None:
                stop.remove_callback(kill)
            if proc.poll() is None:  # an exception above: never leave it running
                _kill_group(proc)
                proc.wait()
        if killed.is_set():
            return "cancelled", NOT_RUN
        if proc.returncode == 0:
            if not f.recursive and any(line.startswith(SKIPPED_DIRECTORY) for line in (out + "\n" + err).splitlines()):
                return _not_recursive(f.src), ANSWERED
            return "", ANSWERED
        if proc.returncode in CONNECTION_FAILED:
            return one_line(named(f"rsync exited {proc.returncode}: {_last_error_line(err or out)}")), NO_ANSWER
        return one_line(named(explain(proc.returncode, err or out) or
                              f"rsync exited {proc.returncode}: {_last_error_line(err or out)}")), ANSWERED

    def _run_task(self, location: TransferLocation, direction: TransferDirection, files: Sequence[TransferFile],
                  stop: Optional[StopFlag] = None) -> TaskStatus:
        """Copy ``files`` one rsync at a time. After an rsync gets no answer (it timed out, or ssh or
        the connection failed), the task's remaining files are not tried. If an rsync to the host
        answered since its last such failure (this file may just be slow: an rsync of another file
        answered), they are listed in ``info[NOT_TRIED]``: the agent submits them again without
        using a try, and a task runs the files that timed out last. If none did (no answer twice in
        a row: the second rsync started after the first failure was recorded, so two files failing
        at once are not that), the host is checked (:meth:`_host_answers`: two slow files in a row
        look the same); when it does not answer that either (the host looks down) they fail a try,
        so a hung host costs one ``timeout_sec``, the check and (stage-outs over ssh) the listing of
        :meth:`_remote_directories` (at most ``min(LISTING_TIMEOUT_SEC, timeout_sec)``) per task,
        not one ``timeout_sec`` per file."""
        errors: dict[str, str] = {}
        failed: set[str] = set()  # destinations whose own rsync failed
        not_tried: list[str] = []
        give_up, spare = "", False
        where = location.netloc or "this machine"
        # (Whatever the listing says, the files run: the first one always does, so each task
        # charges or copies at least one file and every item goes on toward max_attempts.)
        directories = self._remote_directories(location, direction, files, stop)
        if stop is not None and stop.is_set():
            return TaskStatus(TaskState.failed, "cancelled", retryable=True)
        for f in self._slow_last(location, direction, files):
            if stop is not None and stop.is_set():
                return TaskStatus(TaskState.failed, "cancelled", retryable=True)
            if give_up:
                errors.setdefault(f.dest, give_up)
                if spare and f.dest not in failed and f.dest not in not_tried:
                    not_tried.append(f.dest)
                continue
            seen = self._failures_now(location)
            error, outcome = self._run_one(location, direction, f, stop, directories)
            if stop is not None and stop.is_set():
                return TaskStatus(TaskState.failed, "cancelled", retryable=True)
            if error:
                errors[f.dest] = error
                failed.add(f.dest)
            twice = self._heard(location, direction, f, outcome, seen)
            if outcome in (NO_ANSWER, TIMED_OUT):
                # Two slow files in a row look like a host that is down: a quick check tells them
                # apart (it answering spares the rest; a hung host costs timeout_sec + the check, after the listing).
                answers = twice and self._host_answers(location, direction, f, stop)
                if stop is not None and stop.is_set():
                    return TaskStatus(TaskState.failed, "cancelled", retryable=True)
                spare = not twice or answers
                give_up = one_line(f"not tried: an earlier file of this task failed ({error})" +
                                   ("; submitted again without using a try" if spare else
                                    f", the second rsync in a row to {where} that got no answer, nor did a check of it"))
        info: dict[str, object] = {"files": len(files), "files_done": len(files) - len(errors)}
        if not_tried:
            info[NOT_TRIED] = not_tried
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
        if host.startswith("-"):
            # ssh would take it for an option (-oProxyCommand=... runs a command); rsync 3.5 refuses it
            # itself, older ones pass it on. (The user part reaches ssh as the value of -l: harmless.)
            raise TransferError(f"bad rsync host {host!r} in {location.url!r}: a host cannot start with '-'",
                                retryable=False)

    def poll_tasks(self, task_ids: Sequence[str]) -> Mapping[str, TaskStatus]:
        return self._tasks.statuses(task_ids)

    def cancel_task(self, task_id: str) -> None:
        self._tasks.cancel(task_id)

    def close(self) -> None:
        self._tasks.close()
