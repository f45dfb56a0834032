"""``SchedulerContract``: the conformance tests every scheduler plugin runs against itself.

Subclass it in your plugin's tests (the class name must start with ``Test``) and point it at your
recorded outputs; every ``test_*`` method below then runs against your driver through its public
methods (``submit``, ``get_statuses``, ``delete_job``, ``get_histories``, ``get_backfill_windows``,
``discover_projects``) with a :class:`~balsam.testing.ReplayRunner` answering from the recordings::

    from pathlib import Path
    from balsam.states import BatchJobState as S
    from balsam.testing import Refusal, HistoryCase, SchedulerContract, utc
    from balsam_scheduler_mybatch import MyBatchScheduler

    class TestMyBatch(SchedulerContract):
        scheduler_class = MyBatchScheduler
        recorded_dir = Path(__file__).parent / "data"      # load_recorded() naming
        now = utc(2026, 11, 22, 5, 43)                      # when the status outputs were recorded
        submit_outputs = {"qsub_ok": 1196243}
        submit_refusals = {"qsub_unknown_queue": Refusal("Unknown queue", permanent=True)}
        status_outputs = {"qstat_all": {1196243: S.queued, 1196180: S.running}, "qstat_empty": {}}
        status_failures = {"qstat_no_server": "cannot connect"}
        delete_outputs = {"qdel_ok": None, "qdel_denied": "Unauthorized"}
        history_cases = [HistoryCase({1196180: S.finished, 1196243: None}, output="qstat_x_all")]

What the contract checks, beyond your cases:

- ``name`` set; the ``balsam.schedulers`` entry point of that name loads this class (skipped when
  not installed); options defaults build and every option has a help text;
- ``default_job_template`` renders for a sample BatchJob (mpi and serial) into a script ``bash -n``
  accepts, that starts the launcher, with no ``None`` in its directives;
- every render method returns a :class:`~balsam.scheduler.Command` of strings; the submit command
  names the script;
- **garbage never escapes as anything but SchedulerError**: each public method fed garbage (an
  HTML error page, binary noise, a crash message, with exit code 0 and 1) and empty output with a
  non-zero exit code either raises SchedulerError or returns a well-formed value; a status poll
  fed non-empty garbage raises (garbage read as "no jobs" would end every BatchJob);
- truncated and shuffled copies of each recorded status output give SchedulerError or a subset of
  the recorded jobs (never an invented job id);
- the poll's start times (``StatusPoll.start_times``, optional) are of jobs it lists as running
  only, aware datetimes (a naive one is not taken by the agent), and not in the future;
- a runner that fails (a missing executable) gives SchedulerError from every method;
- ``find_submitted`` (the optional ``render_find``/``parse_find`` pair) returns None or job ids;
- with ``fake_commands`` (fake commands of your batch system on balsam.testing.fakebatch), a whole
  lifecycle for real: submit, the job found again by ``find_submitted`` (where the driver can look
  jobs up), queued/running, left the queue, a finished history with times, the
  script's output where the driver asked for it, a deletion;
- ``site_defaults()`` (fed the first queue and project outputs) is in settings.yml shape, names
  the scheduler and passes the real settings loader; it never raises, whatever the commands print;
- the driver is render/parse code only: no orchestration method overridden (unless declared in
  ``overrides_orchestration`` with the reason) and no attribute changed by a call (the one state
  between calls, the last status poll, is the base class's).

The cases (class attributes, all optional but at least one status and one submit output):

``submit_outputs``   recorded name -> the job id ``submit`` returns
``submit_refusals``  recorded name -> :class:`Refusal` (message fragment; permanent or not)
``status_outputs``   recorded name -> ``{job id: BatchJobState}`` of exactly the jobs still in the
                     queue (``get_statuses(now)``)
``status_failures``  recorded name -> message fragment of the SchedulerError of the poll
``delete_outputs``   recorded name -> None (deleted, or already gone) or the error's fragment
``history_cases``    :class:`HistoryCase` list (``get_histories``)
``backfill_outputs`` recorded name -> ``{queue: [(num_nodes, wall_time_min), ...]}``
``queue_outputs``    recorded name -> ``{queue: (max_nodes, max_walltime)}`` (``discover_queues``)
``project_outputs``  recorded name -> list of projects ``discover_projects`` returns
"""

