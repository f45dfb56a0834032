"""settings.yml values `balsam site check-settings` passed (or reported badly) in the audit of Dec 5:

- F1 ``transfers.service_period: 0`` made the transfers module cycle without pause (~490 GETs a
  second); the agent's loop now also refuses a period of 0 as it refuses NaN;
- F2 numbers past the API's integers (``max_nodes: 100000000000000000000``) passed, then the server
  refused every settings push, which the agent logged as "retried once the API answers";
- F3 a missing (or numeric) ``scheduler.job_template_path`` passed, then every BatchJob failed;
- F5 ``launcher.serial_mode_prefetch_per_rank`` 0 or negative was silently raised to the floor;
- F6 error lines echoed a 100,000-character value whole;
- F7 ``yes:``/``on:`` keys were reported as ``logging.True``; the Slurm plugin's option error
  spoke attrs' words (``'unlimited_window_min' must be >= 1: -1``);
- F8 warnings: a retry cap below the first backoff, a location no backend serves, no module enabled;
- F9 ``balsam site sync`` refusing a bad file did not say the running agent keeps its settings.
"""

from __future__ import annotations

import logging
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
from click.testing import CliRunner

from balsam.config import SettingsError, load_settings, loads_settings
from balsam.site.agent import Agent
from balsam.site.module import AgentModule


def _problems(text: str) -> list[str]:
    with pytest.raises(SettingsError) as caught:
        loads_settings(textwrap.dedent(text))
    return caught.value.errors


# -- F1 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "0.5", "-5"])
def test_transfers_service_period_below_one_second_is_refused(value: str) -> None:
    (line,) = _problems(f"transfers:\n  service_period: {value}\n")
    assert line.startswith("settings.yml:2 transfers.service_period: must be at least 1 (seconds), got "), line


class _PeriodZero(AgentModule):
    """A module whose period is 0 (settings that skipped the loader); the test stops the agent."""

    section = "period_zero"

    def __init__(self, agent_ref: list) -> None:
        super().__init__(None, None, None)
        self.agent_ref = agent_ref

    @property
    def period(self) -> float:
        return 0.0

    def run_cycle(self) -> Optional[float]:
        return None


def test_agent_loop_waits_the_default_period_for_a_period_of_zero(caplog: Any) -> None:
    ref: list = []
    module = _PeriodZero(ref)
    agent = Agent(SimpleNamespace(site_path="/nonexistent", site_id=1), client=object(), modules=[module])
    ref.append(agent)
    waits: list = []
    real_wait = agent.stop_event.wait

    def recording_wait(timeout: Optional[float] = None) -> bool:
        waits.append(timeout)
        agent.request_stop("test")
        return real_wait(0)

    agent.stop_event.wait = recording_wait  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="balsam.site.agent"):
        thread = threading.Thread(target=agent._module_loop, args=(module,))
        thread.start()
        thread.join(30)
    assert not thread.is_alive()
    assert waits == [AgentModule.default_period]
    assert [r for r in caplog.records if "cannot wait 0.0 s" in r.getMessage()]


# -- F2 ------------------------------------------------------------------------------------------


def test_min_nodes_past_32_bits_is_refused_without_the_cross_field_rule() -> None:
    from balsam.models import AllowedQueue

    # The server checks queues without min_nodes <= max_nodes (balsam.server.routes.sites._validate).
    queue = AllowedQueue(max_nodes=2**31 - 1, max_walltime=60, max_queued_jobs=5, min_nodes=2**31)
    assert queue.validate(cross_field=False) == {"min_nodes": "must be at most 2147483647, got 2147483648"}


@pytest.mark.parametrize("field", ["max_nodes", "max_walltime", "max_queued_jobs"])
def test_queue_limits_past_32_bits_are_refused(field: str) -> None:
    queue = {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 5}
    queue[field] = 100000000000000000000
    body = "".join(f"      {key}: {value}\n" for key, value in queue.items())
    problems = _problems(f"scheduler:\n  allowed_queues:\n    debug:\n{body}")
    assert any(f"scheduler.allowed_queues.debug.{field}: must be at most 2147483647, got 100000000000000000000"
               in line for line in problems), problems


def test_queue_limits_at_the_bound_pass_and_the_server_takes_them(balsam_env: Any, client: Any) -> None:
    from balsam.api import Site

    most = 2**31 - 1
    queue = {"max_nodes": most, "max_walltime": most, "max_queued_jobs": most, "min_nodes": most}
    settings = loads_settings(f"scheduler:\n  allowed_queues:\n    big: {queue}\n".replace("'", ""))
    assert settings.scheduler.allowed_queues["big"].max_nodes == most
    site = Site.objects.create(name="bound-site", path="/tmp/bound-site", allowed_queues={"big": queue})
    assert site.allowed_queues["big"].max_nodes == most


