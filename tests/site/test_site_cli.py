"""``balsam site init|start|stop|sync|ls|rm|mv|rename`` through the real CLI and a real server."""

from __future__ import annotations

import select
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from balsam.site.agent import read_pid_file
from site_test_utils import wait_for


def balsam(*args: str, cwd: Path | None = None, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", "from balsam.cli import main; main()", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd, input=input,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"balsam {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def sites_by_name(client) -> dict:
    return {s["name"]: s for s in client.get("/sites/")["results"]}


def test_init_creates_the_site_and_registers_it(balsam_env, client, tmp_path) -> None:
    path = tmp_path / "my-site"
    out = balsam("site", "init", str(path), "-n", "my-site", "--platform", "default").stdout
    assert f"New Balsam site 'my-site'" in out and str(path) in out
    for sub in ("data", "log", "qsubmit"):
        assert (path / sub).is_dir()
    assert stat.S_IMODE((path / "settings.yml").stat().st_mode) == 0o600
    assert stat.S_IMODE((path / "job-template.sh").stat().st_mode) == 0o700
    assert stat.S_IMODE((path / ".balsam-site").stat().st_mode) == 0o440
    settings_text = (path / "settings.yml").read_text()
    assert "# " in settings_text  # commented
    settings = yaml.safe_load(settings_text)
    assert settings["launcher"]["platform"] == "default" and settings["scheduler"]["name"] == "local"
    site = sites_by_name(client)["my-site"]
    assert int((path / ".balsam-site").read_text()) == site["id"]
    assert site["path"] == str(path.resolve())
    assert site["allowed_projects"] == ["local"]
    assert site["allowed_queues"]["local"]["max_nodes"] == 1
    assert "BALSAM_BATCH_JOB_ID" in (path / "job-template.sh").read_text()


def test_init_refusals_roll_back_everything(balsam_env, client, tmp_path) -> None:
    balsam("site", "init", str(tmp_path / "first"), "-n", "taken", "--platform", "default")
    before = sites_by_name(client)
    # the name is taken: the server refuses, the new directory disappears
    proc = balsam("site", "init", str(tmp_path / "second"), "-n", "taken", "--platform", "default", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("Error:") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "second").exists()
    assert sites_by_name(client) == before
    # an existing directory is never touched
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    proc = balsam("site", "init", str(tmp_path / "busy"), "-n", "busy", "--platform", "default", check=False)
    assert proc.returncode == 1 and "already exists" in proc.stderr
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    # an unknown platform is named, with what exists
    proc = balsam("site", "init", str(tmp_path / "third"), "-n", "third", "--platform", "defualt", check=False)
    assert proc.returncode == 1 and "defualt" in proc.stderr and "default" in proc.stderr
    assert not (tmp_path / "third").exists()
    assert "third" not in sites_by_name(client)


def test_hook_balsam_site_initialized(balsam_env, client, tmp_path) -> None:
    from balsam.plugins.hookspecs import hookimpl
    from balsam.plugins.manager import get_plugin_manager
    from balsam.site.site_ops import init_site

    calls = []

    class Helper:
        @hookimpl
        def balsam_site_initialized(self, site_path, settings, site_id):
            calls.append((site_path, settings.scheduler.name, site_id))
            (site_path / "helper.sh").write_text("#!/bin/bash\necho helper\n")

    pm = get_plugin_manager()
    pm.add_plugin(Helper(), name="test-site-helper")
    site_id = init_site(tmp_path / "hooked", "hooked", "default", client)
    assert calls == [((tmp_path / "hooked").resolve(), "local", site_id)]
    assert (tmp_path / "hooked" / "helper.sh").exists()

    class Refuser:
        @hookimpl
        def balsam_site_initialized(self, site_path, settings, site_id):
            raise RuntimeError("this plugin refuses the site")

    pm.add_plugin(Refuser(), name="test-site-refuser")
    with pytest.raises(RuntimeError, match="refuses the site"):
        init_site(tmp_path / "refused", "refused", "default", client)
    assert not (tmp_path / "refused").exists()
    assert "refused" not in sites_by_name(client)  # the API record was deleted too


def test_ls_rename_mv_rm(balsam_env, client, tmp_path) -> None:
    path = tmp_path / "alpha"
    balsam("site", "init", str(path), "-n", "alpha", "--platform", "default")
    site_id = sites_by_name(client)["alpha"]["id"]
    out = balsam("site", "ls").stdout.splitlines()
    assert out[0].split() == ["ID", "Name", "Path", "Active"]
    row = next(line for line in out if line.split()[1] == "alpha")
    assert row.split()[0] == str(site_id) and row.split()[-1] in ("Yes", "No")
    verbose = balsam("site", "ls", "-v").stdout
    assert "allowed_queues:" in verbose and "backfill_windows:" in verbose

    balsam("site", "rename", str(path), "beta")
    assert sites_by_name(client)["beta"]["id"] == site_id

    dest = tmp_path / "moved"
    balsam("site", "mv", str(path), str(dest))
    assert not path.exists() and (dest / ".balsam-site").exists()
    assert client.get(f"/sites/{site_id}")["path"] == str(dest)

    proc = balsam("site", "rm", str(dest), input="n\n", check=False)
    assert proc.returncode == 1 and "destroy beta" in proc.stdout and dest.exists()
    balsam("site", "rm", str(dest), "-y")
    assert not dest.exists() and "beta" not in sites_by_name(client)

    balsam("site", "init", str(tmp_path / "gamma"), "-n", "gamma", "--platform", "default")
    balsam("site", "rm", str(tmp_path / "gamma"), "--force")
    assert "gamma" not in sites_by_name(client) and (tmp_path / "gamma").exists()


def test_orphan_section_is_refused_by_init_sync_and_agent_start(balsam_env, client, tmp_path, capsys) -> None:
    path = tmp_path / "orphan"
    balsam("site", "init", str(path), "-n", "orphan", "--platform", "default")
    text = (path / "settings.yml").read_text()
    # A new site only has the sections of installed modules.
    from balsam.config import section_specs

    installed = [spec.key for spec in section_specs()]
    assert [line.split(":")[0] for line in text.splitlines() if line[:1].isalpha()] == installed
    lines = text.rstrip("\n").splitlines()
    (path / "settings.yml").write_text("\n".join(lines + ["nightly_report:", "  max_files: 4"]) + "\n")
    where = f"{path / 'settings.yml'}:{len(lines) + 1} nightly_report: no installed agent module consumes this section"
    proc = balsam("site", "sync", str(path), check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(f"Error: {where}"), proc.stderr
    proc = balsam("site", "check-settings", str(path), check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(f"Error: {where}"), proc.stderr
    from balsam.site.agent import main as agent_main

    assert agent_main([str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"Error: {where}")
    assert read_pid_file(path) is None
    # Disabled, it is no problem.
    (path / "settings.yml").write_text("\n".join(lines + ["nightly_report: null"]) + "\n")
    assert "OK (sections in effect:" in balsam("site", "check-settings", str(path)).stdout


@pytest.mark.slow
def test_start_stop_sync(balsam_env, client, tmp_path) -> None:
    path = tmp_path / "daemon"
    balsam("site", "init", str(path), "-n", "daemon", "--platform", "default")
    try:
        out = balsam("site", "start", cwd=path).stdout
        host, pid = read_pid_file(path)
        assert host == socket.gethostname() and f"[pid {pid}]" in out
        assert "already running" in balsam("site", "start", str(path), check=False).stderr
        # the scheduler module refreshes the site: it becomes active
        wait_for(lambda: "Yes" in [l.split()[-1] for l in balsam("site", "ls").stdout.splitlines()[1:]
                                   if l.split()[1] == "daemon"], timeout=30, what="the site to be active")

        settings = yaml.safe_load((path / "settings.yml").read_text())
        settings["scheduler"]["allowed_queues"]["debug"] = {"max_nodes": 2, "max_walltime": 30, "max_queued_jobs": 1}
        settings["scheduler"]["allowed_projects"] = ["local", "chem"]
        (path / "settings.yml").write_text(yaml.safe_dump(settings))
        out = balsam("site", "sync", str(path)).stdout
        assert "Updated site" in out and "Restarting the site agent" in out
        site = client.get(f"/sites/{int((path / '.balsam-site').read_text())}")
        assert site["allowed_queues"]["debug"] == {"max_nodes": 2, "max_walltime": 30, "max_queued_jobs": 1}
        assert site["allowed_projects"] == ["local", "chem"]
        new_host, new_pid = read_pid_file(path)
        assert new_pid != pid

        proc = balsam("site", "stop", cwd=path)
        assert f"Site agent [pid {new_pid}] shutdown OK" in proc.stdout
        assert read_pid_file(path) is None
        assert "not running" in balsam("site", "stop", str(path)).stdout
    finally:
        balsam("site", "stop", str(path), "--force", check=False)


def test_init_asks_for_platform_and_name_in_a_terminal(balsam_env, client, tmp_path) -> None:
    import os
    import pty

    path = tmp_path / "asked"
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", "from balsam.cli import main; main()", "site", "init", str(path)],
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    from balsam.site.site_ops import available_platforms

    choice = list(available_platforms()).index("default") + 1
    # platform, site name, projects (empty: the platform's proposal)
    os.write(master, f"{choice}\nasked-site\n\n".encode())
    output = b""
    deadline = time.monotonic() + 60  # a prompt nobody answers must fail the test, not hang it
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    else:
        proc.kill()
    assert proc.wait(timeout=60) == 0, output.decode(errors="replace")
    os.close(master)
    text = output.decode(errors="replace")
    assert "Select the platform of this machine:" in text and "default" in text
    assert "Site name [asked]:" in text
    assert sites_by_name(client)["asked-site"]["path"] == str(path.resolve())


def test_start_reports_a_bad_settings_file_in_one_line(balsam_env, client, tmp_path) -> None:
    path = tmp_path / "bad-settings"
    balsam("site", "init", str(path), "-n", "bad-settings", "--platform", "default")
    settings = path / "settings.yml"
    lines = settings.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.strip().startswith("max_nodes:"))
    lines[index] = lines[index].split(":")[0] + ": two"
    settings.write_text("\n".join(lines) + "\n")
    proc = balsam("site", "start", str(path), check=False)
    assert proc.returncode == 1
    error = proc.stderr.strip()
    assert len(error.splitlines()) == 1
    assert f"settings.yml:{index + 1} scheduler.allowed_queues.local.max_nodes: expected an integer, got 'two'" in error
    assert read_pid_file(path) is None


def test_start_refuses_a_site_whose_record_is_gone(balsam_env, client, tmp_path) -> None:
    """After `site rm --force` (or a reset server database) the agent logged HTTP 404 every second forever."""
    path = tmp_path / "gone"
    balsam("site", "init", str(path), "-n", "gone", "--platform", "default")
    site_id = int((path / ".balsam-site").read_text())
    balsam("site", "rm", str(path), "--force")
    proc = balsam("site", "start", str(path), check=False)
    assert proc.returncode == 1, proc.stdout
    error = proc.stderr.strip()
    assert len(error.splitlines()) == 1 and "Started" not in proc.stdout
    assert error.startswith(f"Error: site {site_id} ({path}) is not on the server {balsam_env.url}")
    assert "`balsam site init NEW_DIR`" in error
    assert read_pid_file(path) is None and not (path / "log" / "agent-console.out").exists()


def test_init_quotes_the_next_command_and_drops_empty_projects(balsam_env, client, tmp_path) -> None:
    import shlex

    path = tmp_path / "with space"
    out = balsam("site", "init", str(path), "-n", "spaced", "--platform", "default", "-A", "", "-A", " ").stdout
    assert f"Next: cd {shlex.quote(str(path))} && balsam site start" in out  # it pasted as `cd /tmp/with` + `space`
    site = sites_by_name(client)["spaced"]
    assert "" not in site["allowed_projects"] and site["allowed_projects"] == ["local"]  # -A "" stored ['']
    assert yaml.safe_load((path / "settings.yml").read_text())["scheduler"]["allowed_projects"] == ["local"]
