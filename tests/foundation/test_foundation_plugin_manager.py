"""Plugin discovery through real package metadata (the balsam-testplugin distribution is installed)."""

from __future__ import annotations

import importlib.metadata
import json

import attrs
import pytest

from balsam.builtin.default_platform import DefaultPlatform
from balsam.builtin.local_scheduler import LocalScheduler
from balsam.plugins import hookimpl
from balsam.plugins.manager import (
    DRIVER_GROUPS,
    PluginError,
    PluginManager,
    get_plugin_manager,
    reset_plugin_manager,
)

from foundation_helpers import run_balsam, run_python


def rows_by(rows, kind, name):
    return [r for r in rows if r["kind"] == kind and r["name"] == name]


def test_testplugin_is_a_really_installed_distribution():
    dist = importlib.metadata.distribution("balsam-testplugin")
    groups = {ep.group for ep in dist.entry_points}
    assert {"balsam.plugins", "balsam.schedulers", "balsam.platforms"} <= groups


def test_builtin_drivers_come_from_entry_points(fresh_plugins):
    pm = PluginManager(autoload=False)
    assert pm.load_driver("scheduler", "local") is LocalScheduler
    assert pm.load_driver("platform", "default") is DefaultPlatform
    local = pm.list_drivers("scheduler")["local"]
    assert local.distribution == "balsam"
    assert local.source == "entry point balsam.schedulers"
    assert local.target == "balsam.builtin.local_scheduler:LocalScheduler"
    # The core hook plugin is an entry point of balsam.plugins too.
    core = [r for r in pm.records() if r.kind == "plugin" and r.name == "core"][0]
    assert core.status == "ok" and core.distribution == "balsam"


def test_third_party_drivers_resolved_through_metadata(fresh_plugins):
    pm = PluginManager(allowed=["balsam-testplugin"])
    from balsam_testplugin.drivers import TestPluginPlatform, TestPluginScheduler

    assert pm.load_driver("scheduler", "testplugin") is TestPluginScheduler
    assert pm.load_driver("platform", "testplugin") is TestPluginPlatform
    row = rows_by(pm.report(), "scheduler", "testplugin")[0]
    assert row == {
        "kind": "scheduler",
        "name": "testplugin",
        "distribution": "balsam-testplugin",
        "version": "0.1.0",
        "status": "ok",
        "error": "",
    }


def test_stevedore_imports_from_the_one_scan_without_scanning_again(fresh_plugins, monkeypatch):
    import stevedore._cache

    def second_scan(*_args, **_kwargs):
        raise AssertionError("stevedore scanned the installed distributions a second time")

    monkeypatch.setattr(stevedore._cache, "get_group_all", second_scan)
    pm = PluginManager()
    assert pm.load_driver("scheduler", "local") is LocalScheduler
    assert pm.load_driver("scheduler", "testplugin").__name__ == "TestPluginScheduler"
    assert any(r.kind == "plugin" and r.status == "ok" for r in pm.records())  # hook modules loaded too
    assert {ep.name for ep in stevedore.ExtensionManager.ENTRY_POINT_CACHE["balsam.schedulers"]} >= {"local", "testplugin"}


def test_third_party_transfer_driver_from_its_entry_point(fresh_plugins):
    pm = PluginManager(allowed=["testplugin"])
    from balsam_testplugin.drivers import CopyTransfer

    assert pm.load_driver("transfer", "testplugin-copy") is CopyTransfer
    record = pm.list_drivers("transfer")["testplugin-copy"]
    assert record.source == "entry point balsam.transfers"
    assert record.distribution == "balsam-testplugin"
    assert record.description == "copies files locally"


