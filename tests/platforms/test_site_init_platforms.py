"""``balsam site init`` with the machine platforms: the picker offers every installed platform (a
third-party one included), the machine's queues, projects, optional params and job template are
written, and the guide's ``balsam queue submit`` works without editing settings.yml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from balsam.site.job_template import build_context, render_job_script


def balsam(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", "from balsam.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"balsam {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_every_installed_platform_is_offered_third_party_included() -> None:
    from balsam.site.site_ops import available_platforms

    platforms = available_platforms()
    assert {"default", "aurora", "sunspot"} <= set(platforms)
    # tests/fixtures/balsam-testplugin registers a platform through its own entry point: no core edit.
    assert "testplugin" in platforms
    assert "Intel GPUs" in platforms["aurora"]


def test_host_detection_proposes_the_machine() -> None:
    from balsam.site.site_ops import detect_platform

    assert detect_platform("aurora-uan-0009.hostmgmt1000.cm.aurora.alcf.anl.gov", {}) == "aurora"
    assert detect_platform("uan-0001.sunspot.alcf.anl.gov", {}) == "sunspot"
    assert detect_platform("my-laptop", {}) is None


def test_picker_lists_platforms_and_takes_the_choice(balsam_env, client, tmp_path: Path, monkeypatch) -> None:
    import balsam.cli.site_commands as site_commands
    from balsam.cli import main
    from balsam.site.site_ops import available_platforms

    monkeypatch.setattr(site_commands, "_interactive", lambda: True)
    names = list(available_platforms())
    choice = names.index("sunspot") + 1
    result = CliRunner().invoke(main, ["site", "init", str(tmp_path / "picked")], input=f"{choice}\npicked\nMyProj, Other\n")
    assert result.exit_code == 0, result.output
    for name in names:
        assert f") {name}" in result.output
    settings = yaml.safe_load((tmp_path / "picked" / "settings.yml").read_text())
    assert settings["launcher"]["platform"] == "sunspot"
    assert list(settings["scheduler"]["allowed_queues"]) == ["workq"]
    assert settings["scheduler"]["allowed_projects"] == ["MyProj", "Other"]  # asked, Aurora_deployment proposed
    assert "[Aurora_deployment]" in result.output


def test_aurora_site_runs_the_guides_commands_unedited(balsam_env, client, tmp_path: Path) -> None:
    path = tmp_path / "test_aurora"
    balsam("site", "init", "--platform", "aurora", "-n", "test_aurora", str(path))
    settings = yaml.safe_load((path / "settings.yml").read_text())
    scheduler = settings["scheduler"]
    assert scheduler["name"] == "pbs"
    assert scheduler["allowed_queues"]["debug-scaling"] == {"max_nodes": 31, "max_walltime": 60, "max_queued_jobs": 1}
    assert set(scheduler["allowed_queues"]) == {"debug", "debug-scaling", "prod"}
    assert scheduler["allowed_projects"] == ["Aurora_deployment"]
    assert scheduler["optional_batch_job_params"] == {"filesystems": "home:flare", "place": "scatter", "qsub_flags": ""}
    assert settings["launcher"]["serial_mode_startup_params"] == {"cpu-bind": "none"}

    # The guide's command, as written (project: the machine's default).
    balsam("queue", "submit", "-n", "2", "-t", "10", "-q", "debug-scaling", "-A", "Aurora_deployment", "-j", "mpi", cwd=path)
    (batch_job,) = client.get("/batch-jobs/", params={"site_id": int((path / ".balsam-site").read_text())})["results"]
    assert batch_job["queue"] == "debug-scaling" and batch_job["num_nodes"] == 2

    # The template the agent renders for it: PBS directives of Aurora, proxy, the launcher line.
    script = render_job_script((path / "job-template.sh").read_text(),
                               build_context(batch_job, path, default_optional_params=scheduler["optional_batch_job_params"],
                                             call_hook=False))
    for line in ("#PBS -l select=2\n", "#PBS -l walltime=00:10:00", "#PBS -l filesystems=home:flare",
                 "#PBS -l place=scatter", "#PBS -A Aurora_deployment", "#PBS -q debug-scaling",
                 "export HTTPS_PROXY=http://proxy.alcf.anl.gov:3128", f"export BALSAM_BATCH_JOB_ID={batch_job['id']}"):
        assert line in script, script
    assert "-m balsam.launcher -j mpi -t 8" in script
    # A queue the machine does not have is refused by name.
    proc = balsam("queue", "submit", "-n", "2", "-t", "10", "-q", "nope", "-A", "Aurora_deployment", "-j", "mpi",
                  cwd=path, check=False)
    assert proc.returncode != 0 and "nope" in proc.stderr


def test_project_option_and_scheduler_defaults_order(balsam_env, client, tmp_path: Path, monkeypatch) -> None:
    from balsam.plugins.manager import get_plugin_manager
    from balsam.site.site_ops import init_site

    # A scheduler's own site defaults come first; the platform's win over them.
    pbs = get_plugin_manager().load_driver("scheduler", "pbs")
    monkeypatch.setattr(pbs, "site_defaults", lambda self: {"scheduler": {
        "name": "pbs", "allowed_queues": {"workq": {"max_nodes": 4, "max_walltime": 30, "max_queued_jobs": 2}},
        "optional_batch_job_params": {"select": "", "filesystems": "home"}}}, raising=False)
    init_site(tmp_path / "a", "site-a", "aurora", client, projects=["MyAllocation"])
    settings = yaml.safe_load((tmp_path / "a" / "settings.yml").read_text())["scheduler"]
    assert settings["allowed_projects"] == ["MyAllocation"]
    assert set(settings["allowed_queues"]) == {"workq", "debug", "debug-scaling", "prod"}
    assert settings["optional_batch_job_params"] == {"select": "", "filesystems": "home:flare", "place": "scatter",
                                                      "qsub_flags": ""}
    # With the default platform the scheduler's defaults are what the site gets.
    init_site(tmp_path / "b", "site-b", "default", client, scheduler_name="pbs")
    settings = yaml.safe_load((tmp_path / "b" / "settings.yml").read_text())["scheduler"]
    assert "workq" in settings["allowed_queues"] and settings["optional_batch_job_params"]["filesystems"] == "home"


@pytest.mark.parametrize("platform", ["aurora", "sunspot"])
def test_platform_options_are_checked(platform: str) -> None:
    from balsam.options import OptionsError
    from balsam.plugins.manager import get_plugin_manager

    driver = get_plugin_manager().load_driver("platform", platform)
    with pytest.raises(OptionsError, match="cpu_idz"):
        driver(options={"cpu_idz": "0-3"})
    with pytest.raises(ValueError, match="cpu_ids"):
        driver(options={"cpu_ids": "7-3"})


@pytest.mark.parametrize("options,named", [({"cpu_idz": "0-3"}, "cpu_idz"), ({"cpu_ids": "9-1"}, "cpu_ids")])
def test_launcher_names_a_bad_platform_option_in_one_line(options, named, balsam_env, tmp_path: Path) -> None:
    import os
    import uuid

    from launcher_harness import make_site

    name = f"bad-{uuid.uuid4().hex[:6]}"
    path = make_site(tmp_path / name, name, {"platform": "aurora", "platform_options": options})
    nodefile = tmp_path / "nodes"
    nodefile.write_text("x1000c0s0b0n0\n")
    proc = subprocess.run([sys.executable, "-m", "balsam.launcher", "-j", "mpi", "-t", "1"], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "BALSAM_SITE_PATH": str(path), "PBS_NODEFILE": str(nodefile)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "settings.yml" in line and f"platform_options.{named}" in line


def test_picker_proposes_the_recognised_machine(balsam_env, client, tmp_path: Path, monkeypatch) -> None:
    import socket

    import balsam.cli.site_commands as site_commands
    from balsam.cli import main

    monkeypatch.setattr(site_commands, "_interactive", lambda: True)
    monkeypatch.setattr(socket, "getfqdn", lambda *a: "aurora-uan-0010.hostmgmt1000.cm.aurora.alcf.anl.gov")
    # Enter three times: the proposed platform, name and projects.
    result = CliRunner().invoke(main, ["site", "init", str(tmp_path / "on-aurora")], input="\n\n\n")
    assert result.exit_code == 0, result.output
    assert [line for line in result.output.splitlines() if "(this host)" in line][0].split()[1] == "aurora"
    assert yaml.safe_load((tmp_path / "on-aurora" / "settings.yml").read_text())["launcher"]["platform"] == "aurora"
    # Outside a terminal the recognised machine is taken without asking.
    monkeypatch.setattr(site_commands, "_interactive", lambda: False)
    result = CliRunner().invoke(main, ["site", "init", str(tmp_path / "batch")])
    assert result.exit_code == 0 and "platform aurora" in result.output
