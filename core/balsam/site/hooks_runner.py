"""Running app hooks on jobs: the shared logic of the processing module and its worker processes.

- :func:`default_update` applies a hook the app did *not* override, in the agent process, with no
  worker: STAGED_IN→PREPROCESSED (creating the job's workdir), RUN_DONE→POSTPROCESSED, RUN_ERROR→FAILED (with the tail of
  ``job.out``), RUN_TIMEOUT→RESTART_READY; ``run()`` apps get their return value or exception read
  from the markers in ``job.out``.
- :func:`run_hooks` runs user hooks in a worker process: one app instance per job, the hook's output
  appended to ``<workdir>/balsam.log``, an exception in a hook fails the job with the traceback.
  What a hook leaves is checked before it is sent (:func:`check_hook_state`): a state the state
  machine does not allow, or none at all, fails the job with the reason, since the server would
  refuse it and the job would stay leased to the processing session, never processed again.
Both return update dicts for ``PATCH /jobs/``; the worker's FAILED ones of a workdir it did not
prepare carry one field more, :data:`WORKDIR_KEY`, which the processing module takes off.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import io
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional

from .._api.run_markers import MarkerScan  # the client API owns the marker format, and its one scanner
from ..client.status_updater import refused_as_unknown
from ..models import job_workdir
from ..states import RUNNABLE_STATES, JobState, allowed_targets
from ..util import NO_ROOM_ERRNOS, api_text, create_job_output, tail_file

HOOK_FOR_STATE: dict[JobState, str] = {
    JobState.staged_in: "preprocess",
    JobState.run_done: "postprocess",
    JobState.run_error: "handle_error",
    JobState.run_timeout: "handle_timeout",
}
DEFAULT_TARGET: dict[JobState, JobState] = {
    JobState.staged_in: JobState.preprocessed,
    JobState.run_done: JobState.postprocessed,
    JobState.run_error: JobState.failed,
    JobState.run_timeout: JobState.restart_ready,
}
#: Job fields a hook may change and that are sent back to the API.
HOOK_WRITABLE_FIELDS = (
    "state",
    "state_data",
    "data",
    "tags",
    "return_code",
    "num_nodes",
    "ranks_per_node",
    "threads_per_rank",
    "threads_per_core",
    "launch_params",
    "gpus_per_rank",
    "node_packing_count",
    "wall_time_min",
    "serialized_parameters",
    "serialized_return_value",
    "serialized_exception",
    "pending_file_cleanup",
)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def api_json(value: Any) -> Any:
    """``value`` (JSON-like) with every string and key through :func:`balsam.util.api_text`: the
    server refuses a whole update for one NUL (422), and a refused hook result left its job leased
    to the processing session, never processed again."""
    if isinstance(value, str):
        return api_text(value)
    if isinstance(value, dict):
        return {api_text(k) if isinstance(k, str) else k: api_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [api_json(v) for v in value]
    return value


#: What 0.7 apps' postprocess hooks set to end a job; sent as POSTPROCESSED, which the server
#: takes on to JOB_FINISHED (after the job's stage-out, if it has one).
FINISHED_BY_POSTPROCESS = frozenset({JobState.finished.value, JobState.staged_out.value})

#: States only a launcher gives a job (it runs it): the state machine allows STAGED_IN -> RUNNING
#: for Balsam 0.7 launchers, but a hook that set it would leave a job that nothing runs.
_LAUNCHER_ONLY = frozenset({JobState.running})


def hook_targets(state: JobState) -> frozenset[JobState]:
    """The states the hook run on a job in ``state`` may give it: the state machine's own moves
    from ``state`` (unforced, as the server checks the agent's), less those only a launcher makes."""
    return allowed_targets(state, forced=False) - _LAUNCHER_ONLY


#: Moves a hook may make for Balsam 0.7's apps that the refusal message does not offer (as with
#: JOB_FINISHED from postprocess): a preprocess setting POSTPROCESSED skips the run, as 0.7's
#: "transfer-only" apps do, and the server starts the job's stage-out (or finishes it).
_COMPAT_ONLY: dict[JobState, frozenset[JobState]] = {JobState.staged_in: frozenset({JobState.postprocessed})}


def _state_list(state: JobState, targets: frozenset[JobState]) -> str:
    """``targets`` for a message: the default hook's state first, FAILED last; the 0.7
    compatibility moves left out (the message says what a hook should set)."""
    targets = targets - _COMPAT_ONLY.get(state, frozenset())
    order = [DEFAULT_TARGET[state], *JobState]
    order = [s for s in order if s != JobState.failed] + [JobState.failed]
    names = list(dict.fromkeys(s.value for s in order if s in targets))
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_hook_state(state: JobState, new_state: Any) -> Optional[str]:
    """None when a hook run on a job in ``state`` left it in ``new_state`` (None: did not change it)
    as the state machine allows; else the reason, one line, naming the hook and what it did.

    Balsam 0.7 sent whatever a hook left: a hook that set no state left its job where it was, and
    its server accepted any state. Here the server validates the change, so both left the job
    stuck (leased to the processing session, never acquired again): such a job fails instead."""
    hook = HOOK_FOR_STATE[state]
    allowed = hook_targets(state)
    must = f"it must set {_state_list(state, allowed)}"
    if new_state is None:
        return f"{hook} left the job {state.value}: {must}"
    try:
        target = JobState.parse(new_state)
    except ValueError:
        return f"{hook} set {str(new_state)[:100]!r}, not a job state: {must}"
    if target == state:
        return f"{hook} left the job {state.value}: {must}"
    if target not in allowed:
        return f"{hook} set {target.value}: {must}"
    return None


#: The runner prints its marker last, so the end of job.out is read first (output may follow it: the
#: app's threads, atexit handlers, the interpreter's warnings on stderr); the whole file is read only
#: when that end holds no marker line (a run that printed none, or more than this after it).
MARKERS_TAIL_BYTES = 4 * 2**20
#: job.out is read this much at a time.
MARKERS_CHUNK_BYTES = 2**20


def read_run_markers(workdir: Path) -> tuple[str, str]:
    """(serialized_return_value, serialized_exception) printed by a ``run()`` app into job.out: the
    last marker line, "" for the kind it is not. Memory stays bounded whatever the file's size: the
    last :data:`MARKERS_TAIL_BYTES` are scanned first, the whole file in chunks only if they hold no
    marker line."""
    try:
        with open(workdir / "job.out", "rb") as f:
            start = max(0, os.fstat(f.fileno()).st_size - MARKERS_TAIL_BYTES)
            scan = None
            if start:
                # From the byte before the tail: the partial line it starts in is skipped, and a
                # line that starts right at the tail is not (that byte is the line break before it).
                scan = MarkerScan(mid_line=True).read(f, start - 1, MARKERS_CHUNK_BYTES)
            if scan is None or not scan.found:
                scan = MarkerScan().read(f, 0, MARKERS_CHUNK_BYTES)
    except OSError:
        return "", ""
    return scan.value or "", scan.exc or ""


#: Longest launcher reason quoted in the RESTART_READY message (the rest is in the RUN_TIMEOUT event).
TIMEOUT_REASON_MAX_CHARS = 300


def timeout_message(reason: Optional[str] = None) -> str:
    """The one-line ``state_data`` message of the default handle_timeout's RESTART_READY.
    RUN_TIMEOUT means the launcher's stop (or the allocation's end: scancel, a requeue, a node
    failure, the scheduler's wall time) ended the run, not that the job ran out of time, so the
    message does not say "timed out"; ``reason``: the launcher's, from the RUN_TIMEOUT's
    ``state_data`` (e.g. ``launcher stopped (signal 15)``), where the caller has it."""
    base = "re-queued by the default handle_timeout (RESTART_READY)"
    text = " ".join(str(reason or "").split())  # one line, whatever the reason quotes
    if not text:
        return f"{base}: the run was ended by the launcher's stop or the allocation's end (the RUN_TIMEOUT event says which)"
    if len(text) > TIMEOUT_REASON_MAX_CHARS:
        text = text[: TIMEOUT_REASON_MAX_CHARS - 3] + "..."
    return f"{base}: {text}"


def default_update(job: dict, python_app: bool, data_path: Path, tail_num_lines: int = 10,
                   timeout_reason: Optional[str] = None) -> dict:
    """The update a job gets when its app keeps the default hook for its state. ``timeout_reason``:
    for a RUN_TIMEOUT, the launcher's reason (its ``state_data``), quoted in the message."""
    state = JobState(job["state"])
    target = DEFAULT_TARGET[state]
    update: dict[str, Any] = {"id": job["id"], "state": target.value, "state_timestamp": now_iso()}
    if state == JobState.staged_in:
        # As Balsam 0.7's preprocessing did (it ran every hook in the workdir): the directory exists
        # once the job is PREPROCESSED, made here on the agent's node rather than by the launcher
        # in the allocation, and so does an empty job.out (another file system metadata operation
        # taken off the allocation: see create_job_output). A failure raises: the caller marks the
        # job FAILED with the reason.
        create_job_output(job_workdir(data_path, job["workdir"]))
    elif state in (JobState.run_done, JobState.run_error):
        workdir = job_workdir(data_path, job["workdir"])
        if python_app:
            # Both, "" for the one this run's job.out lacks: a re-run (RESTART_READY) keeps the
            # previous run's fields, and result() reads the exception first, so a run that failed
            # and then succeeded reported the old exception. (Balsam 0.7 cleared the other field
            # when it found a marker; a run that printed none, a sys.exit, leaves no result here.)
            update["serialized_return_value"], update["serialized_exception"] = read_run_markers(workdir)
        if state == JobState.run_error:
            tail = tail_file(workdir / "job.out", tail_num_lines)
            update["state_data"] = {
                "message": "the run failed and the app keeps the default handle_error (FAILED)",
                "error": tail,
            }
    elif state == JobState.run_timeout:
        update["state_data"] = {"message": timeout_message(timeout_reason)}
    return update


# -- worker side ----------------------------------------------------------------------------------

_APP_CLASSES: dict[tuple[int, str], type] = {}


def _app_class(app_record: dict) -> type:
    key = (int(app_record["id"]), str(hash(app_record.get("serialized_class", ""))))
    cls = _APP_CLASSES.get(key)
    if cls is None:
        from .apps import load_app_class

        cls = load_app_class(app_record)
        _APP_CLASSES[key] = cls
    return cls


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def make_job_object(job: dict) -> Any:
    """The client API's Job object for a job dict read from the API (what hooks see as ``self.job``)."""
    from ..api import Job

    for factory in ("_from_api", "from_api", "_from_dict", "from_dict"):
        build = getattr(Job, factory, None)
        if build is not None:
            return build(dict(job))
    raise RuntimeError("balsam.api.Job cannot be built from an API record")


def _snapshot(job_obj: Any) -> dict:
    snap = {}
    for name in HOOK_WRITABLE_FIELDS:
        try:
            snap[name] = _jsonable(getattr(job_obj, name))
        except Exception:
            continue
    return snap


#: A field of a hook worker's FAILED update whose job's workdir balsam did not prepare, never sent
#: (the processing module takes it off first): WORKDIR_NO_ROOM, the file system had no room (ENOSPC,
#: EDQUOT: the site's fault, not the job's; the processing module gives the job back, not FAILED);
#: WORKDIR_NOT_MADE, it failed otherwise, or was never tried (the app could not be loaded). Absent:
#: the workdir was made and the hook ran (the updates that are most of them go as they are). A
#: field, not the error's text: a hook may set any text of its own, and its job fails as any other.
WORKDIR_KEY = "_workdir"
#: A field of a hook worker's update whose hook saved the job's new state itself (``self.job.state =
#: ...; self.job.save()``): the server has it, and its job is no longer held by the processing
#: session, which would have every update of it refused (an ERROR line per job, and a WARNING at the
#: agent's stop, for jobs that were fine). Never sent: the processing module takes the job off its
#: books. The hook's changes after its save are saved by the worker the same way.
SAVED_KEY = "_saved_by_hook"
WORKDIR_NO_ROOM = "no_room"
WORKDIR_NOT_MADE = "not_made"


class _LogSink(io.RawIOBase):
    """A file descriptor of the job's balsam.log, for the hook's ``sys.stdout``/``sys.stderr``: a
    write the disk has no room for is dropped. A hook's ``print`` raised ``OSError: [Errno 28]``
    on a full disk and failed its job, whose run had succeeded; the log is balsam's, not the app's."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data: Any) -> int:
        try:
            return os.write(self._fd, data)
        except OSError as exc:
            if exc.errno in NO_ROOM_ERRNOS:
                return len(data)  # dropped
            raise


def _log_stream(fd: int, like: Any, write_through: bool) -> io.TextIOWrapper:
    # Line-buffered as the stream it stands in for (stderr always, as Python's own since 3.9): a
    # buffered stderr reordered a hook's lines against its children's (which write fd 2 directly),
    # and lost them when the agent SIGKILLed a hung hook.
    line_buffering = fd == 2 or bool(getattr(like, "line_buffering", False))
    return io.TextIOWrapper(io.BufferedWriter(_LogSink(fd)), encoding=getattr(like, "encoding", None) or "utf-8",
                            errors=getattr(like, "errors", None) or "strict", line_buffering=line_buffering,
                            write_through=write_through)


@contextlib.contextmanager
def redirected_output(log_path: Path) -> Iterator[Any]:
    """Send this process's stdout and stderr (also of its children) to ``log_path`` (append). What
    this process writes there through ``sys.stdout``/``sys.stderr`` is dropped if the disk has no
    room (:class:`_LogSink`); its children's writes fail in them, as anywhere."""
    sys.stdout.flush()
    sys.stderr.flush()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    streams = sys.stdout, sys.stderr
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout, sys.stderr = _log_stream(1, streams[0], False), _log_stream(2, streams[1], True)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass  # that output is lost, not the hook's result (_note); ValueError: a hook closed it
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        os.close(fd)


def _note(text: str) -> None:
    """Write a line of the job's balsam.log. A full or over-quota disk loses the line, not the
    job: raised here, outside the hook's own try, it failed the worker's whole chunk ("the hook
    worker process died: [Errno 28] No space left on device"), hooks that had run included."""
    try:
        print(text, flush=True)
    except OSError:
        pass


def run_hook_on_job(app_cls: Optional[type], job: dict, python_app: bool, data_path: Path, tail_num_lines: int = 10) -> dict:
    """Run the hook for ``job``'s state in this process and return the job's update."""
    state = JobState(job["state"])
    hook = HOOK_FOR_STATE[state]
    base: dict[str, Any] = {"id": job["id"]}
    output = contextlib.ExitStack()
    # This job's own setup may fail (a workdir that cannot be made, an unwritable balsam.log): that
    # fails this job only; raising would lose the updates of the other jobs of the worker's chunk.
    try:
        workdir = job_workdir(data_path, job["workdir"])
        if state == JobState.staged_in:
            create_job_output(workdir)  # the workdir and an empty job.out, as the default preprocess makes them
        else:
            workdir.mkdir(parents=True, exist_ok=True)
        output.enter_context(redirected_output(workdir / "balsam.log"))
    except Exception as exc:
        output.close()
        failed = {
            **base,
            "state": JobState.failed.value,
            "state_timestamp": now_iso(),
            "state_data": {"message": f"An exception occurred in {hook}",
                           "error": f"cannot prepare workdir {job['workdir']!r}: {type(exc).__name__}: {exc}"},
        }
        no_room = isinstance(exc, OSError) and exc.errno in NO_ROOM_ERRNOS
        failed[WORKDIR_KEY] = WORKDIR_NO_ROOM if no_room else WORKDIR_NOT_MADE  # no_room: given back, not FAILED
        return failed
    if state in (JobState.run_done, JobState.run_error) and python_app:
        # Both, "" for the one this run's job.out lacks (see default_update): the hook sees, and the
        # job keeps, this run's result only.
        value, exc_text = read_run_markers(workdir)
        base["serialized_return_value"] = job["serialized_return_value"] = value
        base["serialized_exception"] = job["serialized_exception"] = exc_text
    cwd = os.getcwd()
    with output:
        _note(f"#BALSAM Running {hook} for Job {job['id']} at {now_iso()}")
        saves: Optional[_HookSaves] = None  # None until the job object is built (the app may not load)
        try:
            if app_cls is None:
                raise RuntimeError("the app could not be loaded")
            job_obj = make_job_object(job)
            saves = _HookSaves(job_obj, state)
            before = _snapshot(job_obj)
            os.chdir(workdir)
            app = app_cls(job_obj)
            getattr(app, hook)()
            # job.parameters["n"] = 2 changes the dict the job keeps, not serialized_parameters,
            # which the snapshot reads: written back first (as save() does), or the change was
            # dropped. One that cannot be serialized fails the job here, naming the hook.
            job_obj._store_parameters_changed_in_place()
            after = _snapshot(job_obj)
        except BaseException as exc:  # a hook may raise anything, even SystemExit
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            _note(text)
            message = {"message": f"An exception occurred in {hook}", "error": api_text(text[-4000:])}
            if saves is not None and saves.moved:
                # Raised after saving a new state itself: the job is no longer the processing
                # session's, whose FAILED the server refused (HTTP 409, an ERROR for the job).
                return _saved_by_hook(job_obj, hook, job["id"], saves, failed=message)
            # api_json: an exception's text may hold a NUL (a hook parsing binary output), and the
            # server refused the whole FAILED for it.
            return api_json({
                **base,
                "state": JobState.failed.value,
                "state_timestamp": now_iso(),
                "state_data": message,
            })
        finally:
            os.chdir(cwd)
        if saves.moved:
            return _saved_by_hook(job_obj, hook, job["id"], saves)
        update = dict(base)
        for name, value in after.items():
            if before.get(name) != value:
                update[name] = value
        if "state" in update:
            update["state_timestamp"] = now_iso()
            if "state_data" not in update and after.get("state_data"):
                update["state_data"] = after["state_data"]
        elif "state_data" in update:
            update.pop("state_data")  # state_data only travels with a state change
        try:
            # Checked here: the agent's status updater would retry an update it cannot encode forever.
            json.dumps(update)
        except (TypeError, ValueError) as exc:
            problem = f"{hook} set a value that cannot be sent to the API: {type(exc).__name__}: {exc}"
            update = dict(base)
        else:
            if state == JobState.run_done and getattr(update.get("state"), "value", update.get("state")) in FINISHED_BY_POSTPROCESS:
                # Balsam 0.7 apps set JOB_FINISHED in postprocess (its server took any state):
                # POSTPROCESSED ends the same way here, with the stage-out that skipping it missed.
                update["state"] = JobState.postprocessed.value
            problem = check_hook_state(state, update.get("state"))
        if problem is not None:
            problem = problem.replace("\n", " ")[:1000]
            _note(f"#BALSAM {problem}; the job is FAILED")
            # The hook's other changes (data, tags ...) are kept: e.g. a retry counter in data.
            update.update(state=JobState.failed.value, state_timestamp=now_iso(), state_data={"message": problem})
    return api_json(update)


def _unsaved(job_obj: Any) -> set[str]:
    try:
        return set(job_obj.dirty_fields)
    except Exception:
        return set()


def _state_text(value: Any) -> str:
    """A job state as the API writes it (a JobState, or the text a hook assigned)."""
    value = getattr(value, "value", value)
    try:
        return JobState.parse(value).value
    except ValueError:
        return str(value)


class _HookSaves:
    """Watches a hook's own saves of its job (``self.job.state = ...; self.job.save()``):
    ``moved`` once one of them sent a state other than the one the server had (the hook's
    starting state: the save ends the job's lease to the processing session), whatever the hook
    does after it (sets another state, raises); ``server_state``, the state its last such save
    left. A save of the state the job already has (``self.job.state = "STAGED_IN"``) is no move:
    the server takes it as no change and the job stays the session's, which sends what the hook
    leaves. A 0.7 postprocess's ``JOB_FINISHED`` (its server took any state) is saved as
    POSTPROCESSED, as the processing module sends it (:data:`FINISHED_BY_POSTPROCESS`): the server
    refused RUN_DONE -> JOB_FINISHED, and the job failed."""

    def __init__(self, job_obj: Any, state: JobState) -> None:
        self.start = state
        self.server_state = state.value
        self.moved = False
        self._save = getattr(job_obj, "save", None)
        self._job = job_obj
        if self._save is not None:  # (a job object without save, a stand-in, has no save to watch)
            job_obj.save = self.save  # an instance attribute: the class's save is what it calls

    def finished_as_postprocessed(self, state: str) -> str:
        """``state`` as the processing module sends a postprocess's: JOB_FINISHED is POSTPROCESSED."""
        if self.start == JobState.run_done and state in FINISHED_BY_POSTPROCESS:
            return JobState.postprocessed.value
        return state

    def save(self, *args: Any, **kwargs: Any) -> Any:
        sent = None
        if "state" in _unsaved(self._job):
            sent = self.finished_as_postprocessed(_state_text(self._job.state))
            if sent != _state_text(self._job.state):
                self._job.state = sent
        result = self._save(*args, **kwargs)
        if sent is not None and sent != self.server_state:
            self.server_state = sent
            self.moved = True
        return result


#: A worker's update of a job whose hook saved its state itself (:data:`SAVED_KEY`): why the
#: hook's later changes were not saved (the job left the state the hook saved), for the agent's log.
NOT_APPLIED_KEY = "_not_applied"
#: The update-by-filter filter for "no session holds the job" (balsam.server.jobs_logic.LEASED_FILTER;
#: the worker does not import the server).
LEASED_FILTER = "leased"


def _saved_by_hook(job_obj: Any, hook: str, job_id: int, saves: _HookSaves, failed: Optional[dict] = None) -> dict:
    """The update of a job whose hook saved a new state itself: the processing session no longer
    holds the job (the server refused its update of it, HTTP 409), so what the hook changed after
    its save, a later state included, is saved here, as the hook saved the state: with ``failed``
    (the hook raised afterwards), FAILED with that state_data. A later state is checked as one the
    hook leaves unsaved is (:func:`check_hook_state`: a preprocess's RUNNING fails the job, which
    no launcher would run).

    Only while the job is still in the state the hook saved and no session holds it (one ``PUT
    /jobs/?id=N&state=S&leased=false``, :func:`_update_while_saved`): a launcher may have taken it
    meanwhile (a saved PREPROCESSED or RESTART_READY can be acquired at once) and run it; this
    update, without a session, would have overridden the launcher's run (RUNNING -> FAILED, its
    RUN_DONE refused), or ended its lease before its RUNNING (refused). What was not applied is
    written to the job's balsam.log and returned under :data:`NOT_APPLIED_KEY` (the agent logs it)."""
    saved = saves.server_state
    fields: dict[str, Any] = {}
    try:
        if failed is not None:
            job_obj.state = JobState.failed.value
            job_obj.state_data = failed
        fields = {name: getattr(job_obj, name) for name in sorted(_unsaved(job_obj) & set(HOOK_WRITABLE_FIELDS))}
        if "state" in fields:
            state = saves.finished_as_postprocessed(_state_text(fields["state"]))
            problem = None if state == saved or failed is not None else check_hook_state(saves.start, state)
            if state == saved:
                del fields["state"]
            elif problem is not None:
                problem = problem.replace("\n", " ")[:1000]
                _note(f"#BALSAM {problem}; the job is FAILED")
                fields.update(state=JobState.failed.value, state_data={"message": problem})
            else:
                fields["state"] = state
        if "state" not in fields:
            fields.pop("state_data", None)  # state_data only travels with a state change
        applied = _update_while_saved(type(job_obj), job_id, saved, fields) if fields else 1
    except Exception as exc:
        _note(f"#BALSAM {hook} saved the job's state itself; its later changes could not be saved: "
              f"{type(exc).__name__}: {exc}")
        return {"id": job_id, SAVED_KEY: True}
    if not applied:
        now = _current_state(job_obj, job_id)
        what = ", ".join(f"state {fields['state']}" if name == "state" else name for name in fields)
        # Still in the saved state: a session holds it (the filter's other condition), a launcher's.
        why = (f"a launcher acquired it (now {saved}, leased)" if now == f"now {saved}"
               else f"the job is no longer {saved} ({now}: a launcher took it?)")
        reason = f"{hook} saved the job's state ({saved}) itself, and its later changes ({what}) were not saved: {why}"
        _note(f"#BALSAM {reason}")
        return {"id": job_id, SAVED_KEY: True, NOT_APPLIED_KEY: reason}
    _note(f"#BALSAM {hook} saved the job's state itself (self.job.save()): nothing more to send")
    return {"id": job_id, SAVED_KEY: True}


def _update_while_saved(job_cls: Any, job_id: int, saved: str, fields: dict[str, Any]) -> int:
    """``PUT /jobs/?id=N&state=S&leased=false``: apply ``fields`` while the job is still in the state
    the hook saved and no session holds it; returns how many jobs were updated (0 or 1). The server
    checks both under the update's row lock (a RUNNING or an acquire committed meanwhile: 0).
    ``leased`` is no filter of the Python API's queries (the listing routes do not take it): the
    request is sent as Query.update sends its own. A server older than it (422, an unknown filter)
    gets the update by state alone, as it did before, with a line in the job's balsam.log."""
    payload = job_cls._validate_update(fields)
    client = job_cls._get_client()
    params: dict[str, Any] = {"id": job_id, "state": saved}
    if JobState(saved) in RUNNABLE_STATES:
        # Only a state a launcher acquires can be leased by one: a RUNNING a preprocess saved stays
        # held by the processing module's own session (a RUNNING sent without a session keeps its
        # lease), and with the filter its later FAILED (the hook raised after the save) matched
        # nothing: the job stayed RUNNING, then RUN_TIMEOUT, and ran again.
        params[LEASED_FILTER] = "false"
    try:
        result = client.put(job_cls._path, params=params, json=payload)
    except Exception as exc:
        if not refused_as_unknown(exc, [LEASED_FILTER]):
            raise
        _note(f"#BALSAM the server is older than the {LEASED_FILTER!r} filter: the hook's later changes are "
              f"saved while the job is {saved}, even if a launcher acquired it (upgrade the server)")
        del params[LEASED_FILTER]
        result = client.put(job_cls._path, params=params, json=payload)
    if isinstance(result, list):  # a server answering the records (Balsam 0.7's), as Query.update reads it
        return len(result)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _current_state(job_obj: Any, job_id: int) -> str:
    """``now STATE`` for a job, for :func:`_saved_by_hook`'s note (deleted, the API down: why not)."""
    try:
        return f"now {_state_text(type(job_obj).objects.get(id=job_id).state)}"
    except Exception as exc:
        return f"its state could not be read: {type(exc).__name__}"


def run_hooks(app_record: Optional[dict], jobs: list[dict], python_app: bool, data_path: str, tail_num_lines: int = 10,
              results_path: Optional[str] = None) -> list[dict]:
    """Worker-process entry: run the hooks of several jobs of one app (a chunk), in order.

    ``results_path``: the worker's record of its progress, JSON lines (see :class:`_ResultsFile`):
    before each job, ``{"start": <job id>, "pid": <worker pid>}`` (the processing module times
    each hook from it, and knows which worker to end when one hangs; :func:`read_results` skips it,
    having no ``id``); after it, the job's update, as soon as its hook has run. When a later hook
    of the chunk kills the worker, or the agent ends a hung one, the chunk's return value is lost,
    and the hooks that completed would otherwise run again, their side effects (a job created, a
    file appended) twice.

    The app class is loaded once for the chunk, after the first job's start line (a load that
    hangs is timed as that job's hook). A load that fails fails every job of the chunk with the
    reason, and is not tried again for each (deserializing a class runs its module's code)."""
    updates = []
    loaded: Optional[type] = None
    load_error: Optional[str] = None
    attempted = app_record is None  # no record: run_hook_on_job fails each job ("could not be loaded")
    with _ResultsFile(results_path) as results:
        for job in jobs:
            results.record({"start": job["id"], "pid": os.getpid()})
            if not attempted:
                attempted = True
                try:
                    loaded = _app_class(app_record)
                except Exception as exc:
                    load_error = str(exc)
            if load_error is not None:
                update = {
                    "id": job["id"],
                    "state": JobState.failed.value,
                    "state_timestamp": now_iso(),
                    "state_data": {"message": "An exception occurred while loading the app", "error": load_error},
                    WORKDIR_KEY: WORKDIR_NOT_MADE,
                }
            else:
                update = run_hook_on_job(loaded, job, python_app, Path(data_path), tail_num_lines)
            results.record(update)
            updates.append(update)
    return updates


class _ResultsFile:
    """The worker's side of ``results_path`` (the one writer of it): one JSON line per record, one
    ``write`` each with O_APPEND (so a death between two hooks leaves whole lines, and a reader
    sees a line either whole or not yet ended). A file that cannot be written is given up: its
    jobs are only run again after a worker death, as without it."""

    def __init__(self, path: Optional[str]) -> None:
        self.fd: Optional[int] = None
        if path is not None:
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            except OSError:
                pass

    def __enter__(self) -> "_ResultsFile":
        return self

    def record(self, record: dict) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (json.dumps(record) + "\n").encode())
        except (OSError, TypeError, ValueError):
            self.__exit__()

    def __exit__(self, *_: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_results(path: Optional[Path], jobs: list[dict]) -> dict[int, dict]:
    """The updates a worker recorded in ``path`` (:func:`run_hooks`) for ``jobs``, by job id: those
    whose hooks completed. A torn or foreign line is skipped (its job runs again)."""
    if path is None:
        return {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    wanted = {job["id"] for job in jobs}
    done: dict[int, dict] = {}
    for line in text.splitlines():
        try:
            update = json.loads(line)
        except ValueError:
            continue
        if isinstance(update, dict) and update.get("id") in wanted:
            done[update["id"]] = update
    return done
