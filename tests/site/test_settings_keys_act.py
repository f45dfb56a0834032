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


AGENT_LOGGED = """logging:
  retention_days: 7
scheduler: null
queue_maintainer:
  num_queued_jobs: 2
transfers:
  retry_backoff_sec: 60
  retry_backoff_max_sec: 10
processing: {}
"""
BACKOFF = ("transfers.retry_backoff_max_sec: 10.0 is below retry_backoff_sec (60.0): every retry waits 10.0 s and "
           "retry_backoff_sec has no effect")


def _start_agent_on(path: Path, caplog: Any) -> list[str]:
    """The WARNING lines of a real Agent's start on the site's settings.yml, and stop. No module
    is built (their constructors log none of these: test_modules_log_no_settings_warning_of_their_own),
    nor any child process ended (end_children is off)."""
    import logging
    from types import SimpleNamespace

    from balsam.config import SiteConfig
    from balsam.site.agent import Agent

    (path.parent / ".balsam-site").write_text("1\n")
    (path.parent / "data").mkdir(exist_ok=True)
    site = SiteConfig(path.parent)
    agent = Agent(site, client=SimpleNamespace(), modules=[])
    with caplog.at_level(logging.INFO):
        agent.start()
        agent.shutdown("signal", join_timeout=5)
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_warnings_are_kept_by_section_and_line(tmp_path: Path) -> None:
    """Who logs a warning picks it by its section, not by reading the text back apart."""
    path = tmp_path / "settings.yml"
    path.write_text(AGENT_LOGGED)
    settings = load_settings(path, log_warnings=False)
    assert [(w.section, w.line) for w in settings.warning_items] == [("logging", 2), ("queue_maintainer", 4),
                                                                      ("transfers", 8)]
    assert settings.warnings == tuple(w.text for w in settings.warning_items)
    assert settings.warnings[2] == f"{path}:8 {BACKOFF}"
    assert settings.warnings_of("transfers") == (f"{path}:8 {BACKOFF}",)
    assert settings.agent_warnings() == settings.warnings


def test_agent_logs_each_enabled_sections_warnings_once_at_its_start(tmp_path: Path, caplog: Any) -> None:
    """docs/settings.md: the agent logs a section's warnings once when it starts. The transfers
    module logged none of its own (retry_backoff_max_sec below retry_backoff_sec reached only
    check-settings); queue_maintainer and elastic_queue logged theirs from their constructors."""
    path = tmp_path / "settings.yml"
    path.write_text(AGENT_LOGGED)
    warnings = _start_agent_on(path, caplog)
    for text in (RETENTION_WITHOUT_SCHEDULER, QM_WITHOUT_SCHEDULER, BACKOFF):
        assert [w for w in warnings if text in w] == [w for w in warnings if w.endswith(text)], warnings
        assert len([w for w in warnings if text in w]) == 1, (text, warnings)
    assert f"{path}:8 {BACKOFF}" in warnings, warnings


def test_modules_log_no_settings_warning_of_their_own(tmp_path: Path, caplog: Any) -> None:
    """One place logs them (the agent's start): a module built on its own says none of them."""
    import logging
    from types import SimpleNamespace

    from balsam.site.modules.queue_maintainer import QueueMaintainerModule

    path = tmp_path / "settings.yml"
    path.write_text(AGENT_LOGGED)
    settings = load_settings(path, log_warnings=False)
    site = SimpleNamespace(site_path=tmp_path, site_id=1, settings_path=path, settings=settings)
    with caplog.at_level(logging.INFO):
        QueueMaintainerModule(site, settings.queue_maintainer, SimpleNamespace())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


ELASTIC_WITHOUT_SCHEDULER = ("elastic_queue: its BatchJobs would never be submitted: the scheduler module, which "
                             "submits them, is disabled (scheduler: null or left out); they would wait in "
                             "pending_submission")


