"""Platform options that go to the MPI launcher as they are (``cpu_bind`` to PALS ``--cpu-bind``,
``hyperthread_offset`` into the binding, ``cpu_affinity`` to aprun ``-cc``) and ``gpu_cpus``
entries are checked when settings.yml is read: a bad value is one error line naming the file, line
and key, where before it passed ``balsam site check-settings`` and every job failed at its start.
The bindings the platforms compute and their docs' examples pass. ``serial_mode_startup_params``
values the platform's launcher does not document are a warning (the file still loads)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from balsam.cli import main
from balsam.config.settings import SettingsError, loads_settings
from balsam.platform import LaunchSpec
from balsam.plugins.manager import get_plugin_manager


def _settings(platform: str, options: str = "", startup: str = ""):
    """``launcher`` settings for ``platform``: the option lines go on lines 4 and on, the startup
    params after them."""
    text = f"launcher:\n  platform: {platform}\n  platform_options:\n{options or '    {}'}\n"
    if startup:
        text += f"  serial_mode_startup_params:\n{startup}\n"
    return loads_settings(text, only=["launcher"])


def _refused(platform: str, key: str, value: "str | int") -> str:
    with pytest.raises(SettingsError) as caught:
        _settings(platform, f"    {key}: {value!r}")
    (line,) = str(caught.value).strip().splitlines()
    assert f"settings.yml:4 launcher.platform_options.{key}: " in line, line
    return line


BAD_BINDINGS = ["sideways", "Depth", "core:2", "list:", "list:1-8::9-16", "list:8-1", "list:1-8;9-16", "list:a-b"]


@pytest.mark.parametrize("platform", ["polaris", "aurora", "sunspot"])
@pytest.mark.parametrize("value", BAD_BINDINGS)
def test_a_cpu_bind_pals_refuses_is_one_line_naming_the_key(platform: str, value: str) -> None:
    line = _refused(platform, "cpu_bind", value)
    assert repr(value) in line


@pytest.mark.parametrize("platform,value", [("polaris", -32), ("aurora", -104), ("sunspot", -1)])
def test_a_negative_hyperthread_offset_is_refused(platform: str, value: int) -> None:
    assert "must be 0 or more, got -" in _refused(platform, "hyperthread_offset", value)


@pytest.mark.parametrize("platform,value,named", [
    ("polaris", "9:0-7", "GPU 9 is not in gpu_ids (3, 2, 1, 0)"),
    ("polaris", "3:0-7 2:8-15 1:16-23 4:24-31", "GPU 4"),
    ("aurora", "0,1,2:1-51 3,4,9:53-103", "GPU 9 is not one of the node's GPUs (0 ... 5"),
    ("aurora", "6.0:1-51", "GPU 6.0"),
])
def test_gpu_cpus_naming_a_gpu_the_node_lacks_is_refused(platform: str, value: str, named: str) -> None:
    assert named in _refused(platform, "gpu_cpus", value)


def test_a_gpu_cpus_gpu_is_checked_against_the_gpu_ids_set_beside_it() -> None:
    _settings("polaris", "    gpu_ids: 0,1\n    gpu_cpus: 0:0-15 1:16-31")
    _settings("aurora", "    tiles_per_gpu: 1\n    gpu_cpus: 0,1,2:1-51 3,4,5:53-103")
    _settings("aurora", "    gpus_per_node: 2\n    gpu_cpus: 0.0,0.1:1-51 1:53-103")
    with pytest.raises(SettingsError, match=r"settings.yml:5 launcher.platform_options.gpu_cpus: GPU 2 is not in"):
        _settings("polaris", "    gpu_ids: 0,1\n    gpu_cpus: 0:0-15 2:16-31")


def test_an_aprun_cc_theta_refuses_is_one_line_naming_the_key() -> None:
    line = _refused("theta-knl", "cpu_affinity", "sideways")
    assert "aprun -cc" in line
    for value in ("depth", "cpu", "numa_node", "none", "0-3,8", "0,1:2,3", "0,x"):
        _settings("theta-knl", f"    cpu_affinity: '{value}'")


# The forms the docs show (docs/platforms/polaris.md, aurora.md, ALCF's lines) and PALS' kinds.
DOCUMENTED = ["", "none", "core", "depth", "numa", "list:0-1:8-9", "list:0-1,32-33:2-3,34-35", "list:1-8:9-16",
              "list:1-4,105-108:5-8,109-112", "list:1:2:3:53:54:55", "list:0-7:8-15:16-23:24-31", "list:1-51,53-103"]


@pytest.mark.parametrize("platform", ["polaris", "aurora"])
@pytest.mark.parametrize("value", DOCUMENTED)
def test_documented_bindings_pass(platform: str, value: str) -> None:
    settings = _settings(platform, f"    cpu_bind: '{value}'")
    assert settings.launcher.platform_options.cpu_bind == value and not settings.warnings


SPECS = [
    dict(ranks_per_node=4, threads_per_rank=8),
    dict(ranks_per_node=12, threads_per_rank=8),
    dict(ranks_per_node=2, threads_per_rank=4, threads_per_core=2),
    dict(ranks_per_node=3, threads_per_rank=1, threads_per_core=2, cpu_ids=[(4, 5)]),
    dict(ranks_per_node=2, threads_per_rank=2, cpu_ids=[(0, 1, 8, 9)]),
    dict(ranks_per_node=1, threads_per_rank=1, cpu_ids=[(53,)]),
]


@pytest.mark.parametrize("platform", ["polaris", "aurora"])
def test_the_bindings_a_platform_computes_pass_as_its_option(platform: str) -> None:
    driver = get_plugin_manager().load_driver("platform", platform)()
    for fields in SPECS:
        cpus = fields.get("cpu_ids")
        if cpus and not set(cpus[0]) <= set(driver.cpu_ids):
            continue
        args = driver.mpi_launch_args(LaunchSpec(cmdline="app", hostnames=["n0"], **fields))
        bind = args[args.index("--cpu-bind") + 1]
        assert bind.startswith("list:")
        assert _settings(platform, f"    cpu_bind: '{bind}'").launcher.platform_options.cpu_bind == bind


ALL_PLATFORMS = ["default", "polaris", "aurora", "sunspot", "theta-knl", "thetagpu", "perlmutter-gpu", "perlmutter-cpu"]


@pytest.mark.parametrize("platform", ALL_PLATFORMS)
def test_the_defaults_and_what_site_init_writes_raise_no_warning(platform: str) -> None:
    assert not _settings(platform).warnings
    startup = get_plugin_manager().load_driver("platform", platform)().settings_defaults()
    params = startup.get("launcher", {}).get("serial_mode_startup_params", {"cpu_affinity": "none"})
    lines = "\n".join(f"    {k}: '{v}'" for k, v in params.items())
    assert not _settings(platform, startup=lines).warnings


@pytest.mark.parametrize("platform,startup,key,says", [
    ("default", "cpu_affinity: nnone", "cpu_affinity", "--cpu_affinity nnone"),
    ("thetagpu", "cpu_affinity: depth", "cpu_affinity", "--cpu_affinity depth"),
    ("polaris", "cpu_affinity: nnone", "cpu_affinity", "PALS mpiexec has no --cpu_affinity"),
    ("aurora", "cpu_affinity: depth", "cpu_affinity", "PALS mpiexec has no --cpu_affinity"),
    ("polaris", "cpu-bind: sideways", "cpu-bind", "not a PALS --cpu-bind"),
    ("sunspot", "--cpu-bind: list:3-1", "--cpu-bind", "runs backwards"),
    ("theta-knl", "cc: nnone", "cc", "aprun -cc"),
    ("theta-knl", "cpu_affinity: sideways", "cpu_affinity", "aprun -cc"),
])
def test_startup_params_the_launcher_does_not_document_are_a_warning(platform, startup, key, says) -> None:
    settings = _settings(platform, startup=f"    {startup}")
    (line,) = settings.warnings
    assert line.startswith(f"settings.yml:6 launcher.serial_mode_startup_params.{key}: ") and says in line, line


@pytest.mark.parametrize("platform,startup", [
    ("default", "cpu_affinity: None"), ("polaris", "cpu-bind: depth"), ("aurora", "cpu_bind: list:1-8:9-16"),
    ("theta-knl", "cc: depth"), ("theta-knl", "cpu_affinity: 0-3:4-7"), ("theta-knl", "cpu_affinity: None"),
])
def test_startup_params_the_launcher_documents_are_quiet(platform: str, startup: str) -> None:
    assert not _settings(platform, startup=f"    {startup}").warnings


def test_check_settings_prints_the_warning_and_the_error(tmp_path, caplog) -> None:
    path = tmp_path / "settings.yml"
    path.write_text("launcher:\n  platform: default\n  serial_mode_startup_params:\n    cpu_affinity: nnone\n")
    result = CliRunner().invoke(main, ["site", "check-settings", str(path)])
    assert result.exit_code == 0 and "OK" in result.output, result.output
    # The warning is logged (balsam.config), on stderr outside pytest.
    assert f"{path}:4 launcher.serial_mode_startup_params.cpu_affinity: 'nnone'" in caplog.text
    path.write_text("launcher:\n  platform: polaris\n  platform_options:\n    cpu_bind: sideways\n")
    result = CliRunner().invoke(main, ["site", "check-settings", str(path)])
    assert result.exit_code != 0
    assert f"{path}:4 launcher.platform_options.cpu_bind: expected one of none, core, depth" in result.output
