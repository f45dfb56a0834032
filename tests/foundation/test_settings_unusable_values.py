"""settings.yml values that passed `balsam site check-settings` but broke the agent or its logs:

- periods past the platform's time_t (``9999999999``, ``.inf``) ended a module's thread with
  OverflowError; ``.nan`` made it spin; NaN was accepted for any number (``retry_backoff_sec``);
- a logging format naming an unknown field wrote an empty log ("--- Logging error ---" per record);
- a key (or a whole section) written twice was read silently, the last one winning.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from balsam.config import SettingsError, load_settings, render_settings_yaml
from balsam.config import settings as settings_module


def _settings_with(tmp_path: Path, old: str, new: str) -> Path:
    text = render_settings_yaml({"transfers": {}, "file_cleaner": {}, "scheduler": {}})
    assert old in text, old
    path = tmp_path / "settings.yml"
    path.write_text(text.replace(old, new, 1))
    return path


def _line_of(path: Path, needle: str) -> int:
    return next(number for number, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    "old, new, key, problem",
    [
        ("  sync_period: 10\n", "  sync_period: 9999999999\n", "scheduler.sync_period", "must be at most"),
        ("  service_period: 30\n", "  service_period: 99999999999999999999\n", "file_cleaner.service_period",
         "must be at most"),
        ("  service_period: 5.0\n", "  service_period: .inf\n", "transfers.service_period", "expected a finite number"),
        ("  service_period: 5.0\n", "  service_period: .nan\n", "transfers.service_period", "expected a finite number"),
        ("  retry_backoff_sec: 30.0\n", "  retry_backoff_sec: .nan\n", "transfers.retry_backoff_sec",
         "expected a finite number"),
    ],
)
def test_periods_and_numbers_the_agent_cannot_wait_are_refused(tmp_path, old, new, key, problem):
    path = _settings_with(tmp_path, old, new)
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    line = _line_of(path, new.strip())
    assert f"{path}:{line} {key}: {problem}" in str(info.value)


def test_a_period_of_a_year_is_accepted(tmp_path):
    path = _settings_with(tmp_path, "  sync_period: 10\n", "  sync_period: 31536000\n")
    assert load_settings(path).scheduler.sync_period == 31536000


@pytest.mark.parametrize("key, value, problem", [
    ("format", "'%(nosuch)s %(message)s'", "cannot format a log record"),
    ("format", "'%(message)d'", "cannot format a log record"),
])
def test_a_logging_format_that_cannot_format_a_record_is_refused(tmp_path, key, value, problem):
    path = tmp_path / "settings.yml"
    path.write_text(textwrap.dedent(f"""\
        logging:
          level: INFO
          {key}: {value}
        """))
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}:3 logging.{key}: {problem}")


def test_a_duplicate_key_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "settings.yml"
    path.write_text(textwrap.dedent("""\
        logging:
          level: INFO
          level: DEBUG
        """))
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}:3 logging.level: duplicate key (first at line 2)"


def test_a_section_written_twice_is_refused(tmp_path):
    path = tmp_path / "settings.yml"
    path.write_text(textwrap.dedent("""\
        file_cleaner: {}
        logging:
          level: INFO
        file_cleaner:
          service_period: 5
        """))
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}:4 file_cleaner: duplicate key (first at line 1)"


@pytest.mark.parametrize("text, expected", [
    ("m: {1: a, '1': b}\n", []),  # an int key and a str key: two keys to the loader
    ("m:\n  true: a\n  True: b\n", [(("m", "True"), 3, 2)]),  # one bool key written two ways
    ("b: &x {k: 1}\nc:\n  <<: *x\n  <<: *x\n  k: 2\n", []),  # merge keys may repeat
])
def test_duplicate_keys_are_keys_as_the_loader_builds_them(text, expected) -> None:
    found: list = []
    settings_module._line_map(text, found)
    assert found == expected
