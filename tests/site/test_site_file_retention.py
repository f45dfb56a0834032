"""settings.yml ``logging.retention_days``: the scheduler module removes a site's old files that
nothing else removed (docs/site.md, "Logs").

Each BatchJob left ``qsubmit/qlaunchNNNNN.sh`` with its scheduler output and ``.scheduler_id``
marker, each launcher its logs under ``log/``, each agent start an ``agent_*.log``: an idle site with
a queue_maintainer made hundreds a day, for ever (inode quotas of HPC file systems). Now once an
hour the scheduler module removes those not changed for ``retention_days`` days, with one scan of
each directory and the list of active BatchJobs its cycle already read: never a file of a BatchJob
still pending, queued or running, never the running agent's log, never a launcher's file changed
since the start of an active BatchJob, never a running launcher's files (it touches its log hourly:
one started by hand has no BatchJob), and no name balsam does not write; a sweep goes on over
cycles in bounded parts.

Real site on the live server, the real scheduler module and agent logging set-up, real files aged
with ``os.utime``. The scheduler driver is an in-memory queue (as in test_batchjob_start_time.py)
where a test needs a BatchJob running: the local scheduler would start a real launcher.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from balsam.builtin.local_scheduler import LocalScheduler
from balsam.config import SettingsError, loads_settings
from balsam.serialization import format_datetime
from balsam.site.agent import setup_logging
import balsam.site.modules.scheduler as scheduler_module
from balsam.site.modules.scheduler import SchedulerModule
from site_test_utils import InMemoryScheduler, batch_job, create_batch_job, wait_for

REPO = Path(__file__).resolve().parents[2]
DAY = 86400.0
MODULE_LOGGER = "balsam.site.modules.scheduler"


def _age(path: Path, days: float) -> Path:
    """Create ``path`` (if missing) last changed ``days`` ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("x\n")
    when = time.time() - days * DAY
    os.utime(path, (when, when))
    return path


def _sweep_lines(caplog: Any) -> tuple[list[str], list[str]]:
    records = [r for r in caplog.records if r.name == MODULE_LOGGER and "logging.retention_days" in r.getMessage()]
    return ([r.getMessage() for r in records if r.levelno == logging.INFO],
            [r.getMessage() for r in records if r.levelno == logging.WARNING])


@pytest.fixture
def agent_log(make_site: Any) -> Any:
    """A site whose agent logging is set up as the agent's (balsam.site.agent.setup_logging): the
    handler on the root logger writes the agent's current log; removed again after the test."""
    # The default buffering: the file is behind the buffering handler (its target).
    site = make_site(overrides={"logging": {"buffer_num_records": 1024}})
    root = logging.getLogger()
    before = list(root.handlers)
    path = setup_logging(site)
    try:
        yield site, path
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()


