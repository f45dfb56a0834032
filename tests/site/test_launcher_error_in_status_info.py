"""A BatchJob whose launcher could not start (settings.yml broken since the agent started) ended
"finished" with only the scheduler's "exit status 1"; the launcher's one-line reason was in
qsubmit/qlaunchNNNNN.sh.output alone. The scheduler module now copies that line into the ended
BatchJob's status_info (``launcher_error``), and holds submissions while settings.yml does not load
(``status_info.waiting`` names the file's line)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from balsam.config import SettingsError, load_settings
import balsam.site.modules.scheduler as scheduler_module
from balsam.scheduler import JobHistory
from balsam.states import BatchJobState

from site_test_utils import batch_job, create_batch_job, wait_for


def test_the_last_error_line_of_either_output_name_is_read(tmp_path):
    script = tmp_path / "qlaunch00007.sh"
    assert scheduler_module.launcher_error_line(script) is None
    tail = scheduler_module.LAUNCHER_OUTPUT_TAIL_BYTES
    (tmp_path / "qlaunch00007.output").write_text("x" * (3 * tail) + "\nstarting\nError: boom\n\n")
    assert scheduler_module.launcher_error_line(script) == "Error: boom"


def test_the_error_line_in_the_stderr_file_of_pbs_and_slurm_is_read(tmp_path):
    """PBS (-o/-e) and Slurm (--output/--error) keep stderr apart: the launcher's Error line (printed
    to stderr) is in ``<stem>.error``, its stdout's last line in ``<stem>.output`` says something else."""
    script = tmp_path / "qlaunch00009.sh"
    (tmp_path / "qlaunch00009.output").write_text("launcher starting\n")
    (tmp_path / "qlaunch00009.error").write_text("Error: settings.yml:4 file_cleaner: duplicate key (first at line 1)\n")
    assert scheduler_module.launcher_error_line(script) == "Error: settings.yml:4 file_cleaner: duplicate key (first at line 1)"


def test_an_error_the_launcher_went_on_after_is_not_taken(tmp_path):
    script = tmp_path / "qlaunch00008.sh"
    Path(f"{script}.output").write_text("Error: transient\nlauncher done\n")
    assert scheduler_module.launcher_error_line(script) is None


def _ended_with_output(tmp_path: Path, output: str) -> dict:
    """The update of a BatchJob whose scheduler job ended "exit status 1", its output file as given."""
    module = scheduler_module.SchedulerModule.__new__(scheduler_module.SchedulerModule)
    module.site_config = SimpleNamespace(site_path=tmp_path, job_path=tmp_path / "qsubmit")
    module.logger = logging.getLogger("test")
    module._history_unknown, module.missing_counts, module.missed_since = set(), {}, {}
    module._histories = {77: JobHistory(scheduler_id=77, state=BatchJobState.finished, native_state="FAILED",
                                        message="exit status 1")}
    (tmp_path / "qsubmit").mkdir()
    Path(f"{module.script_path(5)}.output").write_text(output)
    update: dict = {}
    module._left_queue({"id": 5, "scheduler_id": 77, "state": "running", "status_info": {}}, update)
    return update


def test_an_ended_batch_job_gets_its_launchers_error_line(tmp_path):
    update = _ended_with_output(tmp_path, "Error: /site/settings.yml:37: invalid YAML: oops\n")
    assert update["state"] == "finished"
    assert update["status_info"]["launcher_error"] == "Error: /site/settings.yml:37: invalid YAML: oops"


def test_an_ended_batch_job_without_a_launcher_error_gets_none(tmp_path):
    update = _ended_with_output(tmp_path, "launcher done\n")
    assert update["state"] == "finished" and "launcher_error" not in update["status_info"]


def test_submissions_wait_while_settings_yml_does_not_load(make_site, agent_daemon, client):
    """The agent read settings.yml at its start; broken since, every launcher would exit at once:
    the BatchJob waits, its status_info naming the file's line, and is submitted once it is fixed."""
    site = make_site()
    agent_daemon(site)
    settings_path = Path(site.site_path) / "settings.yml"
    good = settings_path.read_text()
    settings_path.write_text(good + "launcher: [unclosed\n")
    with pytest.raises(SettingsError) as info:
        load_settings(settings_path)
    expected = str(info.value)  # "<path>:<line>: invalid YAML: ..."
    assert f"settings.yml:{len(good.splitlines()) + 2}: invalid YAML" in expected
    created = create_batch_job(client, site.site_id, "serial")
    waiting = wait_for(lambda: batch_job(client, created["id"])["status_info"].get("waiting"), timeout=60,
                       what="the BatchJob's waiting note")
    assert expected in waiting
    assert batch_job(client, created["id"])["state"] == "pending_submission"
    settings_path.write_text(good)
    wait_for(lambda: batch_job(client, created["id"])["state"] != "pending_submission", timeout=60,
             what="the submission once settings.yml is fixed")
    assert "waiting" not in batch_job(client, created["id"])["status_info"]
