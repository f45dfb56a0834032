"""settings.yml keys act as written, or the file is refused with one line naming the key and file.

A text key (``filter_tags`` values, ``scheduler.allowed_projects``, queue and project names) takes
a YAML number as its text (``allowed_projects: [12345]``). A number YAML reads as another value
than the one written was taken silently in its read form: a project ``012345`` became ``'5349'``
(YAML 1.1 octal), a tag ``version: 1.10`` became ``'1.1'`` (no job tagged 1.10 ever matched), a
queue ``0x10`` became ``'16'``. Such a value is refused now, on its own line, with the text to
quote; a number that reads as written is still taken.

``logging.retention_days`` is acted on by the scheduler module's sweep only: written with
``scheduler: null`` it removed nothing, silently; it is a warning now (check-settings, the agent's log).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from balsam.config import SettingsError, load_settings, loads_settings


def _error_lines(text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "settings.yml"
    path.write_text(text)
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    return [str(line) for line in info.value.errors]


@pytest.mark.parametrize(
    "text, key, line, written, read",
    [
        ("filter_tags:\n  version: 1.10\n", "filter_tags.version", 2, "1.10", "1.1"),
        ("scheduler:\n  allowed_projects:\n  - 012345\n", "scheduler.allowed_projects[0]", 3, "012345", "5349"),
        ("queue_maintainer:\n  submit_queue: 0x10\n", "queue_maintainer.submit_queue", 2, "0x10", "16"),
        ("queue_maintainer:\n  submit_project: 1_000\n", "queue_maintainer.submit_project", 2, "1_000", "1000"),
        ("filter_tags:\n  run: +7\n", "filter_tags.run", 2, "+7", "7"),
        ("filter_tags:\n  start: 1:30\n", "filter_tags.start", 2, "1:30", "90"),  # YAML 1.1 base 60
    ],
)
def test_number_read_as_another_value_is_refused_on_its_line(tmp_path: Path, text: str, key: str, line: int,
                                                              written: str, read: str) -> None:
    errors = _error_lines(text, tmp_path)
    assert len(errors) == 1, errors
    message = errors[0]
    assert message.startswith(f"{tmp_path / 'settings.yml'}:{line} {key}: "), message
    assert f"expected a string, got {written}, which YAML reads as the number {read}" in message, message
    assert f"quote it ('{written}')" in message, message
    assert "\n" not in message


def test_numbers_that_read_as_written_are_still_text(tmp_path: Path) -> None:
    settings = loads_settings(
        "filter_tags: {a: 1, b: 2.5, c: -3, d: '1.10'}\n"
        "scheduler:\n  allowed_projects: [12345, '012345']\n"
        "  allowed_queues: {7: {max_nodes: 1, max_walltime: 60, max_queued_jobs: 1}}\n"
        "queue_maintainer:\n  submit_queue: 7\n  submit_project: 12345\n",
        source=str(tmp_path / "settings.yml"),
    )
    assert settings.filter_tags == {"a": "1", "b": "2.5", "c": "-3", "d": "1.10"}
    assert settings.scheduler.allowed_projects == ["12345", "012345"]
    assert (settings.queue_maintainer.submit_queue, settings.queue_maintainer.submit_project) == ("7", "12345")


def test_check_settings_names_key_and_file(tmp_path: Path) -> None:
    """What a user runs on a site's file: one line with the file, line and key, exit status 1."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "settings.yml").write_text("logging:\n  level: INFO\nfilter_tags:\n  version: 1.10\n")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run([str(Path(sys.executable).parent / "balsam"), "site", "check-settings", str(site / "settings.yml")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines == [f"Error: {site / 'settings.yml'}:4 filter_tags.version: expected a string, got 1.10, "
                     f"which YAML reads as the number 1.1: quote it ('1.10')"], lines


@pytest.mark.parametrize(
    "text, key, line, written, read",
    [
        ("scheduler:\n  allowed_queues:\n    0x10: {max_nodes: 1, max_walltime: 60, max_queued_jobs: 1}\n",
         "scheduler.allowed_queues.0x10", 3, "0x10", "16"),
        ("filter_tags:\n  a: b\n  010: x\n", "filter_tags.010", 3, "010", "8"),
    ],
)
def test_key_read_as_another_number_is_refused_on_its_line(tmp_path: Path, text: str, key: str, line: int,
                                                           written: str, read: str) -> None:
    """A mapping key too: a queue written ``0x10:`` was the queue '16' (BatchJobs of queue 0x10
    refused as not allowed), a tag key ``010:`` the key '8'."""
    errors = _error_lines(text, tmp_path)
    assert errors == [f"{tmp_path / 'settings.yml'}:{line} {key}: a key written {written}, which YAML reads as the "
                      f"number {read}: quote it ('{written}')"], errors


def test_number_keys_that_read_as_written_are_still_names(tmp_path: Path) -> None:
    settings = loads_settings("filter_tags: {10: x, 2.5: y, '010': z}\n", source=str(tmp_path / "settings.yml"))
    assert settings.filter_tags == {"10": "x", "2.5": "y", "010": "z"}


