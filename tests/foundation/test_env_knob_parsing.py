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
import re

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
    monkeypatch.setattr(balsam.util, "_env_warned", {})


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
    ("BALSAM_SESSION_EXPIRE_SEC", "0.05"),  # under the launchers' shortest too
    ("BALSAM_IDEMPOTENCY_TTL_SEC", "0"),  # no answer remembered: a resent create made its records twice
    ("BALSAM_AUTH_ACCESS_TTL_SEC", "0.5"),  # was truncated to 0
    ("BALSAM_IDEMPOTENCY_TTL_SEC", "999999999999"),  # past datetime's range
    ("BALSAM_MAX_BODY_BYTES", "0"),
    ("BALSAM_DB_MAX_OVERFLOW", "-2"),  # -1 alone has a meaning (no limit)
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
    with pytest.raises(ValueError, match=f"^environment variable {name}='ture' is not one of "):
        server_settings()
    monkeypatch.setenv(name, "On")
    settings = server_settings()
    assert settings.create_tables is True if name == "BALSAM_SERVER_CREATE_TABLES" else settings.dashboard_secure_cookies == "always"


@pytest.mark.parametrize("raw", PYTHON_ONLY + ["86401", "-0.05"])
def test_a_launcher_warns_once_about_a_tick_period_and_uses_the_default(raw: str, monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("BALSAM_LAUNCHER_TICK_SEC", raw)
    with caplog.at_level(logging.WARNING, logger="balsam.client"):
        assert tick_period_from_env() == DEFAULT_TICK_SEC
        assert tick_period_from_env() == DEFAULT_TICK_SEC
    lines = [r.getMessage() for r in caplog.records if "BALSAM_LAUNCHER_TICK_SEC" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"environment variable BALSAM_LAUNCHER_TICK_SEC={raw!r} is not a number"), lines
    assert lines[0].endswith(f"using the default {DEFAULT_TICK_SEC:g}"), lines
    monkeypatch.setenv("BALSAM_LAUNCHER_TICK_SEC", "0.5")  # a fraction is a period
    assert tick_period_from_env() == 0.5


@pytest.mark.parametrize("raw", ["-5", "nan", "1_0"])
def test_a_bad_session_expiry_in_a_launcher_is_named_and_ignored(raw: str, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("BALSAM_SESSION_EXPIRE_SEC", raw)
    with caplog.at_level(logging.WARNING, logger="balsam.client"):
        assert assumed_expiry_sec(60.0) == FRESH_TICKS * 60.0  # -5 was 0.1 s: every lease looked stale
    assert f"environment variable BALSAM_SESSION_EXPIRE_SEC={raw!r} is not a number from 0.1" in caplog.text
    # What it does instead ("using the default" named no value: the default is None).
    assert caplog.records[0].getMessage().endswith(f"): assuming a Session outlives {FRESH_TICKS:g} heartbeat periods")
    monkeypatch.setenv("BALSAM_SESSION_EXPIRE_SEC", "0.4")
    assert assumed_expiry_sec(60.0) == 0.4


@pytest.mark.parametrize("raw", ["1000000", "\u0663"])
def test_a_spawner_count_that_is_no_count_is_named_and_the_default_used(raw: str, monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(runner.SPAWNER_ENV, raw)
    with caplog.at_level(logging.WARNING, logger="balsam.launcher"):
        assert runner.spawner_count(2) == 2
    assert f"environment variable {runner.SPAWNER_ENV}={raw!r} is not a number from 0 to 256" in caplog.text
    assert caplog.records[0].getMessage().endswith(
        "(digits only, e.g. 30): using the default (a spawner per CPU of the node, up to 4)")  # says what happens


def test_a_server_log_size_in_other_digits_is_named_on_stderr(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("BALSAM_SERVER_LOG_MAX_BYTES", "\u0663\u0660")  # int() took it as 30
    assert log_max_bytes_from_env() == DEFAULT_LOG_MAX_BYTES
    err = capsys.readouterr().err.splitlines()
    assert err == [f"balsam server: environment variable BALSAM_SERVER_LOG_MAX_BYTES='\u0663\u0660' is not a number from 0 "
                   f"(digits only, e.g. 30): using the default {DEFAULT_LOG_MAX_BYTES}"]


@pytest.mark.parametrize("raw", ["now", "1_000", "-5", "nan", "1e+16", "10000000000000000", "9" * 400 + ".5"])
def test_a_launcher_start_time_that_is_no_time_stops_it_in_one_line(raw: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BALSAM_LAUNCHER_START_TIME", raw)
    monkeypatch.setenv("BALSAM_SITE_PATH", str(tmp_path))  # no site: should the time pass, it stops there
    quoted = re.escape(f"environment variable BALSAM_LAUNCHER_START_TIME={raw[:64]!r}")  # a long one is quoted in part
    # The bound in words: the epoch number it showed meant nothing to a reader.
    with pytest.raises(LauncherError, match=rf"^{quoted}(\.\.\. \(\d+ characters\))? is not a number from 0, at most a "
                                            r"day past this host's clock \("):
        _start_launcher("mpi", 10.0, [], [], str(tmp_path), 0, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "fraction", "value"), [
    ("30", False, 30), (" 7 ", False, 7), ("0.5", True, 0.5), (".5", True, 0.5), ("5.", True, 5.0),
    ("0.5", False, None), (".", True, None), ("1.2.3", True, None), ("", True, None),
    *[(raw, True, None) for raw in PYTHON_ONLY + NOT_FINITE],
    ("1" * 5000, False, None),  # int() raised its own ValueError (over 4300 digits)
    ("9" * 400 + ".5", True, None),  # float() gave inf
    ("1" * 64, False, int("1" * 64)),
])
def test_plain_decimal_takes_digits_only(text: str, fraction: bool, value: "float | None") -> None:
    assert balsam.util.plain_decimal(text, fraction=fraction) == value


def test_an_overflow_of_minus_one_means_no_limit_and_no_other_negative_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALSAM_DB_MAX_OVERFLOW", " -1 ")  # SQLAlchemy's "no limit": the server stopped on it
    assert server_settings().max_overflow == -1
    monkeypatch.setenv("BALSAM_DB_MAX_OVERFLOW", "-2")
    with pytest.raises(ValueError, match=r"^environment variable BALSAM_DB_MAX_OVERFLOW='-2' is not a number from 0 "
                                         r"\(digits only, e.g. 30, or -1\)$"):
        server_settings()


def test_the_session_expiry_is_one_rule_for_the_server_and_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALSAM_SESSION_EXPIRE_SEC", "2.5")  # the server took it (truncated), then refused it
    assert server_settings().session_expire_sec == 2.5
    assert assumed_expiry_sec(60.0) == 2.5


def test_a_sweep_period_of_zero_sweeps_at_every_chance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALSAM_SESSION_SWEEP_SEC", "0")  # app.py: a background sweep every 0.5 s
    assert server_settings().session_sweep_sec == 0


@pytest.mark.parametrize("raw", ["0", "0.05", "0.0"])
def test_a_tick_period_under_the_shortest_is_raised_to_it_with_one_warning(raw: str, monkeypatch: pytest.MonkeyPatch,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    from balsam.client.lease import MIN_TICK_SEC

    monkeypatch.setenv("BALSAM_LAUNCHER_TICK_SEC", raw)  # was the default 60 s, the slowest, not the fastest
    with caplog.at_level(logging.WARNING, logger="balsam.client"):
        assert tick_period_from_env() == MIN_TICK_SEC
        assert tick_period_from_env() == MIN_TICK_SEC
    assert [r.getMessage() for r in caplog.records] == [  # the one form ("is under the shortest ..." was another)
        f"environment variable BALSAM_LAUNCHER_TICK_SEC={raw!r} is not a number from 0.1 to 86400 (digits with an "
        "optional decimal point, e.g. 30 or 0.5): using 0.1, the shortest heartbeat period"]


def test_a_warning_about_the_environment_is_given_once_however_many_others_came(monkeypatch: pytest.MonkeyPatch,
                                                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(balsam.util, "_warned", set())
    monkeypatch.setenv("BALSAM_LAUNCHER_TICK_SEC", "nan")
    with caplog.at_level(logging.WARNING, logger="balsam.client"):
        tick_period_from_env()
        for key in range(3 * balsam.util._WARNED_MOST):  # a long launcher's per-app warnings
            balsam.util.first_warning(("app", key))
        tick_period_from_env()
    assert len([r for r in caplog.records if "BALSAM_LAUNCHER_TICK_SEC" in r.getMessage()]) == 1


def test_env_number_takes_only_warn_or_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALSAM_LAUNCHER_TICK_SEC", "nan")
    with pytest.raises(TypeError, match="on_bad='ignore'"):
        balsam.util.env_number("BALSAM_LAUNCHER_TICK_SEC", 1.0, on_bad="ignore")  # type: ignore[call-overload]


ROUND_TRIP = [0.0, 1e-05, 1.5e-07, 2.5e-05, 0.5, 30.0, 3600.0, 1733500000.25, 1733500000.0, 1733500000.1234567, 1e16,
              1.2345e16, 1e-62]


def test_a_number_written_for_a_child_is_read_back_the_same() -> None:
    from balsam.launcher.entry import start_time_text

    for value in ROUND_TRIP:  # repr(): '1e-05' and '1e+16', refused by every reader; '%.6f' rounded
        for text in (balsam.util.plain_decimal_text(value), start_time_text(value)):
            assert balsam.util.plain_decimal(text, fraction=True) == value, text
    assert balsam.util.plain_decimal_text(30.0) == "30" and balsam.util.plain_decimal_text(1e-05) == "0.00001"
    for no_text in (-1.0, float("nan"), float("inf"), 1e-300):  # none is a setting's value
        with pytest.raises(ValueError):
            balsam.util.plain_decimal_text(no_text)


def test_site_sync_restarts_an_agent_with_a_stop_wait_it_reads(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`balsam site sync` passes the recorded stop wait on (site_ops.start_agent); repr() wrote
    0.00001 as '1e-05', which the agent refused: it was stopped and not restarted. The child here
    is a real process that reads it with the agent's own reader and says what it read."""
    import os
    import sys

    from balsam.site.agent import STOP_WAIT_ENV
    from balsam.site.site_ops import SiteError, start_agent

    monkeypatch.delenv(STOP_WAIT_ENV, raising=False)  # sync run from a shell without it
    reader = tmp_path / "agent"
    reader.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'from balsam.site.agent import stop_wait_sec; "
                      "print(\"Error: read\", repr(stop_wait_sec())); raise SystemExit(3)'\n")
    reader.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(reader))  # start_agent runs [sys.executable, "-m", "balsam.site", ...]
    site = tmp_path / "site"
    site.mkdir()
    for wait in (0.00001, 2.5):
        with pytest.raises(SiteError, match=rf"exited at start-up: read {wait!r} \(see "):
            start_agent(site, wait_sec=30, stop_wait_sec=wait)
    assert STOP_WAIT_ENV not in os.environ


def test_a_program_sets_secure_cookies_after_the_settings_are_made() -> None:
    from types import SimpleNamespace

    from balsam.server.dashboard.views import _secure

    settings = ServerSettings(database_url="sqlite://", secret_key="k" * 40)
    http = SimpleNamespace(url=SimpleNamespace(scheme="http"))
    # A yes word set on the field lost Secure cookies; a value nobody can read fails closed (Secure).
    for given, secure in (("yes", True), ("1", True), (True, True), ("sometimes", True), (None, True),
                          (" No ", False), (False, False), ("never", False), ("auto", False)):
        settings.dashboard_secure_cookies = given  # type: ignore[assignment]
        assert _secure(http, settings) is secure, given  # type: ignore[arg-type]


def test_secure_cookies_blank_is_auto_and_errors_quote_the_value_as_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALSAM_DASHBOARD_SECURE_COOKIES", "   ")  # refused; before it and any blank number: unset
    assert server_settings().dashboard_secure_cookies == "auto"
    monkeypatch.setenv("BALSAM_SERVER_CREATE_TABLES", " Ture ")
    with pytest.raises(ValueError, match=r"^environment variable BALSAM_SERVER_CREATE_TABLES=' Ture ' is not one of "):
        server_settings()


@pytest.mark.parametrize(("given", "mode", "http", "https"), [
    ("on", "always", True, True), ("No", "never", False, False), ("auto", "auto", False, True)])
def test_secure_cookies_are_normalised_once_in_the_settings(given: str, mode: str, http: bool, https: bool) -> None:
    from types import SimpleNamespace

    from balsam.server.dashboard.views import _secure

    settings = ServerSettings(database_url="sqlite://", secret_key="k" * 40, dashboard_secure_cookies=given)
    assert settings.dashboard_secure_cookies == mode
    for scheme, secure in (("http", http), ("https", https)):
        assert _secure(SimpleNamespace(url=SimpleNamespace(scheme=scheme)), settings) is secure  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^dashboard_secure_cookies='sometimes' is not one of auto, always, never, "):
        ServerSettings(database_url="sqlite://", secret_key="k" * 40, dashboard_secure_cookies="sometimes")


# -- the other readers of numbers in the environment: one parser, one form of message -------------

@pytest.mark.parametrize("raw", ["1e3", "1_0", "-5"])
def test_the_launchers_margin_and_app_refresh_warn_in_the_one_form(raw: str, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from balsam.launcher.job_mode import env_float

    monkeypatch.setenv("BALSAM_LAUNCHER_APP_REFRESH_SEC", raw)  # float() took 1e3 and 1_0
    with caplog.at_level(logging.WARNING, logger="balsam.launcher"):
        assert env_float("BALSAM_LAUNCHER_APP_REFRESH_SEC", 10.0) == 10.0
    assert caplog.records[0].getMessage() == (
        f"environment variable BALSAM_LAUNCHER_APP_REFRESH_SEC={raw!r} is not a number from 0 (digits with an optional "
        "decimal point, e.g. 30 or 0.5): using the default 10")


@pytest.mark.parametrize("raw", ["1e3", "1_0", "nan"])
def test_the_agents_stop_wait_is_refused_in_the_one_form(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.site.agent import AgentError, stop_wait_sec

    monkeypatch.setenv("BALSAM_AGENT_STOP_WAIT_SEC", raw)
    with pytest.raises(AgentError, match=f"^environment variable BALSAM_AGENT_STOP_WAIT_SEC={raw!r} is not a number from "
                                         "0 to 3600 "):
        stop_wait_sec()
    monkeypatch.setenv("BALSAM_AGENT_STOP_WAIT_SEC", "2.5")
    assert stop_wait_sec() == 2.5


def test_a_program_passes_any_real_number_as_its_connect_wait() -> None:
    from decimal import Decimal
    from fractions import Fraction

    import numpy as np

    from balsam.client import RESTClient
    from balsam.client.rest import ClientSettingsError, parse_connect_wait

    for given, wait in ((np.int64(30), 30.0), (np.float32(0.5), 0.5), (Decimal("2.5"), 2.5), (Fraction(1, 2), 0.5),
                        (10 ** 400, float("inf"))):  # float() of the last overflows: longer than any wait
        assert parse_connect_wait(given, "connect_wait") == wait
    assert RESTClient("http://127.0.0.1:1", connect_wait=np.int64(30)).connect_wait == 30.0
    for bad in (Decimal("NaN"), Fraction(-1, 2), [30], "1e3", True):
        with pytest.raises(ClientSettingsError) as caught:
            RESTClient("http://127.0.0.1:1", connect_wait=bad)
        if not isinstance(bad, (str, bool)):  # a program's value: no "digits ..." spelling, which it never typed
            assert str(caught.value) == (f"connect_wait={bad!r} is not a number from 0 (seconds, or math.inf for the "
                                         "client's retries alone): how long an API call retries a server it cannot "
                                         "connect to")


def test_the_connect_wait_takes_digits_or_inf() -> None:
    from balsam.client.rest import ClientSettingsError, parse_connect_wait

    assert [parse_connect_wait(raw) for raw in ("30", " 0.5 ", "inf", "INF")] == [30.0, 0.5, float("inf"), float("inf")]
    assert parse_connect_wait(5, "connect_wait") == 5.0  # a program's number is taken as it is
    for raw in ("1e3", "1_0", "-5", "nan", True):  # float() took the first two
        with pytest.raises(ClientSettingsError, match=r"is not a number from 0 \(digits with an optional decimal point, "
                                                      r"e.g. 30 or 0.5, or inf for the client's retries alone\): how long"):
            parse_connect_wait(raw)


def test_the_mpi_partitions_count_warns_once_instead_of_falling_back_silently(caplog: pytest.LogCaptureFixture) -> None:
    from balsam.launcher.modes.mpi import MPI_PARTITIONS_ENV, mpi_partitions

    with caplog.at_level(logging.WARNING, logger="balsam.launcher"):
        assert [mpi_partitions({MPI_PARTITIONS_ENV: raw}) for raw in ("3", "", "two", "two", "0")] == [3, 1, 1, 1, 1]
    assert [r.getMessage().split(" is not")[0] for r in caplog.records] == [
        f"environment variable {MPI_PARTITIONS_ENV}='two'", f"environment variable {MPI_PARTITIONS_ENV}='0'"]


@pytest.mark.parametrize(("raw", "found"), [("42", 42), (" 7 ", 7), ("-5", None), ("1_000", None), ("\u0663", None),
                                           ("9" * 5000, None)])
def test_the_batch_job_id_is_one_rule_for_the_launcher(raw: str, found: "int | None", tmp_path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from balsam.launcher.service_calls import find_batch_job_id
    from balsam.site.launcher_credentials import credential_path, use_launcher_credential

    platform = SimpleNamespace(scheduler_id=lambda env: None)  # no scheduler id to look a BatchJob up by
    env = {"BALSAM_BATCH_JOB_ID": raw}
    with caplog.at_level(logging.WARNING, logger="balsam.launcher"):
        assert find_batch_job_id(1, env, platform) == found == balsam.util.batch_job_id_from_env(env)  # int() took -5, 1_000
    if found is None:  # what the launcher does instead ("using the default" named no value)
        assert caplog.records[0].getMessage().endswith("): looking the BatchJob up by the scheduler's id")
    # The launcher's credential reader, the same rule: isdecimal() took '\u0663' for BatchJob 3's
    # credential, and int() raised a traceback on 5,000 digits.
    for batch_job_id in (3, 7, 42, 1000):
        path = credential_path(tmp_path, batch_job_id)
        path.parent.mkdir(exist_ok=True)
        path.write_text("api_root: http://127.0.0.1:1\n")
    assert use_launcher_credential(tmp_path, env) == (None if found is None else credential_path(tmp_path, found))
    assert env.get("BALSAM_CLIENT_PATH") == (None if found is None else str(credential_path(tmp_path, found)))


def test_a_recursion_error_that_is_not_the_yamls_is_not_relabelled(monkeypatch: pytest.MonkeyPatch) -> None:
    import balsam.config.settings as config_settings

    def validator_bug(*args: object, **kwargs: object) -> None:
        raise RecursionError("a plugin validator's bug")

    monkeypatch.setattr(config_settings, "parse_settings", validator_bug)
    with pytest.raises(RecursionError, match="a plugin validator's bug"):
        config_settings.loads_settings("scheduler: {}\n")