def test_old_files_of_ended_batch_jobs_launchers_and_agents_are_removed(agent_log, client, caplog) -> None:
    site, current = agent_log
    caplog.set_level(logging.INFO, logger=MODULE_LOGGER)
    qsubmit, log = Path(site.job_path), Path(site.log_path)
    # BatchJobs 41-43 ended (none of this new site's BatchJobs is active): their script, scheduler
    # output (both namings), marker, and a marker an id's reuse moved aside.
    old_batch = [_age(qsubmit / name, 40) for name in (
        "qlaunch00041.sh", "qlaunch00041.sh.output", "qlaunch00041.sh.scheduler_id", "qlaunch00042.sh",
        "qlaunch00042.output", "qlaunch00042.error", "qlaunch00043.sh.scheduler_id.stale-20260101T000000000000")]
    old_launcher = [_age(log / name, 40) for name in (
        "mpi_mode_2026-01-01_000000_nid001_4242.0.log", "serial_mode_2026-01-01_000000_nid002_77.0.master.log",
        "serial_mode_2026-01-01_000000_nid002_77.0.nid002.3.log", "serial_mode_2026-01-01_000000_nid002_77.0.out",
        "serial_mode_2026-01-01_000000_nid002_77.0.serial.json")]
    old_agent = [_age(log / name, 40) for name in ("agent_2026-01-01_000000.log", "agent_2026-01-02_101010.log")]
    kept = [
        _age(qsubmit / "qlaunch00044.sh", 29),  # younger than 30 days
        _age(log / "mpi_mode_2026-02-01_000000_nid001_4243.0.log", 1),
        _age(log / "agent_2026-02-01_000000.log", 29),
        # A submission whose outcome is unknown (its .submitting marker): its job may still be
        # waiting in the queue for this script, whatever became of its BatchJob.
        _age(qsubmit / "qlaunch00045.sh", 40), _age(qsubmit / "qlaunch00045.sh.submitting", 40),
        # Not balsam's, or not of these kinds: a user's notes, the agent's console, a temporary write.
        _age(log / "notes.txt", 40), _age(log / "agent-console.out", 40), _age(qsubmit / "README", 40),
        _age(qsubmit / ".tmp-qlaunch00041.sh", 40),
        # The running agent's log, however long ago it was written (buffered with a long flush_period).
        _age(current, 40),
    ]
    (log / "mpi_mode_2026-01-01_000000_nid001_1.0.log.d").mkdir()  # a directory: left alone
    os.utime(log / "mpi_mode_2026-01-01_000000_nid001_1.0.log.d", (time.time() - 40 * DAY,) * 2)

    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=LocalScheduler())
    assert module.run_cycle() is None

    gone = [p for p in old_batch + old_launcher + old_agent if p.exists()]
    assert not gone, f"not removed: {[p.name for p in gone]}"
    assert all(p.exists() for p in kept), [p.name for p in kept if not p.exists()]
    assert (log / "mpi_mode_2026-01-01_000000_nid001_1.0.log.d").is_dir()
    infos, warnings = _sweep_lines(caplog)
    assert infos == [f"removed 14 files older than logging.retention_days (30 days): 7 of ended BatchJobs "
                     f"({qsubmit}), 5 of launchers and 2 agent logs ({log})"], infos
    assert warnings == []

    # Once an hour: the next cycles neither scan again nor log.
    again = _age(qsubmit / "qlaunch00046.sh", 40)
    caplog.clear()
    module.run_cycle()
    assert again.exists() and _sweep_lines(caplog) == ([], [])


def test_a_sweep_that_removes_nothing_logs_nothing(make_site, client, caplog) -> None:
    site = make_site()
    caplog.set_level(logging.DEBUG, logger=MODULE_LOGGER)
    fresh = _age(Path(site.job_path) / "qlaunch00001.sh", 1)
    SchedulerModule(site, site.settings.scheduler, client, scheduler=LocalScheduler()).run_cycle()
    assert fresh.exists() and _sweep_lines(caplog) == ([], [])