def test_real_site_launcher_and_agent_refuse_a_tag_read_as_another_number(make_site: Any) -> None:
    """On a site made by `balsam site init`: its settings.yml edited to tag ``version: 1.10``. What a
    launcher reads (``launcher_settings``: filter_tags sent in each acquire) and what the agent
    starts from (the whole file) both refuse it in one line naming the file, line and key; before,
    both ran with the tag '1.1', and the launcher leased none of the jobs tagged version 1.10."""
    from balsam.config import SiteConfig

    site = make_site()
    path = Path(site.settings_path)
    text = path.read_text()
    assert "\nfilter_tags: {}\n" in text
    path.write_text(text.replace("\nfilter_tags: {}\n", "\nfilter_tags:\n  version: 1.10\n"))
    line = path.read_text().splitlines().index("  version: 1.10") + 1
    expected = (f"{path}:{line} filter_tags.version: expected a string, got 1.10, which YAML reads as the number "
                f"1.1: quote it ('1.10')")
    for read in (lambda: SiteConfig(site.site_path).launcher_settings, lambda: SiteConfig(site.site_path).settings):
        with pytest.raises(SettingsError) as info:
            read()
        assert str(info.value) == expected
    path.write_text(path.read_text().replace("  version: 1.10\n", "  version: '1.10'\n"))
    assert SiteConfig(site.site_path).launcher_settings.filter_tags == {"version": "1.10"}


RETENTION_WITHOUT_SCHEDULER = ("logging.retention_days: no file is removed: the sweep runs in the scheduler module, "
                               "which is disabled (scheduler: null or left out); enable it, or set retention_days to 0")


def test_retention_days_with_the_scheduler_module_disabled_is_a_warning(tmp_path: Path) -> None:
    """``logging.retention_days`` is acted on by the scheduler module's hourly sweep only: written
    with ``scheduler: null`` it removed nothing, and nothing said so."""
    path = tmp_path / "settings.yml"
    path.write_text("logging:\n  retention_days: 7\nscheduler: null\nprocessing: {}\n")
    settings = load_settings(path, log_warnings=False)
    assert settings.warnings == (f"{path}:2 {RETENTION_WITHOUT_SCHEDULER}",)
    # Acted on (the module is on), not asked for (the default), or nothing to remove (0, null): no warning.
    for text in ("logging:\n  retention_days: 7\nscheduler: {}\n", "scheduler: null\nprocessing: {}\n",
                 "logging:\n  retention_days: 0\nscheduler: null\nprocessing: {}\n",
                 "logging:\n  retention_days: null\nscheduler: null\nprocessing: {}\n"):
        path.write_text(text)
        assert load_settings(path, log_warnings=False).warnings == (), text


def test_agent_logs_the_retention_warning_at_its_start(tmp_path: Path, caplog: Any) -> None:
    """No agent module owns the ``logging`` section, so the agent logs its warnings at its start."""
    import logging
    from types import SimpleNamespace

    from balsam.site.agent import Agent

    path = tmp_path / "settings.yml"
    path.write_text("logging:\n  retention_days: 7\nscheduler: null\nprocessing: {}\n")
    site = SimpleNamespace(site_path=tmp_path, site_id=1, settings_path=path,
                           settings=load_settings(path, log_warnings=False))
    agent = Agent(site, client=SimpleNamespace(), modules=[])
    with caplog.at_level(logging.INFO, logger="balsam.site.agent"):
        agent.start()
        agent.shutdown("signal")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{path}:2 {RETENTION_WITHOUT_SCHEDULER}" in warnings, warnings


QM_WITHOUT_SCHEDULER = ("queue_maintainer: its BatchJobs would never be submitted: the scheduler module, which "
                        "submits them, is disabled (scheduler: null or left out); they would wait in pending_submission")


def test_queue_maintainer_with_the_scheduler_module_disabled_is_a_warning(tmp_path: Path) -> None:
    """The queue maintainer only posts BatchJobs; the scheduler module submits them. With
    ``scheduler: null`` they piled up in pending_submission, and nothing said why."""
    path = tmp_path / "settings.yml"
    path.write_text("scheduler: null\nqueue_maintainer:\n  num_queued_jobs: 2\n")
    assert load_settings(path, log_warnings=False).warnings == (f"{path}:2 {QM_WITHOUT_SCHEDULER}",)
    path.write_text("queue_maintainer:\n  num_queued_jobs: 2\n")  # absent disables a module too
    assert load_settings(path, log_warnings=False).warnings == (f"{path}:1 {QM_WITHOUT_SCHEDULER}",)
    for text in ("scheduler: {}\nqueue_maintainer:\n  num_queued_jobs: 2\n",  # the scheduler module on
                 "scheduler: null\nqueue_maintainer:\n  num_queued_jobs: 0\n"):  # posts nothing
        path.write_text(text)
        assert load_settings(path, log_warnings=False).warnings == (), text


def test_queue_maintainer_module_logs_the_warning_at_its_start(tmp_path: Path, caplog: Any) -> None:
    import logging
    from types import SimpleNamespace

    from balsam.site.modules.queue_maintainer import QueueMaintainerModule

    path = tmp_path / "settings.yml"
    path.write_text("scheduler: null\nqueue_maintainer:\n  num_queued_jobs: 2\n")
    settings = load_settings(path, log_warnings=False)
    site = SimpleNamespace(site_path=tmp_path, site_id=1, settings_path=path, settings=settings)
    with caplog.at_level(logging.INFO):
        QueueMaintainerModule(site, settings.queue_maintainer, SimpleNamespace())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{path}:2 {QM_WITHOUT_SCHEDULER}" in warnings, warnings