def test_elastic_queue_with_the_scheduler_module_disabled_is_a_warning_logged_once(tmp_path: Path,
                                                                                  caplog: Any) -> None:
    """elastic_queue only posts BatchJobs, as queue_maintainer does: with ``scheduler: null`` they
    waited in pending_submission forever, and neither check-settings nor the agent said so."""
    pytest.importorskip("balsam_elastic")
    path = tmp_path / "settings.yml"
    path.write_text("scheduler: null\nelastic_queue:\n  submit_queue: local\n  submit_project: local\n")
    assert load_settings(path, log_warnings=False).warnings == (f"{path}:2 {ELASTIC_WITHOUT_SCHEDULER}",)
    warnings = _start_agent_on(path, caplog)
    assert [w for w in warnings if ELASTIC_WITHOUT_SCHEDULER in w] == [f"{path}:2 {ELASTIC_WITHOUT_SCHEDULER}"], warnings
    path.write_text("scheduler: {}\nelastic_queue:\n  submit_queue: local\n  submit_project: local\n")
    assert load_settings(path, log_warnings=False).warnings == ()


def test_check_settings_prints_every_warning_once(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    path = site / "settings.yml"
    path.write_text(AGENT_LOGGED)
    result = subprocess.run([str(Path(sys.executable).parent / "balsam"), "site", "check-settings", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("Warning: ")] == [
        f"Warning: {path}:2 {RETENTION_WITHOUT_SCHEDULER}", f"Warning: {path}:4 {QM_WITHOUT_SCHEDULER}",
        f"Warning: {path}:8 {BACKOFF}"], result.stderr


@pytest.mark.parametrize(
    "text, key, line, written, read",
    [
        # The one-item list written as its item: the item is the scalar as written.
        ("scheduler:\n  allowed_projects: 012345\n", "scheduler.allowed_projects[0]", 2, "012345", "5349"),
        # A value under a key written as a number (7, 2.5): on its own line, the key as written.
        ("filter_tags:\n  a: b\n  7: 1.10\n", "filter_tags.7", 3, "1.10", "1.1"),
        ("filter_tags:\n  a: b\n  2.5: 0x10\n", "filter_tags.2.5", 3, "0x10", "16"),
        ("scheduler:\n  optional_batch_job_params:\n    7: 012\n", "scheduler.optional_batch_job_params.7", 3,
         "012", "10"),
        # Merged in with `<<:`, written there or through an alias.
        ("filter_tags:\n  <<: {version: 1.10}\n", "filter_tags.version", 2, "1.10", "1.1"),
    ],
)
def test_more_places_a_number_read_as_another_value_is_refused(tmp_path: Path, text: str, key: str, line: int,
                                                               written: str, read: str) -> None:
    """Each was still taken in its read form (`allowed_projects: 012345` as '5349', a tag under the
    key 7 as '1.1'), or named the mapping's line and ``filter_tags[7]``."""
    errors = _error_lines(text, tmp_path)
    assert errors == [f"{tmp_path / 'settings.yml'}:{line} {key}: expected a string, got {written}, which YAML "
                      f"reads as the number {read}: quote it ('{written}')"], errors


def test_a_merged_alias_is_checked_as_written(tmp_path: Path) -> None:
    errors = _error_lines("scheduler:\n  optional_batch_job_params: &p {x: 1.10}\nfilter_tags:\n  <<: *p\n",
                          tmp_path)
    assert [e.split(" ", 2)[1].rstrip(":") for e in errors] == ["scheduler.optional_batch_job_params.x", "filter_tags.x"], errors



_QUEUE_ANCHOR = "scheduler:\n  name: local\n  allowed_queues:\n    local: &b {max_nodes: 1, max_walltime: 1_000, max_queued_jobs: 5}\n"


@pytest.mark.parametrize("tags", ["filter_tags:\n  max_walltime: 5\n  <<: *b\n",
                                  "filter_tags:\n  <<: *b\n  max_walltime: 5\n",
                                  "filter_tags:\n  <<: [{max_walltime: 1_000}, *b]\n  max_walltime: 5\n"])
def test_a_key_written_beside_a_merge_wins_over_the_merged_number(tags: str) -> None:
    """The key written before `<<: *b` was refused with the merged text ("got 1_000, which YAML
    reads as the number 5"): the merge's numbers overwrote the mapping's own, which win in the data."""
    settings = loads_settings(_QUEUE_ANCHOR + tags)
    assert settings.filter_tags == {"max_nodes": "1", "max_walltime": "5", "max_queued_jobs": "5"}


def test_a_merge_written_as_a_list_is_checked_as_written(tmp_path: Path) -> None:
    """`<<: [{version: 1.10}, {b: x}]` loaded silently as the tag '1.1'; a quoted key beside it wins."""
    errors = _error_lines("filter_tags:\n  <<: [{version: 1.10}, {b: x}]\n", tmp_path)
    assert errors == [f"{tmp_path / 'settings.yml'}:1 filter_tags.version: expected a string, got 1.10, which YAML "
                      f"reads as the number 1.1: quote it ('1.10')"], errors
    settings = loads_settings("filter_tags:\n  version: '1.10'\n  <<: [{version: 1.10}, {b: x}]\n")
    assert settings.filter_tags == {"version": "1.10", "b": "x"}


def test_a_merge_of_a_merge_is_checked_and_its_keys_win_shallowly(tmp_path: Path) -> None:
    """A mapping merged first inline (`<<: &m {...}`), then through its alias: only its own keys and
    its merges' are copied (the prefix scan took the keys of the mapping it was merged into)."""
    text = ("scheduler:\n  optional_batch_job_params:\n    w: 0x10\n    <<: &m {<<: {v: 1.10}, u: '1'}\n"
            "filter_tags:\n  w: 7\n  <<: *m\n")
    errors = _error_lines(text, tmp_path)
    assert [e.split(" ", 2)[1].rstrip(":") for e in errors] == [
        "scheduler.optional_batch_job_params.w", "scheduler.optional_batch_job_params.v", "filter_tags.v"], errors


def test_a_transfer_backends_text_option_read_as_another_number_is_refused(tmp_path: Path) -> None:
    """``transfers.backend_options.globus.label: 1.10`` was the label '1.1' (the backend's options
    are checked by the transfers section's validate(), which had no written numbers)."""
    pytest.importorskip("balsam_transfer_globus")
    errors = _error_lines("transfers:\n  backend_options:\n    globus:\n      label: 1.10\n", tmp_path)
    assert errors == [f"{tmp_path / 'settings.yml'}:4 transfers.backend_options.globus.label: expected a string, got "
                      f"1.10, which YAML reads as the number 1.1: quote it ('1.10')"], errors
    settings = loads_settings("transfers:\n  backend_options:\n    globus:\n      label: '1.10'\n")
    assert settings.transfers.backend_options["globus"]["label"] == "1.10"


@pytest.mark.parametrize(
    "written, read",
    [("yes", "true"), ("off", "false"), ("~", "null"), ("2024-01-01", "a date"),
     ("2024-01-01 10:00:00", "a date and time")],
)
def test_a_text_key_read_as_another_value_says_what_was_written(tmp_path: Path, written: str, read: str) -> None:
    """It said "got true", "got null", "got datetime.date(2024, 1, 1)": not what the file has, nor
    to quote it."""
    errors = _error_lines(f"filter_tags:\n  a: b\n  v: {written}\n", tmp_path)
    assert errors == [f"{tmp_path / 'settings.yml'}:3 filter_tags.v: expected a string, got {written}, which YAML "
                      f"reads as {read}: quote it ('{written}')"], errors
    # Written as it reads, the message stays as it was.
    assert _error_lines("filter_tags:\n  v: true\n", tmp_path) == [
        f"{tmp_path / 'settings.yml'}:2 filter_tags.v: expected a string, got true"]