@pytest.mark.parametrize(
    "text, key, problem",
    [
        ("queue_maintainer:\n  num_queued_jobs: 100000000000000000000\n", "queue_maintainer.num_queued_jobs",
         "must be at most 2147483647, got 100000000000000000000"),
        ("processing:\n  num_workers: 100000\n", "processing.num_workers", "must be at most 1024, got 100000"),
        ("launcher:\n  max_concurrent_mpiruns: 10000000000000000000000\n", "launcher.max_concurrent_mpiruns",
         "must be at most 2147483647, got 10000000000000000000000"),
    ],
)
def test_counts_past_their_bounds_are_refused(text: str, key: str, problem: str) -> None:
    assert _problems(text) == [f"settings.yml:2 {key}: {problem}"]


def test_a_4xx_to_the_settings_push_is_a_settings_error_not_retried(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path, caplog: Any) -> None:
    import balsam.site.site_ops as site_ops
    from balsam.client.rest import APIError

    def refuse(client: Any, config: Any) -> dict:
        raise APIError("PUT", "/sites/7", 422, [{"loc": ["body", "allowed_queues", "q", "max_nodes"],
                                                 "msg": "integer out of the 64-bit range"}])

    monkeypatch.setattr(site_ops, "push_site_settings", refuse)
    config = SimpleNamespace(site_path=tmp_path, site_id=7, settings=SimpleNamespace())
    agent = Agent(config, client=object(), modules=[])
    with caplog.at_level(logging.INFO, logger="balsam.site.agent"):
        assert agent.push_settings() is False
    assert not agent.settings_push_pending  # not retried: the same values would be refused again
    records = [r for r in caplog.records if "push" in r.getMessage() or "settings" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.ERROR], [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert message.startswith("settings.yml error: the server refused its values") and "HTTP 422" in message
    assert "max_nodes" in message and "previous settings" in message and "retried" not in message


def test_an_outage_at_the_settings_push_is_still_retried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import balsam.site.site_ops as site_ops
    from balsam.client.rest import APIError

    def busy(client: Any, config: Any) -> dict:
        raise APIError("PUT", "/sites/7", 429, "rate limited")

    monkeypatch.setattr(site_ops, "push_site_settings", busy)
    agent = Agent(SimpleNamespace(site_path=tmp_path, site_id=7, settings=SimpleNamespace()), client=object(),
                  modules=[])
    assert agent.push_settings() is False and agent.settings_push_pending


# -- F3 ------------------------------------------------------------------------------------------


def _site_dir(tmp_path: Path, template_line: str) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / ".balsam-site").write_text("1\n")
    (site / "settings.yml").write_text(f"scheduler:\n  name: local\n{template_line}")
    return site


