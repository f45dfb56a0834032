"""The queue behind the ``local`` scheduler: batch scripts as background processes of this machine.

It is a small command (``python -m balsam.builtin.local_queue --state-dir DIR submit|status|delete|history|find``)
so the ``local`` scheduler driver works exactly like the others: it renders a command, an injected
runner runs it, and the driver parses what it printed. Job records live in ``DIR/jobs.json``
(guarded by a file lock), so a restarted agent still knows its jobs and only jobs submitted here
are ever reported.

Each job runs ``<script>`` (or ``bash <script>`` when the script is not executable) in a new
session, with ``BALSAM_LOCAL_JOB_ID`` in its environment and stdout+stderr in ``<script>.output``.
A small ``sh`` wrapper records the exit status in ``DIR/jobs/<id>.exit`` when the script ends. It
runs the script only once ``submit`` has stored the job's record and written ``go`` to its stdin: a
submit that fails or dies before that closes the pipe, and the wrapper exits with the script unrun
(leaving ``DIR/jobs/<id>.unstarted``: a record stored before the submit died says "never started").

Job ids count up from a start drawn once per state directory (:func:`first_job_id`), not from 1,
so that sites on other hosts or with other directories, sharing one API server, get other ids.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import sys
import time
from pathlib import Path

from balsam.process_identity import START_TIME_TOLERANCE_SEC, process_start_time, process_state, terminate_processes

# What `status` does not need is imported where it is used: the site agent runs `status` every
# sync_period (1 s in the demo), and each import is CPU spent every poll (docs/performance.md).
# Out of that path: argparse (status reads its own argv, main()), socket and subprocess (submit),
# psutil (ending a job's processes: _kill_tree), typing (annotations only, postponed by the
# __future__ import; type checkers take the name TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any, Optional

#: Finished records older than this are dropped from jobs.json.
KEEP_FINISHED_SEC = 7 * 24 * 3600
#: A job still running this long after its wall time is killed (its launcher should have exited).
WALLTIME_GRACE_SEC = 120
TERM_GRACE_SEC = 5.0

# A BatchJob's scheduler_id is a 32-bit signed integer in the API (openapi int32), so ids stay
# below 2**31. A new directory's first id lies in [2**20, 2**30): above every id of a directory
# from before ids were drawn (those counted from 1), and with 2**30 ids of room above it.
FIRST_ID_MIN = 1 << 20
FIRST_ID_MAX = 1 << 30
MAX_JOB_ID = (1 << 31) - 1

# The wrapper waits for "go" on its stdin (a pipe from submit), runs the script with stdin from
# /dev/null, then writes "<exit status> <epoch seconds>" next to the records. Without "go" (submit
# could not store the record, or died: the pipe closes) the script never runs, no exit file is
# written, and an empty <id>.unstarted is: a submit killed after storing the record (a runner's
# timeout, the OOM killer) left a record of a running job whose end read as "ended without recording
# an exit status", as if the script had run and died.
_WRAPPER = ('IFS= read -r go; [ "$go" = go ] || { : > "${BALSAM_LOCAL_EXIT_FILE%.exit}.unstarted"; exit 125; }; '
            'exec </dev/null; "$@"; rc=$?; echo "$rc $(date +%s.%N)" > "$BALSAM_LOCAL_EXIT_FILE"; exit $rc')
#: The record of how a job ended when the records could not be stored then (a full disk): an empty
#: file, read by _settle. Best effort: a full tmpfs takes an empty file, but ext4 or xfs may need a
#: directory block, and an inode quota refuses any new file; without it the job settles LOST (it is
#: ended all the same).
_END_MARKERS = {"CANCELLED": "deleted", "TIMEOUT": None}
#: The endings of a job's files in DIR/jobs, removed with its record (KEEP_FINISHED_SEC after its end).
_JOB_FILE_ENDINGS = ("exit", "unstarted", *(state.lower() for state in _END_MARKERS))
#: Left in jobs/ by submit before it starts a wrapper, and never removed: the evidence that a job
#: may still run from this directory (_check_no_jobs_left). Its ending is no job file's.
_STARTED_MARKER = ".started"
#: submit's exit status when the state directory has no room (ENOSPC, EDQUOT): nothing was started,
#: and the same submit works once there is room. The local scheduler reads it as a typed "no room"
#: (SchedulerError.no_room); 1 is any other failure to try again, 2 a refusal for good.
EXIT_NO_ROOM = 3
#: balsam.util.NO_ROOM_ERRNOS, again: this module stays off balsam.util (its logging set-up) for the
#: start-up cost of the status poll the agent runs every sync_period.
_NO_ROOM_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


class QueueError(Exception):
    """A request the queue refuses (unknown job id, missing script)."""


class QueueTransientError(QueueError):
    """A failure that may pass (the lock held too long by another queue command, a state directory
    that cannot be reached or used now): exit status 1, a try the local scheduler counts (3, then
    the BatchJob is submit_failed), not 2, a refusal for good (submit_failed on the first)."""


class QueueStorageError(QueueTransientError):
    """The state directory cannot be written (full, over quota, read-only): exit status
    :data:`EXIT_NO_ROOM` for a full or over-quota disk (``no_room``), which the site agent waits out
    (docs/reliability.md, "When the disk is full"), else 1, not 2 (a refusal for good): tried again
    up to 3 times, then the BatchJob is submit_failed."""

    def __init__(self, message: str, *, no_room: bool = False) -> None:
        super().__init__(message)
        self.no_room = no_room

    @classmethod
    def of(cls, what: str, exc: OSError) -> "QueueStorageError":
        """``cannot <what>: <the system's reason>``, one line: no room (ENOSPC, EDQUOT) by its errno."""
        return cls(f"cannot {what}: {exc.strerror or exc}", no_room=exc.errno in _NO_ROOM_ERRNOS)