def test_an_active_batch_jobs_files_stay_and_so_do_launcher_files_since_its_start(make_site, client, caplog) -> None:
    """A BatchJob pending submission (here one of another agent's filter_tags) and one running for
    41 days (a long reservation: its launcher logs rarely) keep their qsubmit files, however old; a
    launcher file changed since the running one's start may be its launcher's and stays; an older
    one, and an ended BatchJob's files, go."""
    site = make_site(overrides={"filter_tags": {"agent": "this"}})
    caplog.set_level(logging.INFO, logger=MODULE_LOGGER)
    fake = InMemoryScheduler()
    pending = create_batch_job(client, site.site_id, filter_tags={"agent": "other"})
    running = create_batch_job(client, site.site_id, filter_tags={"agent": "other"})
    started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=41)
    client.patch("/batch-jobs/", json=[{"id": running["id"], "state": "running", "scheduler_id": 777,
                                        "start_time": format_datetime(started)}])
    fake.run_job(777, started)
    assert batch_job(client, running["id"])["state"] == "running"
    qsubmit, log = Path(site.job_path), Path(site.log_path)
    active_files = [_age(qsubmit / f"qlaunch{b['id']:05d}.sh{end}", 60)
                    for b in (pending, running) for end in ("", ".output", ".scheduler_id")]
    ended = _age(qsubmit / f"qlaunch{running['id'] + 1000:05d}.sh", 60)
    # Its launcher's log, last written 40 days ago (after the start): may be that launcher's.
    since_start = _age(log / "mpi_mode_2026-01-01_000000_nid001_9.0.log", 40)
    # Written 50 days ago, before the start (less an hour for the clocks): no active BatchJob's.
    before_start = _age(log / "mpi_mode_2026-01-01_000000_nid001_8.0.log", 50)

    SchedulerModule(site, site.settings.scheduler, client, scheduler=fake).run_cycle()

    assert batch_job(client, running["id"])["state"] == "running"
    assert all(p.exists() for p in active_files), [p.name for p in active_files if not p.exists()]
    assert since_start.exists()
    assert not ended.exists() and not before_start.exists()
    infos, _ = _sweep_lines(caplog)
    assert len(infos) == 1 and "removed 2 files" in infos[0] and "1 of ended BatchJobs" in infos[0], infos

    # The BatchJob ended: its files go at the next sweep (another agent start here; hourly otherwise).
    client.patch("/batch-jobs/", json=[{"id": b["id"], "state": "finished"} for b in (pending, running)])
    fake.queue.clear()
    SchedulerModule(site, site.settings.scheduler, client, scheduler=fake).run_cycle()
    assert not any(p.exists() for p in active_files + [since_start])


@pytest.mark.parametrize("value", [0, None])
def test_retention_0_or_null_keeps_every_file(make_site, client, caplog, value) -> None:
    site = make_site(overrides={"logging": {"retention_days": value}})
    assert site.settings.logging.retention_days == value
    caplog.set_level(logging.INFO, logger=MODULE_LOGGER)
    old = [_age(Path(site.job_path) / "qlaunch00001.sh", 4000),
           _age(Path(site.log_path) / "agent_2016-01-01_000000.log", 4000)]
    SchedulerModule(site, site.settings.scheduler, client, scheduler=LocalScheduler()).run_cycle()
    assert all(p.exists() for p in old) and _sweep_lines(caplog) == ([], [])


def test_the_retention_is_days_of_the_setting(make_site, client) -> None:
    site = make_site(overrides={"logging": {"retention_days": 2}})
    older, younger = _age(Path(site.job_path) / "qlaunch00001.sh", 3), _age(Path(site.job_path) / "qlaunch00002.sh", 1)
    SchedulerModule(site, site.settings.scheduler, client, scheduler=LocalScheduler()).run_cycle()
    assert not older.exists() and younger.exists()


def _immutable(path: Path, on: bool) -> bool:
    """chattr +i: a file not even root can remove (EPERM)."""
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def test_files_that_cannot_be_removed_are_one_warning_and_the_cycle_goes_on(make_site, client, caplog) -> None:
    site = make_site()
    caplog.set_level(logging.INFO, logger=MODULE_LOGGER)
    stuck = [_age(Path(site.job_path) / "qlaunch00001.sh", 40),
             _age(Path(site.log_path) / "agent_2026-01-01_000000.log", 40)]
    other = _age(Path(site.job_path) / "qlaunch00002.sh", 40)
    made = [p for p in stuck if _immutable(p, True)]
    try:
        if len(made) < len(stuck):
            pytest.skip("chattr +i is not available on this file system")
        module = SchedulerModule(site, site.settings.scheduler, client, scheduler=LocalScheduler())
        assert module.run_cycle() is None
        assert all(p.exists() for p in stuck) and not other.exists()
        infos, warnings = _sweep_lines(caplog)
        assert len(infos) == 1 and "removed 1 files" in infos[0], infos
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith("could not remove 2 files older than logging.retention_days (30 days), "
                                      "tried again in 3600 s: "), warnings[0]
        assert "Operation not permitted" in warnings[0] and "(and 1 more)" in warnings[0], warnings[0]
        # The module keeps working: its next cycle runs (and does not sweep or warn again within the hour).
        caplog.clear()
        assert module.run_cycle() is None
        assert _sweep_lines(caplog) == ([], [])
    finally:
        for path in made:
            _immutable(path, False)