def test_name_conflict_between_distributions_is_reported_and_first_wins(fresh_plugins, monkeypatch):
    from balsam.plugins import registry
    from balsam.plugins.discovery import EntryPointInfo

    real = registry.list_entry_points

    def with_a_copycat(group):
        found = real(group)
        if group == "balsam.schedulers":
            found.append(EntryPointInfo(group=group, name="local", value="copycat:LocalScheduler",
                                        distribution="balsam-copycat", version="1.0", location=""))
        return found

    monkeypatch.setattr(registry, "list_entry_points", with_a_copycat)
    pm = PluginManager(autoload=True)
    assert pm.load_driver("scheduler", "local") is LocalScheduler
    conflicts = [r for r in pm.report() if r["status"] == "conflict"]
    assert len(conflicts) == 1 and conflicts[0]["distribution"] == "balsam-copycat"
    assert conflicts[0]["error"] == ("scheduler name 'local' is already taken by balsam "
                                     "(balsam.builtin.local_scheduler:LocalScheduler); the first one wins")


def test_retired_register_drivers_hook_is_refused_with_its_replacement(fresh_plugins):
    pm = PluginManager(autoload=False)

    class Old:
        @hookimpl
        def balsam_register_drivers(self, register):
            register("scheduler", "x", object)

    with pytest.raises(PluginError, match="implements the retired hook 'balsam_register_drivers': drivers come from "
                                          "their entry-point groups only"):
        pm.add_plugin(Old(), name="old")
    assert "old" not in [r["name"] for r in pm.report()]


def test_unknown_driver_error_is_one_line_with_suggestion(fresh_plugins):
    pm = PluginManager()
    with pytest.raises(PluginError) as info:
        pm.load_driver("scheduler", "slrum")
    message = str(info.value)
    assert "\n" not in message
    available = ", ".join(sorted(pm.list_drivers("scheduler", resolve=False)))
    assert message == f"unknown scheduler 'slrum' (available: {available}; did you mean 'slurm'?)"
    with pytest.raises(PluginError, match=r"unknown driver kind 'schedulers'.*did you mean 'scheduler'"):
        pm.load_driver("schedulers", "local")


def test_broken_plugin_is_reported_not_raised():
    result = run_balsam("plugins", "ls", "--json", env={"BALSAM_TESTPLUGIN_FAULTS": "broken"})
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    hook_row = rows_by(rows, "plugin", "testplugin_faults")[0]
    assert hook_row["status"] == "failed"
    assert "asked to break" in hook_row["error"]
    driver_row = rows_by(rows, "platform", "testplugin_broken")[0]
    assert driver_row["status"] == "failed"
    assert driver_row["error"] == "ModuleNotFoundError: No module named 'balsam_testplugin_missing_dependency'"
    # Everything else still works.
    assert rows_by(rows, "scheduler", "local")[0]["status"] == "ok"
    assert rows_by(rows, "plugin", "testplugin")[0]["status"] == "ok"
    # Asking for the broken driver names the load error in one line.
    code = (
        "from balsam.plugins.manager import get_plugin_manager, PluginError\n"
        "try:\n    get_plugin_manager().load_driver('platform', 'testplugin_broken')\n"
        "except PluginError as e:\n    print(e)\n"
    )
    out = run_python(code, env={"BALSAM_TESTPLUGIN_FAULTS": "broken"})
    assert out.stdout.strip() == (
        "platform 'testplugin_broken' from balsam-testplugin could not be loaded "
        "(balsam_testplugin.broken_driver:BrokenPlatform): "
        "ModuleNotFoundError: No module named 'balsam_testplugin_missing_dependency'"
    )