def first_job_id(host: str, state_dir: Path, nonce: bytes) -> int:
    """The first job id of a new state directory, in [FIRST_ID_MIN, FIRST_ID_MAX).

    Why a drawn start and a counter, not the launcher's pid as Balsam 0.7 did: the id is in the
    job's environment (BALSAM_LOCAL_JOB_ID), its wrapper's name and its exit file before the
    process exists, and pids are reused on one host, while records (keyed by id) are kept for
    days. Counting from one start keeps ids unique and increasing within the directory; a restarted
    agent continues from the stored counter. Why hash the host and the directory with a random
    nonce: the nonce alone separates a directory wiped and made again at the same path, and hosts
    (containers) with the same name; the host and path separate two directories even where the
    nonce does not differ (tests pin it), so their first ids differ by construction, not by luck.
    Two directories' ranges overlap only if their starts lie within the jobs submitted of each
    other: about 2 * n / 2**30 for n jobs each.
    """
    # Here, not at the top: once per state directory, and the status command run every sync_period
    # of the agent would import it each time for nothing.
    import hashlib

    material = b"\0".join((host.encode("utf-8", "surrogateescape"), os.fsencode(str(state_dir)), nonce))
    digest = hashlib.sha256(material).digest()
    return FIRST_ID_MIN + int.from_bytes(digest[:8], "big") % (FIRST_ID_MAX - FIRST_ID_MIN)


def _nonce() -> bytes:
    return os.urandom(16)  # what secrets.token_bytes is, without importing secrets (and random)


#: How long a queue command waits for another one holding the queue's lock.
LOCK_TIMEOUT_SEC = 30.0