# -- the setting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,problem", [
    ("-1", "must not be negative (0 or null: keep for ever), got -1"),
    ("soon", "expected an integer, got 'soon'"),
    ("1.5", "expected an integer, got 1.5"),
    ("true", "expected an integer, got true"),
    ("36501", "must be at most 36500 (100 years; 0 or null: keep for ever), got 36501"),
])
def test_a_bad_retention_is_refused_in_one_line(value: str, problem: str) -> None:
    with pytest.raises(SettingsError) as caught:
        loads_settings(f"logging:\n  level: INFO\n  retention_days: {value}\n")
    assert caught.value.errors == [f"settings.yml:3 logging.retention_days: {problem}"]
    assert "\n" not in str(caught.value)


def test_a_misspelt_retention_key_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"settings.yml:2 logging.retension_days: unknown key \(did you mean "
                                            r"'retention_days'\?\)"):
        loads_settings("logging:\n  retension_days: 3\n")


@pytest.mark.parametrize("text,value", [("", 30), ("logging:\n  retention_days: null\n", None),
                                        ("logging:\n  retention_days: 0\n", 0),
                                        ("logging:\n  retention_days: 36500\n", 36500)])
def test_retention_values_that_load(text: str, value: Any) -> None:
    assert loads_settings(text).logging.retention_days == value


def test_the_retention_is_documented_with_the_settings_and_the_sample() -> None:
    from balsam.config import render_sample_settings

    doc = (REPO / "docs" / "settings.md").read_text()
    logging_section = doc.split("### `logging`", 1)[1].split("\n### ", 1)[0]
    assert "| `retention_days` | `Optional[int]` | `30` |" in logging_section
    assert "  retention_days: 30\n" in render_sample_settings()
    site_doc = " ".join((REPO / "docs" / "site.md").read_text().split())
    assert "retention_days" in site_doc
    # A sweep knows only its own site's BatchJobs: a shared qsubmit/ loses another site's files.
    assert "`qsubmit/` and `log/` must be the site's own, not shared with another site" in site_doc
    # A launcher started by hand has no BatchJob whose start would keep its files.
    assert "touches its `.log` every hour" in " ".join((REPO / "docs" / "launcher.md").read_text().split())


# -- live launchers' files, the guards, the names, the sweep's parts -------------------------------


def _launcher_script(period: float) -> str:
    """``python -m balsam.launcher`` with the launcher's log touched every ``period`` seconds
    instead of hourly (the module constant, set before the launcher runs)."""
    return ("import runpy, sys; import balsam.launcher.entry as entry; "
            f"entry.LOG_TOUCH_PERIOD_SEC = {period!r}; sys.argv[0] = 'python -m balsam.launcher'; "
            "runpy.run_module('balsam.launcher', run_name='__main__')")


