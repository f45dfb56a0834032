"""The ALCF platforms' job templates and options agree with what their launchers and the PBS plugin do.

Pure: renders the shipped templates with ``build_context`` (no API, no scheduler).
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from balsam.platform import LaunchSpec
from balsam.site.job_template import build_context, render_job_script, template_platform_options
from balsam_platform_aurora import AuroraPlatform, SunspotPlatform
from balsam_platform_aurora.platform import AuroraOptions, tile_ids
from balsam_platform_polaris import PolarisPlatform
from balsam_platform_theta import ThetaGPUPlatform, ThetaKNLPlatform

ROOT = Path(__file__).resolve().parents[2]


def render(platform, tmp_path: Path, optional_params=None, platform_options=None, num_nodes: int = 2) -> str:
    batch_job = {"id": 7, "project": "datascience", "queue": "debug", "num_nodes": num_nodes, "wall_time_min": 30,
                 "job_mode": "mpi", "filter_tags": {}, "optional_params": dict(optional_params or {}), "partitions": []}
    if platform_options is None:
        platform_options = template_platform_options(type("S", (), {"launcher": type("L", (), {
            "platform_options": platform.options})()})())
    return render_job_script(platform.job_template(), build_context(batch_job, tmp_path, platform_options=platform_options,
                                                                     call_hook=False))


def lines_starting(script: str, word_prefix: list[str]) -> list[list[str]]:
    """The shell words of every script line whose words start with ``word_prefix``."""
    found = []
    for line in script.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        if words[: len(word_prefix)] == word_prefix:
            found.append(words)
    return found


# -- 1. Aurora tiles_per_gpu ---------------------------------------------------------------------


def test_aurora_whole_gpus_with_one_tile_per_gpu() -> None:
    assert tile_ids(6, 2)[:3] == ("0.0", "0.1", "1.0")
    assert tile_ids(6, 1) == ("0", "1", "2", "3", "4", "5")
    platform = AuroraPlatform(options={"tiles_per_gpu": 1})
    assert platform.gpu_ids == ("0", "1", "2", "3", "4", "5")
    # The job's ZE_AFFINITY_MASK names whole GPUs: in composite mode "0" is both tiles of GPU 0; in
    # FLAT mode (Level Zero's default) GPU g is the flat devices 2g and 2g+1.
    composite = AuroraPlatform(options={"tiles_per_gpu": 1, "device_hierarchy": "composite"})
    assert composite.gpu_environment(["0", "3"]) == {
        "ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1", "ZE_FLAT_DEVICE_HIERARCHY": "COMPOSITE", "ZE_AFFINITY_MASK": "0,3"}
    flat = AuroraPlatform(options={"tiles_per_gpu": 1, "device_hierarchy": "flat"})
    assert flat.gpu_environment(["0", "3"])["ZE_AFFINITY_MASK"] == "0,1,6,7"
    assert SunspotPlatform(options={"tiles_per_gpu": 1}).gpu_ids == platform.gpu_ids


def test_aurora_tiles_per_gpu_must_be_1_or_2() -> None:
    assert AuroraOptions(tiles_per_gpu=0).validate() == {
        "tiles_per_gpu": "must be 1 (whole GPUs) or 2 (tiles; a Max 1550 has 2), got 0"}
    assert AuroraOptions(tiles_per_gpu=1).validate() == {}
    assert "cpu_ids" in AuroraOptions(tiles_per_gpu=0, cpu_ids="3-1").validate()
    with pytest.raises(ValueError, match=r"tiles_per_gpu: must be 1 \(whole GPUs\) or 2"):
        AuroraPlatform(options={"tiles_per_gpu": 0})
    # In settings.yml: one line naming the file line and the key.
    from balsam.config.settings import SettingsError, loads_settings

    with pytest.raises(SettingsError, match=r"settings.yml:4 launcher.platform_options.tiles_per_gpu: must be 1 \(whole GPUs\) or 2"):
        loads_settings("launcher:\n  platform: aurora\n  platform_options:\n    tiles_per_gpu: 0\n", only=["launcher"])


# -- 2. templates run the launcher program the platform option names ------------------------------


def test_thetagpu_template_runs_the_mpirun_option(tmp_path: Path) -> None:
    default = render(ThetaGPUPlatform(), tmp_path, {"mig_count": "7"})
    assert len(lines_starting(default, ["mpirun", "-hostfile", "$COBALT_NODEFILE"])) == 2
    option = "'/opt/open mpi/bin/mpirun' --mca btl ^openib"
    platform = ThetaGPUPlatform(options={"mpirun": option})
    script = render(platform, tmp_path, {"mig_count": "7"})
    words = shlex.split(option)
    found = lines_starting(script, [*words, "-hostfile"])
    assert len(found) == 2, script
    assert not lines_starting(script, ["mpirun"])
    # The launcher's own runs start with the same words.
    assert platform.mpi_launch_args(LaunchSpec(cmdline="a", hostnames=("h",)))[:4] == words
    # bash reads the rendered words as shlex does.
    line = next(l for l in script.splitlines() if "nvidia-smi_mig" in l)
    out = subprocess.run(["bash", "-c", "f() { printf '%s\\n' \"$@\"; }; f " + line.split(" -hostfile")[0]],
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == words


def test_theta_knl_template_runs_the_aprun_option(tmp_path: Path) -> None:
    default = render(ThetaKNLPlatform(), tmp_path, {"singularity_prime_cache": "yes"})
    assert lines_starting(default, ["aprun", "-N", "1"])
    option = "/opt/cray/alps/bin/aprun -q"
    script = render(ThetaKNLPlatform(options={"aprun": option}), tmp_path, {"singularity_prime_cache": "yes"})
    (words,) = lines_starting(script, ["/opt/cray/alps/bin/aprun", "-q", "-N", "1"])
    assert words[-1] == "/soft/tools/prime-cache"
    assert not lines_starting(script, ["aprun"])


# -- 3. ThetaGPU mig-mode only for the MIG counts that create instances ---------------------------


@pytest.mark.parametrize("mig_count, mig", [("0", False), ("5", False), ("1", False), ("2", True), ("3", True),
                                            ("7", True)])
def test_thetagpu_mig_mode_attr_only_for_2_3_7(tmp_path: Path, mig_count: str, mig: bool) -> None:
    script = render(ThetaGPUPlatform(), tmp_path, {"mig_count": mig_count})
    (attrs_line,) = [l for l in script.splitlines() if l.startswith("#COBALT --attrs")]
    assert attrs_line.endswith(":mig-mode=true") is mig
    assert ("nvidia-smi_mig" in script) is mig


# -- 4. PBS templates: the node count is qsub's; no system= that never reaches PBS ----------------


@pytest.mark.parametrize("platform", [AuroraPlatform(), SunspotPlatform(), PolarisPlatform()],
                         ids=lambda p: p.name)
def test_pbs_templates_select_line_without_system(tmp_path: Path, platform) -> None:
    script = render(platform, tmp_path, platform.settings_defaults()["scheduler"]["optional_batch_job_params"])
    assert "#PBS -l select=2\n" in script
    assert not [l for l in script.splitlines() if "system=" in l and not l.startswith("# ")], script


def test_pbs_select_param_is_how_system_reaches_qsub(tmp_path: Path) -> None:
    from balsam.plugins.manager import get_plugin_manager
    from balsam.scheduler import SubmitRequest

    pbs = get_plugin_manager().load_driver("scheduler", "pbs")()
    command = pbs.render_submit(SubmitRequest(
        script_path=str(tmp_path / "qlaunch.sh"), project="p", queue="debug", num_nodes=2, wall_time_min=10,
        job_name="balsam-1", optional_params={"select": "system=polaris", "filesystems": "home:eagle"}))
    assert "select=2:system=polaris" in command.args


# -- 5, 6. docs ------------------------------------------------------------------------------------


def test_polaris_doc_mig_example_uses_gpu_list_dir() -> None:
    text = (ROOT / "docs/platforms/polaris.md").read_text()
    assert "/var/tmp/balsam-$(hostname)" not in text
    assert "{{ platform_options.gpu_list_dir" in text


def test_site_doc_lists_platform_options_and_template_claims_hold() -> None:
    assert "| `platform_options` (dict) |" in (ROOT / "docs/site.md").read_text()
    job_template = (ROOT / "docs/job-template.md").read_text()
    if "module loads" in job_template.split("## Variables")[0]:
        assert "module " in AuroraPlatform().job_template()
    # The template sections no longer claim a system= directive; the select param is documented.
    aurora, polaris = ((ROOT / "docs/platforms" / doc).read_text() for doc in ("aurora.md", "polaris.md"))
    assert "`#PBS -l select=<nodes>:system" not in aurora and "-x select=system=aurora" in aurora
    assert "(`select=<n>:system=polaris`" not in polaris and "-x select=system=polaris" in polaris