from __future__ import annotations

import datetime as dt
import random
import shlex
import subprocess
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import attrs
import pytest
import yaml

from balsam.config import parse_settings, render_settings_yaml
from balsam.models import AllowedQueue
from balsam.scheduler import START_TIME_SKEW_SEC, Command, CommandResult, Scheduler, SchedulerError, SubmitRequest
from balsam.states import BatchJobState

from .replay import ReplayRunner, load_recorded

__all__ = ["GARBAGE", "HistoryCase", "Refusal", "SchedulerContract"]

#: Outputs no scheduler command prints, fed to every parser with exit codes 0 and 1.
GARBAGE: tuple[str, ...] = (
    "garbage\n",
    "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>\n",
    "\x00\x01\x02\ufffd\ufffd binary \x7f\n",
    "Segmentation fault (core dumped)\n",
    "| | | | | | | | | | | | | |\n" * 3,
    "{\"unterminated\": [1, 2,\n",
)


@attrs.frozen
class Refusal:
    """A submission the batch system refused: a fragment of the SchedulerError message, whether
    retrying the same request is pointless (``permanent``; None: not checked), and whether it was
    refused only because a queue limit is reached (``at_queue_limit``; None: not checked), and whether
    that limit counts the user's own jobs only (``per_user_limit``; None: not checked), and whether
    it was refused only for a full or over-quota disk the submit command writes (``no_room``; None:
    not checked)."""

    match: str
    permanent: Optional[bool] = None
    at_queue_limit: Optional[bool] = None
    per_user_limit: Optional[bool] = None
    no_room: Optional[bool] = None


@attrs.frozen
class HistoryCase:
    """One ``get_histories`` call.

    ``expected``: job id -> the final BatchJobState its JobHistory says (finished or submit_failed),
    or None for "not known (yet)". ``output``: recorded name of the history command's output (None
    for drivers whose history is a file). ``files``: job id -> ``{suffix: recorded name}`` written
    next to that job's script (``qlaunch<id>.sh``), e.g. ``{".cobaltlog": "job12.cobaltlog"}``;
    only jobs named here get a script path, the others get None.
    """

    expected: Mapping[int, Optional[BatchJobState]]
    output: Optional[str] = None
    files: Mapping[int, Mapping[str, str]] = attrs.field(factory=dict)




def fakebatch_user() -> str:
    from .fakebatch import user

    return user()