def test_a_live_launcher_started_by_hand_keeps_its_quiet_log(make_site, client, tmp_path) -> None:
    """docs/launcher.md, "By hand inside an allocation": a launcher with no BatchJob whose log has
    been quiet for longer than retention_days (an mpi launcher logs at a job's start and end only)
    keeps its log and its other files: it touches its log (hourly; here every 0.2 s), and a
    launcher's files stay while its log is fresh. The log of a launcher that ended goes."""
    site = make_site(overrides={"launcher": {"idle_ttl_sec": 600}, "logging": {"retention_days": 1}})
    log = Path(site.log_path)
    dead = [_age(log / name, 3) for name in ("mpi_mode_2026-01-01_000000_nid001_4242.0.log",
                                             "serial_mode_2026-01-01_000000_nid001_77.0.master.log")]
    env = {**os.environ, "BALSAM_SITE_PATH": str(site.site_path)}
    env.pop("BALSAM_BATCH_JOB_ID", None)
    console = open(tmp_path / "launcher.console", "wb")
    proc = subprocess.Popen([sys.executable, "-c", _launcher_script(0.2), "-j", "mpi", "-t", "30"], env=env,
                            stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        live = wait_for(lambda: [p for p in log.glob("mpi_mode_*.0.log") if p not in dead] or proc.poll() is not None,
                        timeout=60, what="the launcher's log")
        assert proc.poll() is None, (tmp_path / "launcher.console").read_text()[-3000:]
        (live,) = live
        # Started (its Session open): an idle mpi launcher logs nothing more at INFO.
        wait_for(lambda: " created (site " in live.read_text() or proc.poll() is not None, timeout=60,
                 what="the launcher's Session")
        # Its log quiet for 2 days, and another file of its own (same launcher stamp) for 3.
        sibling = _age(live.with_name(live.name[:-len("log")] + "out"), 3)
        _age(live, 2)
        wait_for(lambda: live.stat().st_mtime > time.time() - 600, timeout=30, what="the launcher to touch its log")

        SchedulerModule(site, site.settings.scheduler, client, scheduler=LocalScheduler()).run_cycle()

        assert live.exists() and sibling.exists()
        assert not any(p.exists() for p in dead)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        console.close()
    # Its last line reached the file the site still has (not an unlinked one).
    assert "mpi mode done (signal 15)" in live.read_text().splitlines()[-1], live.read_text()[-2000:]


def test_a_running_batch_job_with_no_start_time_keeps_every_launcher_file(make_site, client, caplog) -> None:
    """A running BatchJob whose start the API does not have (a scheduler that gives none, a start
    not recorded yet): any launcher file may be its launcher's, however old; the sweep still
    removes ended BatchJobs' files."""
    site = make_site()
    caplog.set_level(logging.INFO, logger=MODULE_LOGGER)
    fake = InMemoryScheduler()
    running = create_batch_job(client, site.site_id)
    client.patch("/batch-jobs/", json=[{"id": running["id"], "state": "running", "scheduler_id": 778}])
    fake.run_job(778, None)
    assert batch_job(client, running["id"])["start_time"] is None
    log = Path(site.log_path)
    launcher = [_age(log / "mpi_mode_2026-01-01_000000_nid001_9.0.log", 400),
                _age(log / "serial_mode_2026-01-01_000000_nid001_8.0.master.log", 400)]
    ended = _age(Path(site.job_path) / f"qlaunch{running['id'] + 1000:05d}.sh", 400)

    SchedulerModule(site, site.settings.scheduler, client, scheduler=fake).run_cycle()

    assert all(p.exists() for p in launcher), [p.name for p in launcher if not p.exists()]
    assert not ended.exists()
    infos, _ = _sweep_lines(caplog)
    assert len(infos) == 1 and "removed 1 files" in infos[0] and "0 of launchers" in infos[0], infos


def test_launcher_files_changed_within_the_clock_slack_before_an_active_start_stay(make_site, client) -> None:
    """The scheduler's start_time and the file system's mtime come from different clocks: a
    launcher file changed half an hour before the earliest start of an active BatchJob may be its
    launcher's and stays; one changed two hours before goes."""
    site = make_site()
    fake = InMemoryScheduler()
    running = create_batch_job(client, site.site_id)
    started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=41)
    client.patch("/batch-jobs/", json=[{"id": running["id"], "state": "running", "scheduler_id": 779,
                                        "start_time": format_datetime(started)}])
    fake.run_job(779, started)
    log = Path(site.log_path)
    within = _age(log / "mpi_mode_2026-01-01_000000_nid001_5.0.log", 41 + 0.5 / 24)
    before = _age(log / "mpi_mode_2026-01-01_000000_nid001_6.0.log", 41 + 2 / 24)

    SchedulerModule(site, site.settings.scheduler, client, scheduler=fake).run_cycle()

    assert within.exists() and not before.exists()


