"""Numbers read from BALSAM_* environment variables go through one parser
(``balsam.util.env_number``): plain decimal digits (a fraction where a knob allows one), in range.

Before, each knob had its own ``int(float(raw))`` or ``float(raw)``, which took spellings nobody
means for a setting and turned some into nonsense: ``BALSAM_LAUNCHER_TICK_SEC=-5`` became a
heartbeat every 0.1 s, ``1_000`` a 1000 s one; the server took ``BALSAM_AUTH_TOKEN_TTL_SEC=1_000``,
truncated ``BALSAM_AUTH_REVOCATION_CACHE_SEC=0.5`` to 0 and answered ``inf`` with an OverflowError
traceback; ``BALSAM_SERVER_CREATE_TABLES=True`` silently meant "no"; ``BALSAM_LAUNCHER_SPAWNER``
took ``1000000`` and Arabic-Indic digits; ``BALSAM_LAUNCHER_START_TIME=now`` stopped the launcher
with a traceback. A knob a command reads at its start (the server's) stops it with one line naming
the variable and its value; one a running launcher reads is warned about once and the default used.
"""

from __future__ import annotations

import logging

import pytest

import balsam.util
from balsam.client.lease import DEFAULT_TICK_SEC, FRESH_TICKS, assumed_expiry_sec, tick_period_from_env
from balsam.launcher import runner
from balsam.launcher.entry import LauncherError, _start_launcher
from balsam.server.embedded import DEFAULT_LOG_MAX_BYTES, log_max_bytes_from_env
from balsam.server.settings import ServerSettings

