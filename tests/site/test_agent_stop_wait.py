"""``$BALSAM_AGENT_STOP_WAIT_SEC``: how long the agent's stop waits for the module cycles in progress
(a status poll, a submit) before it ends the commands still running (default 15 s). A value that is
no number of seconds from 0 to 3600 refuses the agent's start with one line naming the variable,
rather than a stop months later with a wait nobody meant. The agent records its wait in its pid file
(`balsam site stop`/`sync` wait as long as it needs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from balsam.site.agent import (
    DEFAULT_STOP_WAIT_SEC, STOP_WAIT_ENV, AgentError, agent_stop_timeout, read_pid_record, record_started_settings,
    recorded_stop_wait, remove_pid_file, settings_changed_since_start, stop_wait_sec, write_pid_file,
)


def test_unset_or_empty_is_the_default(monkeypatch):
    monkeypatch.delenv(STOP_WAIT_ENV, raising=False)
    assert stop_wait_sec() == DEFAULT_STOP_WAIT_SEC == 15.0
    monkeypatch.setenv(STOP_WAIT_ENV, " ")
    assert stop_wait_sec() == 15.0


@pytest.mark.parametrize("raw, expected", [("0", 0.0), ("2.5", 2.5), (" 60 ", 60.0), ("3600", 3600.0)])
def test_seconds_from_0_to_3600_are_taken(monkeypatch, raw, expected):
    monkeypatch.setenv(STOP_WAIT_ENV, raw)
    assert stop_wait_sec() == expected


@pytest.mark.parametrize("raw", ["ten", "15s", "-1", "3601", "nan", "inf", "-inf"])
def test_anything_else_is_one_line_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv(STOP_WAIT_ENV, raw)
    with pytest.raises(AgentError) as info:
        stop_wait_sec()
    assert str(info.value) == (f"environment variable {STOP_WAIT_ENV}={raw!r} is not a number from 0 to 3600 (digits "
                               "with an optional decimal point, e.g. 30 or 0.5)")


def test_a_bad_value_refuses_the_agent_daemons_start(make_site, monkeypatch):
    from balsam.site.agent import agent_running
    from balsam.site.site_ops import SiteError, start_agent

    site = make_site()
    monkeypatch.setenv(STOP_WAIT_ENV, "soon")
    with pytest.raises(SiteError) as info:
        start_agent(Path(site.site_path))
    assert (f"the site agent exited at start-up: environment variable {STOP_WAIT_ENV}='soon' is not a number from 0 to "
            "3600 ") in str(info.value)
    assert agent_running(Path(site.site_path)) is None


@pytest.mark.parametrize("settings_text", [b"scheduler: {}\n", None])
def test_the_agent_records_its_stop_wait_in_its_pid_file(tmp_path, settings_text):
    """Also when settings.yml was unreadable at start (no digest line): `balsam site stop` and `sync`
    read it there (their timeout; sync's restart keeps it)."""
    write_pid_file(tmp_path)
    try:
        assert recorded_stop_wait(tmp_path) is None and agent_stop_timeout(tmp_path) == 45.0
        record_started_settings(tmp_path, settings_text, 120.0)
        assert recorded_stop_wait(tmp_path) == 120.0
        assert agent_stop_timeout(tmp_path) == 150.0  # + the stopping hook's 20 s + the modules' close 10 s
        assert read_pid_record(tmp_path) is not None
        (tmp_path / "settings.yml").write_bytes(b"scheduler: {}\n")
        assert settings_changed_since_start(tmp_path, tmp_path / "settings.yml") is (
            None if settings_text is None else False)
    finally:
        remove_pid_file(tmp_path)


@pytest.mark.parametrize("line", ["stop_wait_sec=abc", "stop_wait_sec=-1.0", "stop_wait_sec=3601.0", "stop_wait_sec=nan"])
def test_a_stop_wait_line_no_agent_wrote_is_ignored(tmp_path, line):
    (tmp_path / "balsam-service.pid").write_text(f"host\n1\n1.0\n{line}\n")
    assert recorded_stop_wait(tmp_path) is None and agent_stop_timeout(tmp_path) == 45.0