def test_only_the_names_balsam_writes_are_removed(make_site, client, caplog) -> None:
    """The sweep removes balsam's own names only: a BatchJob's script, outputs and markers (also
    moved aside) in qsubmit/, a launcher's files of any mode (a plugin's ``one-at-a-time``, a host
    with a hyphen) and agent logs in log/; a user's copies and notes that only resemble them stay."""
    site = make_site()
    caplog.set_level(logging.INFO, logger=MODULE_LOGGER)
    qsubmit, log = Path(site.job_path), Path(site.log_path)
    gone = [_age(qsubmit / name, 40) for name in (
        "qlaunch00007.sh", "qlaunch00007.sh.output", "qlaunch00007.sh.error", "qlaunch00007.output",
        "qlaunch00007.error", "qlaunch00007.cobaltlog", "qlaunch00007.sh.scheduler_id",
        "qlaunch00007.sh.submitting.stale-20260101T000000000000", "qlaunch123456.sh")]
    gone += [_age(log / name, 40) for name in (
        "one-at-a-time_mode_2026-01-01_000000_nid001_1.0.log", "my.mode_mode_2026-01-01_000000_nid001_2.0.out",
        "mpi_mode_2026-01-01_000000_login-3_3.0.log", "serial_mode_2026-01-01_000000_nid001_4.0.serial.json",
        "serial_mode_2026-01-01_000000_nid001_4.0.nid001.cluster.7.log",
        "serial_mode_2026-01-01_000000_nid001_4.0.serial.session",
        "serial_mode_2026-01-01_000000_nid001_4.0.serial.start-error")]
    kept = [_age(qsubmit / name, 40) for name in (
        "qlaunch00007.sh.bak", "qlaunch7.py.orig", "qlaunch00007.sh~", "qlaunch00012.notes.txt",
        "qlaunch\u0660\u0667.sh", "qlaunch.sh", "qlaunch00007.output.1")]
    kept += [_age(log / name, 40) for name in (
        "my_mode_2020-01-01_000000_anything.keep.txt", "serial_mode_2020-01-01_000000_host_1.0.log.gz",
        "mpi_mode_2020-01-01_000000_host_1.0.log.bak", "mpi_mode_2020-01-01_000000_host.0.log",
        "agent_2020-01-01_000000.log.1")]

    SchedulerModule(site, site.settings.scheduler, client, scheduler=LocalScheduler()).run_cycle()

    assert not [p.name for p in gone if p.exists()]
    assert not [p.name for p in kept if not p.exists()]
    infos, _ = _sweep_lines(caplog)
    assert len(infos) == 1 and f"removed {len(gone)} files" in infos[0], infos


def test_a_launchers_files_stay_while_its_log_is_fresh(make_site, client) -> None:
    """A running launcher touches its ``.log`` hourly: its other files (a serial master's or a
    rank's log, quiet for days) stay while that log is fresh, whatever their own age; all files
    of a launcher whose log is old go."""
    site = make_site()
    log = Path(site.log_path)
    live = "serial_mode_2026-01-01_000000_nid001_11.0"
    ended = "serial_mode_2026-01-01_000000_nid001_12.0"
    kept = [_age(log / f"{live}.log", 0.01)] + [_age(log / f"{live}.{end}", 40) for end in (
        "master.log", "nid001.0.log", "out", "serial.json")]
    gone = [_age(log / f"{ended}.{end}", 40) for end in ("log", "master.log", "nid001.0.log", "out", "serial.json")]

    SchedulerModule(site, site.settings.scheduler, client, scheduler=LocalScheduler()).run_cycle()

    assert not [p.name for p in kept if not p.exists()]
    assert not [p.name for p in gone if p.exists()]