def test_misspelt_hook_fails_at_startup():
    result = run_balsam("plugins", "ls", env={"BALSAM_TESTPLUGIN_FAULTS": "misspelt"})
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == (
        "Error: plugin 'testplugin_faults' implements unknown hook 'balsam_cli_comands' "
        "(did you mean 'balsam_cli_commands'?)"
    )
    # The same plugin switched off by the allow-list does not stop anything.
    ok = run_balsam("plugins", "ls", env={"BALSAM_TESTPLUGIN_FAULTS": "misspelt", "BALSAM_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert ok.returncode == 0, ok.stderr


def test_misspelt_hook_in_process_plugin_is_refused(fresh_plugins):
    pm = PluginManager(autoload=False)

    class Misspelt:
        @hookimpl
        def balsam_launch_enviroment(self, job, env, node_hostnames):
            pass

    with pytest.raises(PluginError, match="unknown hook 'balsam_launch_enviroment'.*balsam_launch_environment"):
        pm.add_plugin(Misspelt(), name="misspelt")
    assert "misspelt" not in [r["name"] for r in pm.report()]


def test_allow_list_by_entry_point_or_distribution_name(fresh_plugins):
    pm = PluginManager(allowed=["testplugin"])
    rows = pm.report()
    assert rows_by(rows, "scheduler", "testplugin")[0]["status"] == "ok"
    # A name selects the whole distribution: its other entry points load too.
    assert rows_by(rows, "platform", "testplugin_broken")[0]["status"] == "ok"
    slurm = rows_by(rows, "scheduler", "slurm")
    if slurm:  # the slurm plugin distribution, when installed, is switched off
        assert slurm[0]["status"] == "disabled"
        with pytest.raises(PluginError, match="comes from distribution 'balsam-scheduler-slurm', which is not enabled"):
            pm.load_driver("scheduler", "slurm")
    # Built-ins always load.
    assert rows_by(rows, "scheduler", "local")[0]["status"] == "ok"

    by_dist = PluginManager(allowed=["balsam-testplugin"])
    assert rows_by(by_dist.report(), "plugin", "testplugin")[0]["status"] == "ok"


def test_allow_list_name_matching_nothing_is_reported(fresh_plugins):
    pm = PluginManager(allowed=["testplugn"])
    row = rows_by(pm.report(), "plugin", "testplugn")[0]
    assert row["status"] == "missing"
    assert "did you mean 'testplugin'" in row["error"]


def test_allow_list_from_environment(fresh_plugins, monkeypatch):
    monkeypatch.setenv("BALSAM_PLUGINS", "testplugin")
    rows = get_plugin_manager().report()
    assert rows_by(rows, "plugin", "testplugin")[0]["status"] == "ok"
    assert all(r["status"] == "disabled" for r in rows if r["distribution"] == "balsam-test-agent-module")


def test_disable_autoload_keeps_builtins_only(fresh_plugins, monkeypatch):
    monkeypatch.setenv("BALSAM_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = get_plugin_manager()
    rows = pm.report()
    third_party = [r for r in rows if r["distribution"] not in ("balsam", "")]
    assert third_party and all(r["status"] == "disabled" for r in third_party)
    assert all(r["error"] == "BALSAM_DISABLE_PLUGIN_AUTOLOAD is set" for r in third_party)
    assert pm.load_driver("scheduler", "local") is LocalScheduler
    # An explicit BALSAM_PLUGINS still enables a plugin (like pytest -p).
    monkeypatch.setenv("BALSAM_PLUGINS", "testplugin")
    reset_plugin_manager()
    assert rows_by(get_plugin_manager().report(), "plugin", "testplugin")[0]["status"] == "ok"


def test_process_wide_manager_is_loaded_once(fresh_plugins):
    first = get_plugin_manager()
    assert get_plugin_manager() is first
    reset_plugin_manager()
    assert get_plugin_manager() is not first


def test_every_kind_has_its_group():
    assert DRIVER_GROUPS == {
        "scheduler": "balsam.schedulers",
        "platform": "balsam.platforms",
        "transfer": "balsam.transfers",
        "job_mode": "balsam.job_modes",
        "agent_module": "balsam.agent_modules",
    }


def test_agent_module_options_schema_is_its_settings_section(fresh_plugins, tmp_path):
    from balsam.config import load_settings, render_sample_settings, section_specs

    sample = render_sample_settings()
    assert "# (section of an agent module from the 'balsam-testplugin' distribution)" in sample
    assert "testplugin: null\n# To enable it, replace the line above with (values shown are the defaults):\n" \
        "# testplugin:\n#   # What `balsam testplugin hello` says.\n#   greeting: hello" in sample
    path = tmp_path / "settings.yml"
    path.write_text("testplugin:\n  greeting: hi\n  repeat: 3\n")
    settings = load_settings(path)
    assert settings.testplugin.greeting == "hi"
    assert settings.sections["testplugin"].repeat == 3
    path.write_text("testplugin:\n  repeat: many\n")
    with pytest.raises(Exception) as info:
        load_settings(path)
    assert str(info.value) == f"{path}:2 testplugin.repeat: expected an integer, got 'many'"
    spec = {s.key: s for s in section_specs()}["testplugin"]
    assert spec.plugin == "balsam-testplugin" and attrs.has(spec.schema) and spec.disableable


def test_agent_module_named_like_a_core_section_is_reported(fresh_plugins):
    from balsam.config import LauncherSettings, Settings, section_specs
    from balsam.plugins.manager import PluginRecord

    pm = get_plugin_manager()
    record = PluginRecord(kind="agent_module", name="launcher", distribution="balsam-bad", status="ok",
                          obj=pm.load_driver("agent_module", "scheduler"))
    assert pm.drivers.claim(record)
    assert [s.key for s in section_specs()].count("launcher") == 1
    assert isinstance(Settings().launcher, LauncherSettings)
    assert record.error == "agent module name 'launcher' is a core settings section: the module is never enabled"


def test_retired_settings_sections_hook_is_refused_with_its_replacement(fresh_plugins):
    class OldPlugin:
        @hookimpl
        def balsam_settings_sections(self, register):
            register("old", object)

    pm = get_plugin_manager()
    with pytest.raises(PluginError, match="implements the retired hook 'balsam_settings_sections': a settings.yml "
                                          "section is an agent module's options_schema"):
        pm.add_plugin(OldPlugin(), name="old")


def test_plugins_ls_lists_builtin_drivers():
    result = run_balsam("plugins", "ls")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "DISTRIBUTION", "VERSION", "STATUS", "ERROR"]
    table = [line.split()[:5] for line in lines[1:]]
    assert ["scheduler", "local", "balsam", "0.8.0", "ok"] in table
    assert ["platform", "default", "balsam", "0.8.0", "ok"] in table
    assert ["plugin", "core", "balsam", "0.8.0", "ok"] in table


def test_plugins_show_names_hooks_section_and_origin():
    result = run_balsam("plugins", "show", "testplugin")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "plugin testplugin" in out
    assert "hooks: balsam_agent_started, balsam_agent_stopping, balsam_cli_commands" in out
    assert "agent_module testplugin\n" in out and "  settings section: testplugin\n" in out
    assert "  options (the testplugin section):\n    greeting (default 'hello'): What `balsam testplugin hello` says." in out
    assert "commands: testplugin" in out
    assert "loaded from: " in out and "balsam_testplugin/hooks.py" in out
    module = run_balsam("plugins", "show", "queue_maintainer")
    assert "settings section: queue_maintainer" in module.stdout
    assert "    num_queued_jobs (default 5): BatchJobs kept queued or running at all times." in module.stdout
    missing = run_balsam("plugins", "show", "testplugn")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "Error: no plugin, driver or distribution named 'testplugn' (did you mean 'testplugin'?)"


def test_enabled_section_of_an_agent_module_that_cannot_load_is_an_error(fresh_plugins):
    from balsam.config import SettingsError, loads_settings, render_sample_settings
    from balsam.plugins.manager import PluginRecord

    pm = get_plugin_manager()
    record = PluginRecord(kind="agent_module", name="watcher", distribution="balsam-watcher", status="failed",
                          error="ModuleNotFoundError: No module named 'watcher'")
    assert pm.drivers.claim(record)
    with pytest.raises(SettingsError) as info:
        loads_settings("processing: {}\nwatcher:\n  period: 5\n")
    assert str(info.value) == (
        "settings.yml:2 watcher: the agent module 'watcher' from balsam-watcher cannot be loaded "
        "(ModuleNotFoundError: No module named 'watcher'); fix or uninstall it, or set this section to null"
    )
    assert loads_settings("watcher: null\n").sections["watcher"] is None
    assert "# (the agent module 'watcher' cannot be loaded: ModuleNotFoundError: No module named 'watcher')\n" \
           "watcher: null\n" in render_sample_settings()