class QueueLock:
    """The queue's lock: an exclusive flock(2) on ``jobs.json.lock``, waited for up to ``timeout``
    seconds (then a QueueError naming the file). The same lock the filelock package takes on Unix,
    written out here because this command runs every scheduler ``sync_period`` of the site agent
    (1 s in the demo) and importing filelock was a fifth of its CPU (0.03 of 0.14 s)."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._fd: Optional[int] = None
        #: The lock file was there when this command took the lock (not made by it): a queue command
        #: took the lock here before, so a submit may have started jobs (LocalQueue._read).
        self.found = False

    def __enter__(self) -> "QueueLock":
        try:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
                self.found = True
            except FileNotFoundError:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                self.found = False
        except OSError as exc:
            # A new state directory on a full disk has no room for the file (ENOSPC: exit status
            # EXIT_NO_ROOM), or it cannot be written (EACCES, EROFS): one line, not a traceback.
            raise QueueStorageError.of(f"open {self.path}", exc) from None
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    # Both pass (ENOLCK: the lock server of an NFS mount; a long delete or submit
                    # holding it): exit status 1, a try, where 2 made a submit_failed BatchJob of
                    # a first try.
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise QueueTransientError(f"cannot lock {self.path}: {exc.strerror}") from None
                    if time.monotonic() >= deadline:
                        raise QueueTransientError(f"{self.path} is held by another queue command for more than "
                                                  f"{self.timeout:g} s") from None
                    time.sleep(0.05)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

class LocalQueue:
    """The queue of one state directory. ``create``: make the directory (and its ``jobs``) now, as
    submit needs; the command line makes it for submit only: a directory without records has no
    jobs to list, find, report or delete, and making it (or its lock file) on a full disk failed
    those commands too."""

    def __init__(self, state_dir: Path, *, create: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self.db_path = self.state_dir / "jobs.json"
        self.lock = QueueLock(self.state_dir / "jobs.json.lock", timeout=LOCK_TIMEOUT_SEC)
        #: _is_missing found the lock file or jobs.json (unlocked): records were there (_read).
        self._records_seen = False
        if create:
            self._make_dirs()

    def _make_dirs(self) -> None:
        if not os.path.isdir(self.state_dir):
            self._check_absent()  # a dangling symlink, a file: its own line (mkdir said "File exists")
        for folder in (self.state_dir, self.state_dir / "jobs"):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                # A traceback (and exit status 1) where a missing state directory could not be made
                # on a full disk: now EXIT_NO_ROOM, the agent waits for room; one line naming it.
                raise QueueStorageError.of(f"create the state directory {folder}", exc) from None

    def _is_missing(self) -> bool:
        """Neither a lock file nor records (no state directory, or an empty one): no queue command
        took the lock here yet, so nothing was submitted, and a command that only reads answers so
        without the lock, whose file it would have to make. Asked without the lock: a submit takes
        the lock before it writes jobs.json, and neither file goes away once there.

        Only a directory that truly is not there, or is there and empty, is fresh: a state directory
        reached through a dangling symlink (scratch or NFS not mounted, a symlinked $BALSAM_HOME)
        or a path that is no directory answered "no jobs" (Path.exists is False for those too), and
        the agent ended the BatchJobs of launchers still running (QueueTransientError, exit 1)."""
        try:
            st = os.stat(self.state_dir)
        except FileNotFoundError:
            self._check_absent()
            return True
        except OSError as exc:  # ENOTDIR (a component is a file), ELOOP, EACCES: one line, exit 1
            raise QueueTransientError(f"cannot use the state directory {self.state_dir}: "
                                      f"{exc.strerror or exc}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise QueueTransientError(f"the state directory {self.state_dir} is not a directory")
        if self._records_present():
            self._records_seen = True
            return False
        try:
            self._check_no_jobs_left()
        except QueueTransientError:
            # Asked without the lock: a first submit may have made the lock and jobs.json, and
            # started its wrapper, between the look above and the scan, which then found that
            # wrapper (a healthy queue answered exit 1). Records there now: not missing.
            if self._records_present():
                self._records_seen = True
                return False
            raise
        return True

    def _records_present(self) -> bool:
        """The lock file or jobs.json is there (lstat): some queue command took the lock here."""
        for name in (self.lock.path.name, self.db_path.name):
            try:
                os.lstat(self.state_dir / name)
                return True
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise QueueTransientError(f"cannot use {self.state_dir / name}: {exc.strerror or exc}") from None
        return False

    def _check_absent(self) -> None:
        """``state_dir`` (not found by stat) is absent, not behind a dangling symlink: the nearest
        of it and its parents that exists (lstat) must be a directory as stat sees it."""
        for path in (self.state_dir, *self.state_dir.parents):
            link = False  # lstat found nothing (FileNotFoundError): look further up
            try:
                link = stat.S_ISLNK(os.lstat(path).st_mode)
                st = os.stat(path)
            except FileNotFoundError:
                if not link:
                    continue
                # A symlink whose target is gone: scratch or NFS not mounted, $BALSAM_HOME's target
                # moved. Made afresh here, its jobs would be lost to the agent's polls.
                raise QueueTransientError(
                    f"the state directory {self.state_dir} is not reachable: {path} is a symlink to "
                    f"{os.readlink(path)!r} (No such file or directory): not mounted?") from None
            except OSError as exc:  # ELOOP, EACCES: one line
                raise QueueTransientError(f"cannot use the state directory {self.state_dir}: "
                                          f"{path}: {exc.strerror or exc}") from None
            if not stat.S_ISDIR(st.st_mode):
                raise QueueTransientError(f"the state directory {self.state_dir} cannot be made: "
                                          f"{path} is not a directory")
            return

    def _check_no_jobs_left(self, *, scan: bool = False, lock_kept: bool = False) -> None:
        """A state directory without records whose jobs are still there: their files in ``jobs``
        (an exit status, "never started") or a wrapper still running one. jobs.json and its lock
        deleted while a job ran answered "no jobs" (rc 0), and the agent ended the BatchJob of a
        launcher still running. One line (QueueTransientError, exit 1), naming what is left.

        ``scan``: look for live wrappers even without the marker submit leaves (_STARTED_MARKER):
        the caller saw records a moment ago that are gone now (LocalQueue._read). ``lock_kept``: only jobs.json is gone (the line says so)."""
        jobs_dir = self.state_dir / "jobs"
        try:
            names = os.listdir(jobs_dir)
        except FileNotFoundError:
            # No submit made it (it makes jobs/ before it takes the lock): nothing ran from here,
            # and no look at the processes on each poll of a directory that was never used.
            names = []
            if not scan:
                return
        except OSError as exc:
            raise QueueTransientError(f"cannot list {jobs_dir}: {exc.strerror or exc}") from None
        left = sorted(name for name in names if name.partition(".")[2] in _JOB_FILE_ENDINGS)
        # The process scan (psutil, every process of this user) only where a wrapper was ever
        # started from here (submit leaves _STARTED_MARKER first, and status leaves it in a
        # directory from before the marker whose records list a job: _mark_started), or where the
        # caller asks: a directory whose first submit failed before its lock (no room) keeps an
        # empty jobs/, and each status poll of it paid for a scan growing with the process count.
        alive = [] if left or not (scan or _STARTED_MARKER in names) else self._live_wrappers()
        if left or alive:
            what = (f"{len(left)} job files in {jobs_dir} ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''})"
                    if left else f"the wrapper of job {alive[0][0]} (pid {alive[0][1]}) still runs")
            raise QueueTransientError(
                f"{self.db_path} {'is' if lock_kept else 'and its lock are'} missing but {what}: the records were deleted; "
                f"restore them, or end those jobs and move {self.state_dir} aside")

    def _mark_started(self) -> None:
        """Leave _STARTED_MARKER in a directory whose records list jobs (each had a wrapper) but that
        has none: one used before submit left it. Without it, jobs.json and its lock deleted there
        while a job ran answered "no jobs" (no scan for its wrapper). Best effort (a full disk:
        the next poll tries again); a stat per status poll of a directory with records."""
        marker = self.state_dir / "jobs" / _STARTED_MARKER
        if os.path.lexists(marker):
            return
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o644))
        except OSError:
            pass

    def _live_wrappers(self) -> list[tuple[int, int]]:
        """(job id, pid) of the wrappers (_WRAPPER, named balsam-local-<id>) still running a job of
        this state directory, as their BALSAM_LOCAL_EXIT_FILE tells. Read only where the records are
        missing (rare): psutil and a look at every process of this user."""
        import psutil

        jobs_dir = os.path.realpath(self.state_dir / "jobs")
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            if len(cmdline) < 4 or cmdline[1] != "-c" or not cmdline[3].startswith("balsam-local-"):
                continue
            try:
                exit_file = proc.environ().get("BALSAM_LOCAL_EXIT_FILE", "")
                if exit_file and not os.path.isabs(exit_file):
                    exit_file = os.path.join(proc.cwd(), exit_file)  # where the wrapper writes it
            except (psutil.Error, OSError):
                continue  # ended since, or another user's
            key = cmdline[3][len("balsam-local-"):]
            if exit_file and os.path.realpath(os.path.dirname(exit_file)) == jobs_dir and key.isdecimal():
                found.append((int(key), proc.pid))
        return sorted(found)

    # -- records --------------------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        try:
            with open(self.db_path) as fp:
                return json.load(fp)
        except FileNotFoundError:
            # Under the lock, with no records: the directory's first submit (no "next_id": it draws
            # the first id), or jobs.json deleted. Deleted alone (its lock kept), status answered
            # "no jobs" and history null while its jobs ran, and the agent ended their BatchJobs
            # (the server revoked their launchers' credentials: the launchers stopped, their jobs
            # cut off): the wrappers are looked for where one was started (the marker; status
            # leaves it in a directory from before the marker whose records list a job). Not by
            # the lock file alone: a first submit refused for room, and status polls before the
            # state directory was checked, leave it without records, and each poll of such a
            # directory paid for a process scan. A lock file this command made itself, though, is
            # one whose records were there a moment ago if _is_missing, unlocked, found some (a
            # first submit's found none): looked for whatever the marker, once.
            self._check_no_jobs_left(scan=self._records_seen and not self.lock.found, lock_kept=self.lock.found)
            return {"jobs": {}}  # no "next_id": submit draws the directory's first id
        except OSError as exc:  # permission denied, an I/O error: one line naming the file
            raise QueueStorageError.of(f"read {self.db_path}", exc) from None
        except ValueError as exc:
            # Writes are atomic (os.replace), so this is damage from outside: stop rather than
            # reuse job ids the API already knows. ValueError: JSONDecodeError, and the
            # UnicodeDecodeError of bytes that are not UTF-8 (which named no file).
            if isinstance(exc, json.JSONDecodeError):
                detail = f"{exc.msg} at line {exc.lineno}"
            elif isinstance(exc, UnicodeDecodeError):
                detail = f"not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"
            else:
                detail = str(exc)
            raise QueueError(f"{self.db_path} is not valid JSON ({detail}); fix or move it") from None

    def _write(self, db: dict[str, Any]) -> None:
        tmp = self.db_path.with_suffix(".json.tmp")
        try:
            with open(tmp, "w") as fp:
                json.dump(db, fp, indent=1, sort_keys=True)
            os.replace(tmp, self.db_path)
        except OSError as exc:
            # One line naming the file (it was a traceback), and no partial tmp left on a full disk.
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise QueueStorageError(f"cannot write {self.db_path}: {exc.strerror or exc}",
                                    no_room=exc.errno in _NO_ROOM_ERRNOS) from None

    def _exit_file(self, job_id: int) -> Path:
        return self.state_dir / "jobs" / f"{job_id}.exit"

    def _end_marker(self, job_id: int, native_state: str) -> Path:
        return self.state_dir / "jobs" / f"{job_id}.{native_state.lower()}"

    def _mark_ended(self, job_id: int, native_state: str) -> None:
        """Leave an empty marker that job ``job_id`` was ended here (``native_state``), for records
        a full disk had no room for: the job settles so at a later poll that can store it (not as
        LOST). An empty file, which a full disk still takes; best effort: the job is ended anyway."""
        try:
            os.close(os.open(self._end_marker(job_id, native_state), os.O_WRONLY | os.O_CREAT, 0o644))
        except OSError:
            pass

    # -- process checks -------------------------------------------------------------------------
    @staticmethod
    def _process(record: dict[str, Any]) -> Optional[int]:
        """The pid of the job's wrapper process if it still runs: the pid recorded *and* the
        process that started then (the rule of :func:`balsam.process_identity.same_process`: a pid
        given to another process since is not the job), not a zombie; else None. A record without
        both tells nothing: None. One reading of the process: its start and its state together."""
        pid, started = record.get("pid"), record.get("create_time")
        # A bool is an int to isinstance: True would read pid 1's start (a hand-edited record).
        if isinstance(pid, bool) or not isinstance(pid, int) or not isinstance(started, (int, float)):
            return None
        state = process_state(pid)
        if state is None or abs(state[0] - started) > START_TIME_TOLERANCE_SEC:
            return None
        if state[1]:  # a zombie
            try:  # our own child (same process submitted and polls): reap it
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            return None
        return pid

    def _settle(self, job_id: int, record: dict[str, Any], now: float) -> None:
        """Mark a job whose process is gone as finished, with its exit status when recorded."""
        exit_file = self._exit_file(job_id)
        record["state"] = "finished"
        record["end_time"] = now
        if self._end_marker(job_id, "unstarted").exists():
            # Its wrapper got no "go": the submit ended (killed) after storing this record.
            record["native_state"] = "LOST"
            record["message"] = "never started (submit ended before it)"
            return
        for native_state, message in _END_MARKERS.items():
            # Ended here (delete, wall time) when the records could not be stored: _mark_ended.
            if self._end_marker(job_id, native_state).exists():
                record["native_state"] = native_state
                record["message"] = message or (f"killed after exceeding its wall time of "
                                                f"{record.get('wall_time_min')} min")
                return
        try:
            parts = exit_file.read_text().split()
        except FileNotFoundError:
            parts = None
        except (OSError, ValueError):  # unreadable, or not text: as empty
            parts = []
        # An exit file is written "<status> <time>" by the wrapper; one the disk had no room for is
        # empty (created, then nothing written). Read as "finished" it made COMPLETED of any exit.
        code = parts[0] if parts else ""
        if code.lstrip("-").isdecimal():
            record["exit_code"] = int(code)
            record["native_state"] = "COMPLETED" if int(code) == 0 else "FAILED"
            if len(parts) > 1:
                try:
                    record["end_time"] = float(parts[1])
                except ValueError:  # a `date` without %N support: keep the time we noticed the end
                    pass
            record["end_time"] = max(record["end_time"], record["start_time"])
        elif parts is not None:
            record["native_state"] = "LOST"
            record["message"] = (f"exit status not recorded (its exit file is "
                                 f"{'empty' if not parts else 'unreadable'}: disk full?)")
        else:
            record.setdefault("native_state", "LOST")
            record.setdefault("message", "the job's process ended without recording an exit status")

    @staticmethod
    def _kill_tree(pid: int, started: float) -> None:
        """SIGTERM the job's process (``pid``, started at ``started``) and all its descendants, then
        SIGKILL whatever is left."""
        import signal

        import psutil

        try:
            proc = psutil.Process(pid)
            # After taking hold of the process (psutil signals only the one it holds): it is the
            # job's, not one given the pid since it was checked.
            if abs(proc.create_time() - started) > START_TIME_TOLERANCE_SEC:
                return
            procs = [proc] + proc.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the job is its own session and process group
        except (ProcessLookupError, PermissionError):
            pass
        terminate_processes(procs, TERM_GRACE_SEC)

    # -- commands -------------------------------------------------------------------------------
    def submit(
        self,
        script: Path,
        *,
        queue: str,
        project: str,
        num_nodes: int,
        wall_time_min: int,
        job_name: str,
        extra_env: Optional[dict[str, str]] = None,
    ) -> int:
        import socket  # submit's own (see the imports at the top)
        import subprocess

        script = Path(script).resolve()
        if not script.is_file():
            raise QueueError(f"batch script {script} does not exist")
        self._make_dirs()
        # Records deleted while a job runs: refused before the lock, whose file would otherwise be
        # made here and make status read the empty records (exit 0, the running job not listed).
        self._is_missing()
        with self.lock:
            # About to make jobs.json afresh if it alone was deleted: _read makes the same check,
            # under the lock. A submit that recreated it made status and history answer without the
            # job still running, and the agent ended that launcher's BatchJob.
            db = self._read()
            # A directory from before ids were drawn keeps counting from its own next_id: no id
            # it gave out is given again.
            next_id = db.get("next_id")
            if next_id is None:
                next_id = first_job_id(socket.gethostname(), self.state_dir.resolve(), _nonce())
            job_id = int(next_id)
            if job_id > MAX_JOB_ID:
                raise QueueError(f"{self.db_path}: job ids used up (next {job_id} > {MAX_JOB_ID}); "
                                 "move the directory aside to start a new range")
            db["next_id"] = job_id + 1
            now = time.time()
            db["jobs"] = {
                k: v
                for k, v in db["jobs"].items()
                if v.get("state") != "finished" or now - v.get("end_time", now) < KEEP_FINISHED_SEC
            }
            # The id is recorded before the job starts: a state directory that cannot be written
            # (full, over quota) fails the submit here, with nothing started. The job's own record
            # is stored before its script runs (the wrapper waits for "go"): a job that ran
            # unrecorded while the submit failed was submitted again by the agent (two launchers),
            # and neither status nor delete knew the first.
            self._write(db)
            # Files go with their records (they were kept for ever: a file per job ever run), and
            # so do those of jobs never recorded (a submit killed before it stored the record).
            self._remove_unrecorded_files(db["jobs"])
            exit_file = self._exit_file(job_id)
            self._remove_job_files(job_id)
            env = {**os.environ, **(extra_env or {})}
            env["BALSAM_LOCAL_JOB_ID"] = str(job_id)
            env["BALSAM_LOCAL_EXIT_FILE"] = str(exit_file)
            command = [str(script)] if os.access(script, os.X_OK) else ["/bin/bash", str(script)]
            try:
                os.close(os.open(self.state_dir / "jobs" / _STARTED_MARKER, os.O_WRONLY | os.O_CREAT, 0o644))
            except OSError as exc:  # nothing started; the id drawn is not given again
                error = QueueStorageError.of(f"create {self.state_dir / 'jobs' / _STARTED_MARKER}", exc)
                raise QueueStorageError(f"{error}; job {job_id} not started", no_room=error.no_room) from None
            try:
                output = open(f"{script}.output", "ab")
            except OSError as exc:  # nothing started; the id drawn is not given again
                error = QueueStorageError.of(f"open {script}.output", exc)
                raise QueueStorageError(f"{error}; job {job_id} not started", no_room=error.no_room) from None
            try:
                proc = subprocess.Popen(
                    ["/bin/sh", "-c", _WRAPPER, f"balsam-local-{job_id}", *command],
                    cwd=script.parent,
                    env=env,
                    stdin=subprocess.PIPE,  # "go" once the record is stored (_WRAPPER)
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            finally:
                output.close()
            # Our child, not reaped: readable even if it finished already (a zombie); `now` only
            # where psutil cannot read it at all.
            create_time = process_start_time(proc.pid)
            if create_time is None:
                create_time = now
            db["jobs"][str(job_id)] = {
                "pid": proc.pid,
                "create_time": create_time,
                "script": str(script),
                "queue": queue,
                "project": project,
                "num_nodes": num_nodes,
                "wall_time_min": wall_time_min,
                "job_name": job_name,
                "submit_time": now,
                "start_time": now,
                "state": "running",
            }
            stored = False
            try:
                self._write(db)
                stored = True
            except BaseException as exc:
                # The disk filled since the write above (or the submit is interrupted): the pipe
                # closes without "go", and the wrapper exits with the script unrun. A submit killed
                # outright closes the pipe too (the kernel closes its descriptors); the wrapper then
                # leaves <id>.unstarted, which a stored record settles by ("never started").
                proc.stdin.close()
                proc.wait()
                self._remove_job_files(job_id)  # no record of it: nothing to settle
                if isinstance(exc, QueueStorageError):
                    raise QueueStorageError(f"{exc}; job {job_id} not started", no_room=exc.no_room) from None
                raise
            finally:
                if stored:
                    # Once the record says running, the script is started, whatever interrupts
                    # the submit now (an exception raised here still reaches its caller).
                    try:
                        proc.stdin.write(b"go\n")
                        proc.stdin.close()
                    except OSError:
                        pass  # the wrapper is gone already (killed from outside): settled LOST at a poll
            return job_id

    def _remove_unrecorded_files(self, records: dict[str, Any]) -> None:
        try:
            names = os.listdir(self.state_dir / "jobs")
        except OSError:
            return
        for name in names:
            key, _, ending = name.partition(".")
            if ending in _JOB_FILE_ENDINGS and key not in records:
                try:
                    os.unlink(self.state_dir / "jobs" / name)
                except OSError:
                    pass  # best effort, as _remove_job_files

    def _remove_job_files(self, job_id: int) -> None:
        for ending in _JOB_FILE_ENDINGS:
            try:
                (self.state_dir / "jobs" / f"{job_id}.{ending}").unlink(missing_ok=True)
            except OSError:
                pass  # best effort: a file left behind costs an inode, and is read by no record

    def status(self) -> dict[str, Any]:
        """Jobs still running (finished ones leave the listing, as on a real scheduler)."""
        if self._is_missing():
            return {}
        with self.lock:
            db = self._read()
            if db["jobs"]:
                self._mark_started()
            now = time.time()
            listing = {}
            changed = False
            timed_out: list[int] = []
            for key, record in db["jobs"].items():
                if record.get("state") == "finished":
                    continue
                pid = self._process(record)
                if pid is None:
                    self._settle(int(key), record, now)
                    changed = True
                    continue
                limit = record["start_time"] + record["wall_time_min"] * 60 + WALLTIME_GRACE_SEC
                if record["wall_time_min"] > 0 and now > limit:
                    self._kill_tree(pid, record["create_time"])
                    record.update(state="finished", end_time=time.time(), native_state="TIMEOUT")
                    record["message"] = f"killed after exceeding its wall time of {record['wall_time_min']} min"
                    changed = True
                    timed_out.append(int(key))
                    continue
                listing[key] = {
                    "state": "running",
                    "queue": record["queue"],
                    "project": record["project"],
                    "num_nodes": record["num_nodes"],
                    "wall_time_min": record["wall_time_min"],
                    "elapsed_sec": now - record["start_time"],
                    "queued_sec": record["start_time"] - record["submit_time"],
                    # Epoch seconds: the agent's BatchJob.start_time (its own sighting of the job
                    # running is up to a sync_period later), the start `history` also reports.
                    "start_time": record["start_time"],
                }
            if changed:
                try:
                    self._write(db)
                except QueueStorageError:
                    # A full disk: the listing is still right (the ended jobs are left out); their
                    # records are settled again, and stored, at a poll that can write them (jobs
                    # killed here for their wall time by their markers, not as LOST).
                    for job_id in timed_out:
                        self._mark_ended(job_id, "TIMEOUT")
            return listing

    def delete(self, job_id: int) -> None:
        if self._is_missing():
            raise QueueError(f"no local job {job_id} (no records in {self.state_dir})")
        with self.lock:
            db = self._read()
            record = db["jobs"].get(str(job_id))
            if record is None:
                raise QueueError(f"no local job {job_id}")
            if record.get("state") == "finished":
                return
            pid = self._process(record)
            if pid is not None:
                self._kill_tree(pid, record["create_time"])
                record.update(state="finished", end_time=time.time(), native_state="CANCELLED")
                record["message"] = "deleted"
                # The job is ended, which is what was asked: a full disk does not fail the delete
                # (the agent tried again, and the record later settled LOST, not CANCELLED).
                try:
                    self._write(db)
                except QueueStorageError:
                    self._mark_ended(job_id, "CANCELLED")
            else:
                self._settle(job_id, record, time.time())
                try:
                    self._write(db)
                except QueueStorageError:
                    pass  # settled again, and stored, by a later command that can write


    def find(self, script: Path, job_name: str) -> list[int]:
        """The ids of the jobs submitted from ``script`` under ``job_name`` (any state, while their
        records are kept): how the agent tells whether a submission it lost track of took place."""
        script_text = str(Path(script).resolve())
        if self._is_missing():
            return []
        with self.lock:
            jobs = self._read()["jobs"]
        return sorted(int(key) for key, record in jobs.items()
                      if record.get("script") == script_text and record.get("job_name") == job_name)

    def history(self, job_id: int) -> Optional[dict[str, Any]]:
        """The job's record (settled if its process is gone); None for a job never submitted here."""
        if self._is_missing():
            return None
        with self.lock:
            db = self._read()
            record = db["jobs"].get(str(job_id))
            if record is None:
                return None
            if record.get("state") != "finished" and self._process(record) is None:
                self._settle(job_id, record, time.time())
                try:
                    self._write(db)
                except QueueStorageError:
                    # A full disk: answered from memory, as status does (it failed every cycle, and
                    # ended BatchJobs stayed running in the API); stored by a later command.
                    pass
            return dict(record, id=job_id)