def test_a_sweep_goes_on_over_cycles_in_bounded_parts_with_one_line_at_its_end(make_site, client, caplog,
                                                                               monkeypatch) -> None:
    """At most RETENTION_SWEEP_MAX_CALLS stats and removals a cycle (here 6: three old files), the
    rest at the next cycles; one INFO line once the sweep is done. A module closed (the agent
    stopping) stops its sweep, with one line saying what it removed so far."""
    monkeypatch.setattr(scheduler_module, "RETENTION_SWEEP_MAX_CALLS", 6, raising=False)
    site = make_site()
    caplog.set_level(logging.INFO, logger=MODULE_LOGGER)
    old = [_age(Path(site.job_path) / f"qlaunch{i:05d}.sh", 40) for i in range(1, 9)]
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=LocalScheduler())

    left = []
    for _ in range(3):
        module.run_cycle()
        left.append(sum(p.exists() for p in old))
        if left[-1] == 0:
            break
        assert _sweep_lines(caplog) == ([], [])
    assert left == [5, 2, 0], left
    infos, warnings = _sweep_lines(caplog)
    assert len(infos) == 1 and "removed 8 files" in infos[0] and warnings == [], infos

    # The next sweep is an hour away; one begun and then closed stops where it is.
    caplog.clear()
    again = [_age(Path(site.job_path) / f"qlaunch{i:05d}.sh", 40) for i in range(11, 19)]
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=LocalScheduler())
    module.run_cycle()
    assert sum(p.exists() for p in again) == 5
    assert _sweep_lines(caplog) == ([], [])
    module.close()
    infos, warnings = _sweep_lines(caplog)
    assert len(infos) == 1 and "stopped before its end (the module was closed)" in infos[0], infos
    assert "removed 3 files: 3 of ended BatchJobs" in infos[0] and warnings == [], infos
    module.run_cycle()
    assert sum(p.exists() for p in again) == 5 and _sweep_lines(caplog) == (infos, [])


def test_a_sweep_stopped_by_a_part_that_raises_logs_what_it_removed(make_site, client, caplog, monkeypatch) -> None:
    """A part of a sweep that raises (a bug) drops the sweep (tried again in an hour): what its
    earlier parts removed is one line too, not lost with it."""
    monkeypatch.setattr(scheduler_module, "RETENTION_SWEEP_MAX_CALLS", 6, raising=False)
    site = make_site()
    caplog.set_level(logging.INFO, logger=MODULE_LOGGER)
    old = [_age(Path(site.job_path) / f"qlaunch{i:05d}.sh", 40) for i in range(1, 9)]
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=LocalScheduler())
    module.run_cycle()
    assert sum(p.exists() for p in old) == 5 and _sweep_lines(caplog) == ([], [])

    def broken(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("a bug in a later part")

    monkeypatch.setattr(scheduler_module.RetentionSweeper, "step", broken)
    module.run_cycle()  # the cycle goes on (the error is logged with its traceback)
    infos, warnings = _sweep_lines(caplog)
    assert len(infos) == 1 and "stopped before its end (a part of it raised)" in infos[0], infos
    assert "removed 3 files: 3 of ended BatchJobs" in infos[0] and warnings == [], infos
    module.close()  # that sweep was dropped: nothing more
    assert _sweep_lines(caplog) == (infos, [])


def test_a_part_of_a_sweep_is_bounded_in_time_too(make_site, client, monkeypatch) -> None:
    """Each part also ends after RETENTION_SWEEP_MAX_PART_SEC (on a slow file system its calls alone
    held the cycle past the agent's stop wait); at least one file a part: with no time at all, a
    file a cycle."""
    monkeypatch.setattr(scheduler_module, "RETENTION_SWEEP_MAX_PART_SEC", 0.0, raising=False)
    site = make_site()
    old = [_age(Path(site.job_path) / f"qlaunch{i:05d}.sh", 40) for i in range(1, 4)]
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=LocalScheduler())
    left = []
    for _ in range(3):
        module.run_cycle()
        left.append(sum(p.exists() for p in old))
    assert left == [2, 1, 0], left


