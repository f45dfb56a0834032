"""Settings and options that were accepted but silently did nothing (an audit of settings keys):
an unknown key of client.yml (a misspelt ``read_timout``) and 0.7's ``client_class``, and
``balsam job ls --by-state -n N`` (the counts per state ignored ``-n``)."""

from __future__ import annotations

import logging
import subprocess
import sys

import yaml
from click.testing import CliRunner


def _client_file(tmp_path, **extra):
    data = {"api_root": "http://127.0.0.1:9", "client_class": "balsam.client.RESTClient", "token": "t",
            "username": "u", "connect_timeout": 6.2, "read_timeout": 120.0, "retry_count": 10, **extra}
    path = tmp_path / "client.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _settings_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "balsam.client.settings" and r.levelno == logging.WARNING]


def test_client_yml_unknown_key_warns_once_with_did_you_mean(tmp_path, caplog) -> None:
    from balsam.client.settings import ClientSettings

    path = _client_file(tmp_path, read_timout=1)
    caplog.set_level(logging.WARNING)
    settings = ClientSettings.load(path)
    ClientSettings.load(path)  # every load: still one line per process
    assert settings.read_timeout == 120.0
    warned = _settings_warnings(caplog)
    assert len(warned) == 1, warned
    assert warned[0].startswith(f"{path}: unknown key 'read_timout'") and "did you mean 'read_timeout'?" in warned[0]


def test_client_yml_client_class_of_another_class_warns_once_that_it_is_ignored(tmp_path, caplog) -> None:
    from balsam.client import RESTClient
    from balsam.client.settings import ClientSettings

    path = _client_file(tmp_path, client_class="balsam.client.BasicAuthRequestsClient")
    caplog.set_level(logging.WARNING)
    client = ClientSettings.load_from_file(path).build_client()
    ClientSettings.load(path)
    assert type(client) is RESTClient
    warned = _settings_warnings(caplog)
    assert len(warned) == 1, warned
    assert "client_class 'balsam.client.BasicAuthRequestsClient' is ignored" in warned[0]
    assert "0.7 compatibility" in warned[0] and str(path) in warned[0]


def test_client_yml_as_written_by_login_loads_without_a_warning(tmp_path, caplog) -> None:
    from balsam.client.settings import ClientSettings

    caplog.set_level(logging.WARNING)
    written = ClientSettings(api_root="http://127.0.0.1:9", token="t", username="u").save(tmp_path / "written.yml")
    ClientSettings.load(written)
    ClientSettings.load(_client_file(tmp_path))
    assert _settings_warnings(caplog) == []


def test_client_yml_warning_reaches_a_commands_stderr(tmp_path) -> None:
    path = _client_file(tmp_path, read_timout=1)
    code = "from balsam.client.settings import ClientSettings as C; import sys; C.load(sys.argv[1]); C.load(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "read_timout" in line]
    assert len(lines) == 1 and "did you mean 'read_timeout'?" in lines[0], proc.stderr


def test_job_ls_by_state_with_num_is_refused(balsam_env, tmp_path, monkeypatch) -> None:
    from balsam._api.model import reset_default_client
    from balsam.api import ApplicationDefinition, Job, Site
    from balsam.cli import main

    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    reset_default_client()
    ApplicationDefinition.clear_cache()
    Site.objects.create(name="noop-site", path=str(tmp_path / "noop-site"))

    class Hello(ApplicationDefinition):
        site = "noop-site"
        command_template = "echo hi"

    Hello.sync()
    Job.objects.bulk_create([Job(f"w/{i}", Hello) for i in range(7)])
    runner = CliRunner()
    result = runner.invoke(main, ["job", "ls", "--by-state", "-n", "5"])
    assert result.exit_code == 2, result.output
    assert "--by-state and -n/--num do not go together" in result.output
    # Each alone still works.
    assert "Total: 7" in runner.invoke(main, ["job", "ls", "--by-state"], catch_exceptions=False).output
    listed = runner.invoke(main, ["job", "ls", "-n", "5"], catch_exceptions=False).output
    assert len([line for line in listed.splitlines() if " w/" in line]) == 5, listed
    reset_default_client()
    ApplicationDefinition.clear_cache()