#: Spellings float() or int() accept that are no setting anybody means (nan and inf were refused
#: already where float() read them; int(float()) raised an OverflowError traceback for inf).
PYTHON_ONLY = ["1_000", "-5", "+5", "1e3", "\u0663"]
NOT_FINITE = [" nan", "inf", "1e999"]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees its warnings given (they are once per process and value)."""
    monkeypatch.setattr(balsam.util, "_warned", set())


def server_settings() -> ServerSettings:
    return ServerSettings.from_env(database_url="sqlite:///:memory:", secret_key="k" * 40)


@pytest.mark.parametrize("name", ["BALSAM_AUTH_TOKEN_TTL_SEC", "BALSAM_SESSION_EXPIRE_SEC", "BALSAM_DB_POOL_SIZE"])
@pytest.mark.parametrize("raw", PYTHON_ONLY + ["inf", "1e999"])
def test_the_server_refuses_python_only_spellings_in_one_line(name: str, raw: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError) as caught:  # create_app_from_env prints it as "balsam server: <line>"
        server_settings()
    message = str(caught.value)
    assert message.startswith(f"environment variable {name}={raw!r} is not a number") and "\n" not in message


@pytest.mark.parametrize(("name", "raw"), [
    ("BALSAM_SESSION_EXPIRE_SEC", "0"),  # a lifetime of 0 is none
    ("BALSAM_AUTH_ACCESS_TTL_SEC", "0.5"),  # was truncated to 0
    ("BALSAM_IDEMPOTENCY_TTL_SEC", "999999999999"),  # past datetime's range
    ("BALSAM_MAX_BODY_BYTES", "0"),
    ("BALSAM_DB_MAX_OVERFLOW", "-1"),
])
def test_the_server_refuses_numbers_out_of_range(name: str, raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=f"^environment variable {name}="):
        server_settings()


def test_the_server_takes_plain_numbers_and_a_fraction_where_it_means_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALSAM_AUTH_TOKEN_TTL_SEC", " 3600 ")
    monkeypatch.setenv("BALSAM_AUTH_REVOCATION_CACHE_SEC", "0.5")
    monkeypatch.setenv("BALSAM_AUTH_MAX_FAILURES_PER_USER", "0")  # 0 switches the limit off
    settings = server_settings()
    assert (settings.token_ttl_sec, settings.revocation_cache_sec, settings.max_failures_per_user) == (3600, 0.5, 0)


@pytest.mark.parametrize("name", ["BALSAM_SERVER_CREATE_TABLES", "BALSAM_DASHBOARD_SECURE_COOKIES"])
def test_the_server_refuses_a_yes_or_no_it_cannot_read(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, "ture")
    with pytest.raises(ValueError, match=f"^environment variable {name}='ture': expected one of"):
        server_settings()
    monkeypatch.setenv(name, "On")
    settings = server_settings()
    assert settings.create_tables is True if name == "BALSAM_SERVER_CREATE_TABLES" else settings.dashboard_secure_cookies == "on"


@pytest.mark.parametrize("raw", PYTHON_ONLY + ["0", "0.05", "86401"])
def test_a_launcher_warns_once_about_a_tick_period_and_uses_the_default(raw: str, monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("BALSAM_LAUNCHER_TICK_SEC", raw)
    with caplog.at_level(logging.WARNING, logger="balsam.client"):
        assert tick_period_from_env() == DEFAULT_TICK_SEC
        assert tick_period_from_env() == DEFAULT_TICK_SEC
    lines = [r.getMessage() for r in caplog.records if "BALSAM_LAUNCHER_TICK_SEC" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"ignoring BALSAM_LAUNCHER_TICK_SEC={raw!r} ("), lines
    monkeypatch.setenv("BALSAM_LAUNCHER_TICK_SEC", "0.5")  # a fraction is a period
    assert tick_period_from_env() == 0.5


@pytest.mark.parametrize("raw", ["-5", "nan", "1_0"])
def test_a_bad_session_expiry_in_a_launcher_is_named_and_ignored(raw: str, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("BALSAM_SESSION_EXPIRE_SEC", raw)
    with caplog.at_level(logging.WARNING, logger="balsam.client"):
        assert assumed_expiry_sec(60.0) == FRESH_TICKS * 60.0  # -5 was 0.1 s: every lease looked stale
    assert f"ignoring BALSAM_SESSION_EXPIRE_SEC={raw!r}" in caplog.text
    monkeypatch.setenv("BALSAM_SESSION_EXPIRE_SEC", "0.4")
    assert assumed_expiry_sec(60.0) == 0.4


@pytest.mark.parametrize("raw", ["1000000", "\u0663"])
def test_a_spawner_count_that_is_no_count_is_named_and_the_default_used(raw: str, monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(runner.SPAWNER_ENV, raw)
    with caplog.at_level(logging.WARNING, logger="balsam.launcher"):
        assert runner.spawner_count(2) == 2
    assert f"ignoring {runner.SPAWNER_ENV}={raw!r}" in caplog.text


def test_a_server_log_size_in_other_digits_is_named_on_stderr(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("BALSAM_SERVER_LOG_MAX_BYTES", "\u0663\u0660")  # int() took it as 30
    assert log_max_bytes_from_env() == DEFAULT_LOG_MAX_BYTES
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("balsam server: ignoring BALSAM_SERVER_LOG_MAX_BYTES=")


@pytest.mark.parametrize("raw", ["now", "1_000", "-5", "nan"])
def test_a_launcher_start_time_that_is_no_time_stops_it_in_one_line(raw: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_LAUNCHER_START_TIME", raw)
    monkeypatch.setenv("BALSAM_SITE_PATH", str(tmp_path))  # no site: should the time pass, it stops there
    with pytest.raises(LauncherError, match=f"^environment variable BALSAM_LAUNCHER_START_TIME={raw!r} is not a number"):
        _start_launcher("mpi", 10.0, [], [], str(tmp_path), 0, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "fraction", "value"), [
    ("30", False, 30), (" 7 ", False, 7), ("0.5", True, 0.5), (".5", True, 0.5), ("5.", True, 5.0),
    ("0.5", False, None), (".", True, None), ("1.2.3", True, None), ("", True, None),
    *[(raw, True, None) for raw in PYTHON_ONLY + NOT_FINITE],
])
def test_plain_decimal_takes_digits_only(text: str, fraction: bool, value: "float | None") -> None:
    assert balsam.util.plain_decimal(text, fraction=fraction) == value