def test_each_part_of_a_sweep_keeps_the_files_of_batch_jobs_active_by_its_own_cycle(make_site, client,
                                                                                   monkeypatch) -> None:
    """A BatchJob created while a sweep is in progress (here after its first part) keeps its files
    listed before it existed: each part takes its own cycle's list of active BatchJobs. Its files
    are recent at the first part (which can reach one of them and keeps it) and old after it."""
    monkeypatch.setattr(scheduler_module, "RETENTION_SWEEP_MAX_CALLS", 2, raising=False)  # a file a part
    site = make_site(overrides={"filter_tags": {"agent": "this"}})  # its BatchJobs are not submitted here
    first = create_batch_job(client, site.site_id, filter_tags={"agent": "other"})
    qsubmit = Path(site.job_path)
    # The files of the BatchJob to come (ids are given in order), and an ended BatchJob's.
    coming = [_age(qsubmit / f"qlaunch{first['id'] + 1:05d}{end}", 0) for end in (".sh", ".sh.output", ".output")]
    ended = [_age(qsubmit / f"qlaunch{first['id'] + 1000:05d}{end}", 40) for end in (".sh", ".output")]
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=LocalScheduler())
    module.run_cycle()
    assert sum(p.exists() for p in coming + ended) in (4, 5)  # one file done: a recent one kept, or an old one gone
    second = create_batch_job(client, site.site_id, filter_tags={"agent": "other"})
    assert second["id"] == first["id"] + 1
    for path in coming:
        _age(path, 40)
    for _ in range(5):
        module.run_cycle()

    assert not any(p.exists() for p in ended)
    assert all(p.exists() for p in coming), [p.name for p in coming if not p.exists()]


def test_each_part_of_a_sweep_keeps_launcher_files_since_a_start_of_its_own_cycle(make_site, client,
                                                                                monkeypatch) -> None:
    """A BatchJob that starts running while a sweep is in progress (here after its first part), 41
    days ago by the scheduler's record, keeps the launcher files changed since (40 days ago) that
    the sweep listed before: each part takes its own cycle's launcher cutoff. The files are recent
    at the first part (which reaches one of them and keeps it) and old after it."""
    monkeypatch.setattr(scheduler_module, "RETENTION_SWEEP_MAX_CALLS", 3, raising=False)  # a file a part
    site = make_site(overrides={"filter_tags": {"agent": "this"}})
    fake = InMemoryScheduler()
    running = create_batch_job(client, site.site_id, filter_tags={"agent": "other"})
    log = Path(site.log_path)
    launchers = [_age(log / f"mpi_mode_2026-01-01_000000_nid001_{pid}.0.log", 0) for pid in (21, 22, 23)]
    # Old in any part: changed before the start, less the clock slack.
    before_start = _age(log / "mpi_mode_2026-01-01_000000_nid001_24.0.log", 50)
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    module.run_cycle()
    started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=41)
    client.patch("/batch-jobs/", json=[{"id": running["id"], "state": "running", "scheduler_id": 781,
                                        "start_time": format_datetime(started)}])
    fake.run_job(781, started)
    for path in launchers:
        _age(path, 40)
    for _ in range(5):
        module.run_cycle()

    assert batch_job(client, running["id"])["state"] == "running"
    assert all(p.exists() for p in launchers), [p.name for p in launchers if not p.exists()]
    # The sweep did reach the launcher files: one changed before the start goes.
    assert not before_start.exists()