class SchedulerContract:
    """Base class of a scheduler plugin's conformance tests (see the module docstring)."""

    #: The Scheduler subclass under test (required).
    scheduler_class: ClassVar[type[Scheduler]]
    #: ``scheduler.options`` to build it with (None: the schema's defaults).
    scheduler_options: ClassVar[Optional[Mapping[str, Any]]] = None
    #: The user the recordings were made as (status outputs may list other users' jobs).
    user: ClassVar[str] = "balsam"
    #: Directory of the recorded outputs (see balsam.testing.replay.load_recorded).
    recorded_dir: ClassVar[Path]
    #: The time the status outputs were recorded at (``get_statuses(now)``).
    now: ClassVar[dt.datetime] = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    #: Nodes of the SubmitRequest the checks submit (project "proj", queue "debug", 30 minutes).
    request_num_nodes: ClassVar[int] = 2

    submit_outputs: ClassVar[Mapping[str, int]] = {}
    submit_refusals: ClassVar[Mapping[str, Refusal]] = {}
    status_outputs: ClassVar[Mapping[str, Mapping[int, BatchJobState]]] = {}
    status_failures: ClassVar[Mapping[str, str]] = {}
    delete_outputs: ClassVar[Mapping[str, Optional[str]]] = {}
    history_cases: ClassVar[Sequence[HistoryCase]] = ()
    backfill_outputs: ClassVar[Mapping[str, Mapping[str, Sequence[tuple[int, int]]]]] = {}
    queue_outputs: ClassVar[Mapping[str, Mapping[str, tuple[int, int]]]] = {}
    project_outputs: ClassVar[Mapping[str, Sequence[str]]] = {}
    #: A directory of fake commands of this batch system built on balsam.testing.fakebatch (None:
    #: no lifecycle check), and FAKE_BATCH_* settings for them (e.g. a shorter wall-time minute).
    fake_commands: ClassVar[Optional[Path]] = None
    fake_settings: ClassVar[Mapping[str, str]] = {}
    #: Orchestration methods this driver overrides, each with the reason (see Scheduler.guard);
    #: any other override fails ``test_driver_is_render_parse_only``.
    overrides_orchestration: ClassVar[Mapping[str, str]] = {}

    # -- helpers ----------------------------------------------------------------------------------
    def request(self, tmp_path: Path) -> SubmitRequest:
        script = tmp_path / "qsubmit" / "qlaunch00042.sh"
        return SubmitRequest(script_path=script, project="proj", queue="debug", num_nodes=self.request_num_nodes,
                             wall_time_min=30, job_name="qlaunch00042")

    def driver(self, answer: Optional[CommandResult | Callable[[Command], CommandResult]] = None) -> Scheduler:
        """The driver under test, every command answered with ``answer``."""
        runner = ReplayRunner({}, default=answer)
        return self.scheduler_class(runner, user=self.user, options=self.scheduler_options)

    def recorded(self, name: str) -> CommandResult:
        return load_recorded(self.recorded_dir, name)

    def every_operation(self, tmp_path: Path) -> dict[str, Callable[[Scheduler], Any]]:
        """Each public driver method as a call (used by the garbage and failure checks)."""
        script = tmp_path / "qsubmit" / "qlaunch00042.sh"
        return {
            "submit": lambda d: d.submit(self.request(tmp_path)),
            "status": lambda d: d.get_statuses(self.now),
            "delete": lambda d: d.delete_job(42),
            "find": lambda d: d.find_submitted(self.request(tmp_path)),
            "histories": lambda d: d.get_histories({42: script, 43: None}),
            "history": lambda d: d.get_history(42, script),
            "backfill": lambda d: d.get_backfill_windows(),
            "queues": lambda d: d.discover_queues(),
            "projects": lambda d: d.discover_projects(),
            "site_defaults": lambda d: d.site_defaults(),
        }

    @staticmethod
    def check_well_formed(operation: str, value: Any) -> None:
        """What each public method may return when it does not raise."""
        if operation == "submit":
            assert isinstance(value, int) and value >= 0, f"submit returned {value!r}"
        elif operation == "status":
            assert isinstance(value, dict) and all(s.scheduler_id == i for i, s in value.items())
            assert all(s.state is not BatchJobState.finished for s in value.values()), \
                "jobs that left the queue are not in get_statuses()"
        elif operation == "find":
            assert value is None or (isinstance(value, list) and all(isinstance(i, int) for i in value)), \
                f"find_submitted returned {value!r}"
        elif operation == "histories":
            assert isinstance(value, dict) and set(value) == {42, 43}
        elif operation == "backfill":
            assert isinstance(value, dict)
        elif operation == "projects":
            assert isinstance(value, list) and all(isinstance(p, str) and p for p in value)
        elif operation == "queues":
            assert isinstance(value, dict) and all(isinstance(q, AllowedQueue) for q in value.values())
        elif operation == "site_defaults":
            assert isinstance(value, dict) and set(value) <= {"scheduler"}

    # -- identity, options, template --------------------------------------------------------------
    def test_name_and_entry_point(self):
        assert self.scheduler_class.name, "set the scheduler's `name` (settings.yml scheduler.name)"
        points = [ep for ep in entry_points(group="balsam.schedulers") if ep.name == self.scheduler_class.name]
        if not points:
            pytest.skip(f"no installed balsam.schedulers entry point named {self.scheduler_class.name!r}")
        assert points[0].load() is self.scheduler_class

    def test_options_defaults_and_help(self):
        schema = self.scheduler_class.options_schema
        assert attrs.has(schema), "options_schema must be an attrs class (see balsam.options)"
        schema()
        for field in attrs.fields(schema):
            assert field.metadata.get("help"), f"option {field.name!r} has no help text (use balsam.options.option)"
        assert isinstance(self.driver().options, schema)

    @pytest.mark.parametrize("job_mode", ["mpi", "serial"])
    def test_default_job_template_renders(self, tmp_path, job_mode):
        from balsam.site.job_template import build_context, render_job_script

        template = self.scheduler_class.default_job_template
        if not template:
            pytest.skip("no default_job_template: site init writes balsam's generic template")
        batch_job = {"id": 7, "project": "proj", "queue": "debug", "num_nodes": 2, "wall_time_min": 30,
                     "job_mode": job_mode, "filter_tags": {"wf": "a"}, "optional_params": {}, "partitions": []}
        script = render_job_script(template, build_context(batch_job, tmp_path, call_hook=False))
        assert script.startswith("#!"), "a job template starts with a #! line"
        assert f"-j {job_mode}" in script and "balsam.launcher" in script, "the script must start the launcher"
        directives = [ln for ln in script.splitlines() if ln.startswith("#") and not ln.startswith("#!")]
        assert not any("None" in ln for ln in directives), "a directive rendered an unset value as None"
        checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
        assert checked.returncode == 0, f"bash -n rejects the rendered script: {checked.stderr.strip()}"

    def test_render_commands_are_strings(self, tmp_path):
        driver = self.driver()
        request = self.request(tmp_path)
        commands = [driver.render_submit(request), driver.render_status(self.user), driver.render_delete(42)]
        for command in commands:
            assert isinstance(command, Command) and command.args, "render_* returns a balsam.scheduler.Command"
            assert all(isinstance(a, str) for a in command.args), f"non-string argument in {command.args}"
        assert any(str(request.script_path) in a for a in commands[0].args), "the submit command names the script"
        assert any("42" in a for a in commands[2].args), "the delete command names the job"

    # -- the cases --------------------------------------------------------------------------------
    def test_submit_outputs(self, tmp_path):
        assert self.submit_outputs, "record at least one successful submission (submit_outputs)"
        for name, jobid in self.submit_outputs.items():
            assert self.driver(self.recorded(name)).submit(self.request(tmp_path)) == jobid, name

    def test_submit_refusals(self, tmp_path):
        for name, refusal in self.submit_refusals.items():
            with pytest.raises(SchedulerError) as info:
                self.driver(self.recorded(name)).submit(self.request(tmp_path))
            assert refusal.match in str(info.value), f"{name}: {info.value}"
            if refusal.permanent is not None:
                assert info.value.permanent is refusal.permanent, f"{name}: permanent={info.value.permanent}"
            if refusal.at_queue_limit is not None:
                assert info.value.at_queue_limit is refusal.at_queue_limit, (
                    f"{name}: at_queue_limit={info.value.at_queue_limit}")
            if refusal.per_user_limit is not None:
                assert info.value.per_user_limit is refusal.per_user_limit, (
                    f"{name}: per_user_limit={info.value.per_user_limit}")
            if refusal.no_room is not None:
                assert getattr(info.value, "no_room", False) is refusal.no_room, (
                    f"{name}: no_room={getattr(info.value, 'no_room', False)}")

    def test_status_outputs(self):
        assert self.status_outputs, "record at least one status poll (status_outputs)"
        for name, expected in self.status_outputs.items():
            statuses = self.driver(self.recorded(name)).get_statuses(self.now)
            self.check_well_formed("status", statuses)
            got = {i: s.state for i, s in statuses.items()}
            assert got == dict(expected), f"{name}: got {got}"

    def test_status_start_times(self):
        """``StatusPoll.start_times`` (optional): the agent takes them for BatchJob.start_time. Of
        running jobs only (a pending job's start is the scheduler's estimate), aware (a naive
        datetime, e.g. ``fromtimestamp(epoch)``, is the agent's local time: not taken), and not in
        the future (a misread year, garbage). Against the clock, not ``now``: outputs recorded on
        several days share one ``now``."""
        latest = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=START_TIME_SKEW_SEC)
        for name in self.status_outputs:
            driver = self.driver(self.recorded(name))
            driver.get_statuses(self.now)
            poll = driver.last_poll
            for jobid, started in poll.start_times.items():
                status = poll.statuses.get(jobid)
                assert status is not None and status.state is BatchJobState.running, (
                    f"{name}: start_times has job {jobid}, which the poll lists "
                    f"{'as ' + status.state.value if status is not None else 'not at all'}, not as running")
                assert isinstance(started, dt.datetime) and started.utcoffset() is not None, (
                    f"{name}: job {jobid}'s start {started!r} is not an aware datetime "
                    "(e.g. datetime.fromtimestamp(epoch, datetime.timezone.utc))")
                assert started <= latest, f"{name}: job {jobid}'s start {started.isoformat()} is in the future"

    def test_status_failures(self):
        for name, match in self.status_failures.items():
            with pytest.raises(SchedulerError, match=match):
                self.driver(self.recorded(name)).get_statuses(self.now)

    def test_delete_outputs(self):
        for name, match in self.delete_outputs.items():
            driver = self.driver(self.recorded(name))
            if match is None:
                driver.delete_job(42)
            else:
                with pytest.raises(SchedulerError, match=match):
                    driver.delete_job(42)

    def test_history_cases(self, tmp_path):
        for number, case in enumerate(self.history_cases):
            directory = tmp_path / f"case{number}"
            directory.mkdir()
            jobs: dict[int, Optional[Path]] = {}
            for jobid in case.expected:
                files = case.files.get(jobid)
                if files is None:
                    jobs[jobid] = None
                    continue
                script = directory / f"qlaunch{jobid:05d}.sh"
                script.write_text("#!/bin/bash\n")
                for suffix, name in files.items():
                    script.with_suffix(suffix).write_bytes((self.recorded_dir / name).read_bytes())
                jobs[jobid] = script
            answer = self.recorded(case.output) if case.output else None
            histories = self.driver(answer).get_histories(jobs)
            assert set(histories) == set(jobs), f"history case {number}: asked {sorted(jobs)}, got {sorted(histories)}"
            got = {i: (h.state if h is not None else None) for i, h in histories.items()}
            assert got == dict(case.expected), f"history case {number}: got {got}"
            for jobid, history in histories.items():
                if history is not None:
                    assert history.scheduler_id == jobid
                    # queued/running: the history says the job is still active (the poll missed it)
                    assert history.state in (BatchJobState.finished, BatchJobState.submit_failed,
                                             BatchJobState.queued, BatchJobState.running)

    def test_backfill_outputs(self):
        for name, expected in self.backfill_outputs.items():
            windows = self.driver(self.recorded(name)).get_backfill_windows()
            got = {q: [(w.num_nodes, w.wall_time_min) for w in ws] for q, ws in windows.items()}
            assert got == {q: [tuple(w) for w in ws] for q, ws in expected.items()}, f"{name}: got {got}"

    def test_queue_outputs(self):
        for name, expected in self.queue_outputs.items():
            queues = self.driver(self.recorded(name)).discover_queues()
            got = {q: (limits.max_nodes, limits.max_walltime) for q, limits in queues.items()}
            assert got == {q: tuple(v) for q, v in expected.items()}, f"{name}: got {got}"
            # None: the scheduler does not report the limit (site init keeps the platform's)
            assert all(limits.max_queued_jobs is None or limits.max_queued_jobs > 0 for limits in queues.values())

    def test_project_outputs(self):
        for name, expected in self.project_outputs.items():
            assert self.driver(self.recorded(name)).discover_projects() == list(expected), name

    # -- the shape of the driver ---------------------------------------------------------------------
    def test_driver_is_render_parse_only(self):
        """No orchestration method overridden (unless declared with a reason)."""
        orchestration = ("run", "submit", "find_submitted", "get_statuses", "delete_job", "get_history", "get_histories",
                         "get_backfill_windows", "discover_queues", "discover_projects", "guard")
        for klass in self.scheduler_class.__mro__:
            if klass is Scheduler:
                break
            for method in orchestration:
                if method in vars(klass) and method not in self.overrides_orchestration:
                    pytest.fail(f"{klass.__name__} overrides {method}(): implement the render/parse pairs instead, "
                                "or declare it in overrides_orchestration with the reason")

    def test_driver_keeps_no_state_between_calls(self, tmp_path):
        """Only the base class's last_poll changes from call to call (a history fall-back belongs in
        the StatusPoll that parse_status returns, not in the driver)."""
        for name in list(self.status_outputs)[:1]:
            driver = self.driver(self.recorded(name))
            before = {k: v for k, v in vars(driver).items() if k != "last_poll"}
            driver.get_statuses(self.now)
            try:
                driver.get_histories({42: None})
            except SchedulerError:
                pass
            after = {k: v for k, v in vars(driver).items() if k != "last_poll"}
            assert after.keys() == before.keys() and all(after[k] is before[k] for k in before), \
                f"the driver's attributes changed across calls: {sorted(k for k in after if after.get(k) is not before.get(k))}"

    # -- for real, on the fake batch system ----------------------------------------------------------
    def test_lifecycle_on_the_fake_batch_system(self, tmp_path, monkeypatch):
        """submit -> queued/running -> left the queue -> finished history with times; a queued job
        deleted -> finished; the job's script ran with the output file the driver asked for."""
        if self.fake_commands is None:
            pytest.skip("no fake_commands directory (see balsam.testing.fakebatch)")
        from .fakebatch import fake_batch_env, wait_for

        for key, value in fake_batch_env(self.fake_commands, tmp_path / "server", **self.fake_settings).items():
            monkeypatch.setenv(key, value)
        driver = self.scheduler_class(user=fakebatch_user(), options=self.scheduler_options)
        qsubmit = tmp_path / "qsubmit"
        qsubmit.mkdir()
        scripts = {}
        # The first job stays in the queue until the test has seen it in a status poll (at most 60 s):
        # with a fixed `sleep 1` it could leave the queue, on a busy host, before the first poll.
        release = tmp_path / "release-first-job"
        hold = f"for _ in $(seq 300); do [ -e {shlex.quote(str(release))} ] && break; sleep 0.2; done"
        for name, body in (("qlaunch00001", f"echo lifecycle-ran; {hold}"), ("qlaunch00002", "sleep 60")):
            scripts[name] = qsubmit / f"{name}.sh"
            scripts[name].write_text(f"#!/bin/bash\n{body}\n")
            scripts[name].chmod(0o755)

        def request(name: str, num_nodes: int) -> SubmitRequest:
            return SubmitRequest(script_path=scripts[name], project="proj", queue="debug", num_nodes=num_nodes,
                                 wall_time_min=5, job_name=name)

        first = driver.submit(request("qlaunch00001", self.request_num_nodes))
        second = driver.submit(request("qlaunch00002", self.request_num_nodes))
        # An interrupted submission is looked up by name (and script) before a second one.
        found = driver.find_submitted(request("qlaunch00001", self.request_num_nodes))
        assert found is None or found == [first], f"find_submitted of the first job gave {found!r}, not [{first}]"
        scripts["qlaunch00003"] = qsubmit / "qlaunch00003.sh"
        never = driver.find_submitted(request("qlaunch00003", self.request_num_nodes))
        assert never is None or never == [], f"find_submitted of a job never submitted gave {never!r}"
        status = wait_for(lambda: driver.get_statuses().get(first), 20, "the first job in the status poll")
        assert status.num_nodes == self.request_num_nodes and status.queue == "debug"
        assert status.state in (BatchJobState.queued, BatchJobState.running)
        release.touch()
        wait_for(lambda: first not in driver.get_statuses(), 60, "the first job to leave the queue")
        history = wait_for(lambda: driver.get_history(first, scripts["qlaunch00001"]), 30, "the first job's history")
        assert history.state is BatchJobState.finished, history
        assert history.end_time is not None and (history.start_time is None or history.start_time <= history.end_time)
        outputs = [p for p in qsubmit.iterdir() if p.name.startswith("qlaunch00001.") and p.suffix != ".sh"]
        assert any("lifecycle-ran" in p.read_text(errors="replace") for p in outputs), \
            f"the script's output is in none of {sorted(p.name for p in outputs)}"
        driver.delete_job(second)
        wait_for(lambda: second not in driver.get_statuses(), 30, "the deleted job to leave the queue")
        deleted = wait_for(lambda: driver.get_history(second, scripts["qlaunch00002"]), 30, "the deleted job's history")
        assert deleted.state is BatchJobState.finished
        driver.delete_job(second)  # already gone: not an error

    # -- robustness -------------------------------------------------------------------------------
    @pytest.mark.parametrize("returncode", [0, 1])
    @pytest.mark.parametrize("garbage", range(len(GARBAGE)))
    def test_garbage_gives_scheduler_error_only(self, tmp_path, garbage, returncode):
        text = GARBAGE[garbage]
        for stream in ("stdout", "stderr"):
            answer = CommandResult(("cmd",), returncode, text if stream == "stdout" else "",
                                   text if stream == "stderr" else "")
            for operation, call in self.every_operation(tmp_path).items():
                try:
                    value = call(self.driver(answer))
                except SchedulerError:
                    continue
                self.check_well_formed(operation, value)
                assert not (operation == "status" and stream == "stdout"), \
                    f"a status poll that printed {text!r} must raise SchedulerError, not read as {value!r}"
                assert not (operation == "submit"), f"submit read a job id from {text!r}"

    def test_failed_command_without_output_is_an_error(self, tmp_path):
        answer = CommandResult(("cmd",), 1, "", "")
        for operation in ("submit", "status", "delete"):
            with pytest.raises(SchedulerError):
                self.every_operation(tmp_path)[operation](self.driver(answer))

    def test_empty_output(self, tmp_path):
        answer = CommandResult(("cmd",), 0, "", "")
        with pytest.raises(SchedulerError):
            self.driver(answer).submit(self.request(tmp_path))
        for operation, call in self.every_operation(tmp_path).items():
            try:
                value = call(self.driver(answer))
            except SchedulerError:
                continue
            self.check_well_formed(operation, value)

    def test_truncated_and_shuffled_status_outputs(self):
        rng = random.Random(8)
        for name, expected in self.status_outputs.items():
            recorded = self.recorded(name)
            text = recorded.stdout
            lines = text.splitlines(keepends=True)
            variants = [text[: len(text) * k // 4] for k in (1, 2, 3)]
            variants += [text[: len(text) // 2] + "\x00\x00garbage", "".join(rng.sample(lines, len(lines)))]
            for variant in variants:
                answer = CommandResult(recorded.args, recorded.returncode, variant, recorded.stderr)
                try:
                    statuses = self.driver(answer).get_statuses(self.now)
                except SchedulerError:
                    continue
                self.check_well_formed("status", statuses)
                invented = set(statuses) - set(expected)
                assert not invented, f"{name} cut or shuffled gave job ids {sorted(invented)} it does not hold"

    def test_failing_runner_gives_scheduler_error(self, tmp_path):
        def missing(command: Command) -> CommandResult:
            raise SchedulerError(f"`{command.args[0]}` was not found on PATH", permanent=True)

        for operation, call in self.every_operation(tmp_path).items():
            try:
                value = call(self.driver(missing))
            except SchedulerError:
                continue
            # only drivers that run nothing for this operation (file-based history, no backfill) get here
            self.check_well_formed(operation, value)
            assert operation not in ("submit", "status", "delete"), f"{operation} ignored a failed command"

    def test_site_defaults_pass_the_settings_loader(self):
        if not any(ep.name == self.scheduler_class.name for ep in entry_points(group="balsam.schedulers")):
            pytest.skip(f"scheduler {self.scheduler_class.name!r} is not installed (pip install -e .): "
                        "the settings loader accepts installed schedulers only")
        plain = self.driver()
        recorded: list[tuple[Optional[Command], CommandResult]] = []
        if self.queue_outputs:
            recorded.append((plain.render_discover_queues(), self.recorded(next(iter(self.queue_outputs)))))
        if self.project_outputs:
            recorded.append((plain.render_discover_projects(), self.recorded(next(iter(self.project_outputs)))))

        def answer(command: Command) -> CommandResult:
            # each discovery command its recorded output; anything else as if not installed
            for rendered, output in recorded:
                if rendered == command:
                    return output
            return CommandResult(tuple(command.args), 127, "", "command not found")

        defaults = self.driver(answer).site_defaults()
        assert isinstance(defaults, dict), "site_defaults() returns a dict in settings.yml shape"
        assert defaults.get("scheduler", {}).get("name") == self.scheduler_class.name
        text = render_settings_yaml(defaults, source=f"{self.scheduler_class.__name__}.site_defaults()")
        parse_settings(yaml.safe_load(text), source="settings.yml written by site init")