def _parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m balsam.builtin.local_queue")
    parser.add_argument("--state-dir", required=True, type=Path)
    sub = parser.add_subparsers(dest="command", required=True)
    submit = sub.add_parser("submit")
    submit.add_argument("script", type=Path)
    submit.add_argument("--queue", default="local")
    submit.add_argument("--project", default="local")
    submit.add_argument("--nodes", type=int, default=1)
    submit.add_argument("--walltime", type=int, default=0, help="minutes (0: unlimited)")
    submit.add_argument("--name", default="balsam")
    submit.add_argument("--env", action="append", default=[], help="NAME=VALUE for the job")
    sub.add_parser("status")
    delete = sub.add_parser("delete")
    delete.add_argument("job_id", type=int)
    history = sub.add_parser("history", help="records of the jobs as a JSON object {id: record or null}")
    history.add_argument("job_ids", type=int, nargs="+")
    find = sub.add_parser("find", help="ids of the jobs submitted from SCRIPT under --name, as a JSON list")
    find.add_argument("script", type=Path)
    find.add_argument("--name", required=True)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 3 and argv[0] == "--state-dir" and argv[2] == "status" and not argv[1].startswith("-"):
        # The agent's poll as the local scheduler renders it, every sync_period: what argparse makes
        # of it, without importing argparse (and the shutil its help formatter imports) and building
        # the parser, ~6 ms of CPU a poll. Any other command line, and any error, is argparse's.
        state_dir, command, args = Path(argv[1]), "status", None
    else:
        args = _parser().parse_args(argv)
        state_dir, command = args.state_dir, args.command

    try:
        # The state directory is made by submit only, in this try (see LocalQueue): one that cannot
        # be made was a traceback.
        queue = LocalQueue(state_dir, create=False)
        if command == "status":
            print(json.dumps(queue.status()))
        elif command == "submit":
            env = dict(item.split("=", 1) for item in args.env)
            job_id = queue.submit(
                args.script,
                queue=args.queue,
                project=args.project,
                num_nodes=args.nodes,
                wall_time_min=args.walltime,
                job_name=args.name,
                extra_env=env,
            )
            print(job_id)
        elif command == "delete":
            queue.delete(args.job_id)
        elif command == "find":
            print(json.dumps(queue.find(args.script, args.name)))
        elif command == "history":
            print(json.dumps({str(job_id): queue.history(job_id) for job_id in args.job_ids}))
    except QueueStorageError as exc:
        print(f"local queue: {exc}", file=sys.stderr)
        return EXIT_NO_ROOM if exc.no_room else 1
    except QueueTransientError as exc:
        print(f"local queue: {exc}", file=sys.stderr)
        return 1
    except QueueError as exc:
        print(f"local queue: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Any other file the queue could not use (its str names the file): one line, and the
        # exit status of no room (ENOSPC, EDQUOT) or of a failure to try again, never 2.
        print(f"local queue: {exc}", file=sys.stderr)
        return EXIT_NO_ROOM if exc.errno in _NO_ROOM_ERRNOS else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