def test_a_missing_job_template_is_refused_in_a_site(tmp_path: Path) -> None:
    site = _site_dir(tmp_path, "  job_template_path: nosuch.sh\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(site / "settings.yml")
    assert caught.value.errors == [
        f"{site / 'settings.yml'}:3 scheduler.job_template_path: file not found: {site.absolute() / 'nosuch.sh'}"]


def test_a_job_template_in_the_site_passes(tmp_path: Path) -> None:
    site = _site_dir(tmp_path, "  job_template_path: custom.sh\n")
    (site / "custom.sh").write_text("#!/bin/bash\n")
    assert load_settings(site / "settings.yml").scheduler.job_template_path == "custom.sh"
    (site / "settings.yml").write_text(f"scheduler:\n  job_template_path: {site / 'custom.sh'}\n")
    load_settings(site / "settings.yml")  # an absolute path, as given


def test_a_loose_settings_file_has_its_template_checked_beside_it(tmp_path: Path) -> None:
    loose = tmp_path / "loose.yml"
    loose.write_text("scheduler:\n  job_template_path: other.sh\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(loose)
    assert caught.value.errors == [f"{loose}:2 scheduler.job_template_path: file not found: {tmp_path / 'other.sh'}"]
    # The default name (what `balsam site init` writes) is not checked: settings files are read
    # away from their site (a file to copy into one, one a program builds).
    loose.write_text("scheduler:\n  job_template_path: job-template.sh\n")
    load_settings(loose)


def test_a_numeric_job_template_path_is_refused() -> None:
    assert _problems("scheduler:\n  job_template_path: 5\n") == [
        "settings.yml:2 scheduler.job_template_path: expected a string (a file path), got 5"]


# -- F5 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1])
def test_serial_mode_prefetch_below_one_is_refused(value: int) -> None:
    assert _problems(f"launcher:\n  serial_mode_prefetch_per_rank: {value}\n") == [
        f"settings.yml:2 launcher.serial_mode_prefetch_per_rank: must be at least 1, got {value}"]


# -- F6 ------------------------------------------------------------------------------------------


def test_a_huge_value_is_shortened_in_the_error_line() -> None:
    (line,) = _problems("logging:\n  level: " + "A" * 100000 + "\n")
    assert line.startswith("settings.yml:2 logging.level: expected one of DEBUG")
    assert "..." in line and len(line) < 200, len(line)
    (line,) = _problems("processing:\n  num_workers: '" + "7" * 100000 + "'\n")
    assert "..." in line and len(line) < 200, len(line)
    # A section's own check echoing the value (a location URL) is cut too.
    (line,) = _problems("transfers:\n  transfer_locations:\n    aps: " + "x" * 100000 + "\n")
    assert line.startswith("settings.yml:3 transfers.transfer_locations.aps: ") and len(line) < 700, len(line)


# -- F7 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["yes", "on", "off"])
def test_a_key_yaml_reads_as_a_boolean_is_named_as_written(word: str) -> None:
    assert _problems(f"logging:\n  level: INFO\n  {word}: 1\n") == [
        f"settings.yml:3 logging.{word}: unknown key (YAML reads on/yes/no/off as true/false: quote the key)"]


def test_a_boolean_key_in_a_mapping_value_is_refused() -> None:
    (line,) = _problems("filter_tags:\n  on: x\n")
    assert line.startswith("settings.yml:2 filter_tags.on: a key read as true (YAML reads on/yes/no/off")


def test_slurm_option_error_in_the_house_style() -> None:
    assert _problems("scheduler:\n  name: slurm\n  options:\n    unlimited_window_min: -1\n") == [
        "settings.yml:4 scheduler.options.unlimited_window_min: must be at least 1, got -1"]


# -- F8 ------------------------------------------------------------------------------------------


def test_a_retry_cap_below_the_first_backoff_is_a_warning() -> None:
    settings = loads_settings("transfers:\n  retry_backoff_sec: 30\n  retry_backoff_max_sec: 1\n")
    assert settings.warnings == (
        "settings.yml:3 transfers.retry_backoff_max_sec: 1.0 is below retry_backoff_sec (30.0): every retry "
        "waits 1.0 s and retry_backoff_sec has no effect",)


def test_a_location_no_installed_backend_serves_is_a_warning() -> None:
    settings = loads_settings("transfers:\n  transfer_locations:\n    bucket: s3://bucket/x\n    here: local://\n")
    (warning,) = settings.warnings
    assert warning.startswith("settings.yml:3 transfers.transfer_locations.bucket: no installed transfer backend "
                              "serves s3:// (installed: "), warning
    assert settings.transfers.transfer_locations["bucket"] == "s3://bucket/x"  # still accepted


def test_no_enabled_agent_module_is_a_warning() -> None:
    (warning,) = loads_settings("logging:\n  level: INFO\n").warnings
    assert warning.startswith("settings.yml:1 (top level): no agent module is enabled: the agent will do nothing")
    assert not loads_settings("processing: {}\n").warnings


def test_an_agent_without_modules_says_it_will_do_nothing(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    config = SimpleNamespace(site_path="/nonexistent", site_id=1, settings=loads_settings("logging: {}\n"))
    agent = Agent(config, client=object())
    monkeypatch.setattr(Agent, "build_modules", lambda self: [])
    with caplog.at_level(logging.WARNING, logger="balsam.site.agent"):
        agent.start()
    try:
        assert [r for r in caplog.records if r.getMessage().startswith(
            "no agent module is enabled: the agent will do nothing")]
    finally:
        agent.shutdown("signal", join_timeout=10)


# -- F9 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("running, note", [
    (None, "(nothing was pushed; no site agent is running)"),
    (("HOST", 4242), "(nothing was pushed; the running site agent [pid 4242] keeps its current settings)"),
])
def test_sync_refusing_a_bad_file_says_what_the_agent_keeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            running: Any, note: str) -> None:
    import socket

    import balsam.site.agent as agent_module
    from balsam.cli.site_commands import sync

    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))  # no login: nothing could be pushed anyway
    site = _site_dir(tmp_path, "")
    (site / "settings.yml").write_text("transfers:\n  service_period: 0\n")
    if running is not None:
        running = (socket.gethostname(), running[1])
    monkeypatch.setattr(agent_module, "agent_running", lambda path: running)
    result = CliRunner().invoke(sync, [str(site)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {site / 'settings.yml'}:2 transfers.service_period: must be at least 1 (seconds), got 0.0 {note}")
