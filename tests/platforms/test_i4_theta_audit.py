"""Theta KNL and ThetaGPU, as Balsam 0.7's Theta users relied on them (audit i4).

- ThetaGPU's job template rendered a blank line between ``#COBALT -q`` and ``#COBALT --attrs``
  (the Jinja ``{% set %}`` lines above it): Cobalt's qsub reads the ``#COBALT`` directives as one
  block at the top of the script, and that ``--attrs`` line is the only place a ThetaGPU job asks
  for ``mig-mode=true`` and its filesystems (the Cobalt driver's qsub line has no ``--attrs`` there).
  Every shipped Cobalt template now keeps its directives in one block after the shebang.
  A ``#COBALT -A``/``-q`` line is written only with a value (an empty project made a bare ``-A``).
- ``cpu_ids`` are cores (64 on a KNL, 128 on a DGX A100); the node's logical CPUs as ``lscpu`` lists
  them (``0-255`` on both) were accepted: every KNL core was handed to four jobs at once, and a task
  at threads_per_core=4 on "core" 69 was pinned to CPUs 69, 133, 197 and 261 (the node has 256).
  Such a value is now refused in one line naming the option, as Polaris and Perlmutter refuse it.
- ThetaGPU handed out its 8 GPUs in an allocation of part of a node (the ``single-gpu`` queue, where
  Cobalt starts the job with ``CUDA_VISIBLE_DEVICES`` naming its GPU): packed jobs got GPUs outside
  the allocation. As on Polaris and Perlmutter, only the GPUs (or their MIG instances) that the
  launcher's ``CUDA_VISIBLE_DEVICES`` lists are handed out.
- ``$COBALT_PARTNAME`` with a trailing newline or a tab (read back from a file, or pasted into a
  job script) stopped the launcher: ``'3830\\n' is not a nid or a nid range``. Blanks inside a
  part are refused as before: joined up, ``3824\\n3826`` read as one made-up nid 38243826 (review r3).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from balsam.plugins.manager import get_plugin_manager
from balsam.site.job_template import build_context, render_job_script
from balsam_platform_theta import ThetaGPUOptions, ThetaGPUPlatform, ThetaKNLOptions, ThetaKNLPlatform
from balsam_platform_theta import expand_nid_ranges
from balsam.platform import parse_nvidia_smi_list
from machine_jobs import job_out, run_jobs, site_for
from platform_harness import finish, start_launcher

RECORDED = Path(__file__).parent / "recorded"


def render(template: str, tmp_path: Path, optional_params: dict, project: str = "datascience",
           queue: str = "default") -> str:
    batch_job = {"id": 7, "project": project, "queue": queue, "num_nodes": 2, "wall_time_min": 30,
                 "job_mode": "mpi", "filter_tags": {}, "optional_params": optional_params, "partitions": []}
    return render_job_script(template, build_context(batch_job, tmp_path, platform_options={}, call_hook=False))


def directive_block(script: str) -> tuple[list[str], list[str]]:
    """(the lines between the shebang and the last ``#COBALT`` line, every ``#COBALT`` line)."""
    lines = script.splitlines()
    directives = [i for i, line in enumerate(lines) if line.startswith("#COBALT")]
    return lines[1: directives[-1] + 1], [lines[i] for i in directives]


TEMPLATES = {
    "thetagpu": lambda: ThetaGPUPlatform().job_template(),
    "theta-knl": lambda: ThetaKNLPlatform().job_template(),
    "cobalt": lambda: get_plugin_manager().load_driver("scheduler", "cobalt").default_job_template,
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("optional_params", [{}, {"mig_count": "7", "attrs": "mcdram=flat:numa=quad",
                                                  "singularity_prime_cache": "yes"}, {"mig_count": "5"}])
def test_cobalt_directives_are_one_block_after_the_shebang(name: str, optional_params: dict, tmp_path: Path) -> None:
    script = render(TEMPLATES[name](), tmp_path, optional_params)
    block, directives = directive_block(script)
    assert script.startswith("#!/bin/bash")
    assert block == directives, f"{name}: lines among the #COBALT directives: {block}"
    assert directives[:4] == ["#COBALT -n 2", "#COBALT -t 30", "#COBALT -A datascience", "#COBALT -q default"]
    if name == "thetagpu":
        mig = ":mig-mode=true" if optional_params.get("mig_count") == "7" else ""
        attrs = f"pubnet=true:enable_ssh=1:filesystems=home,grand,eagle,theta-fs0{mig}"
        assert directives[4:] == [f"#COBALT --attrs {attrs}"]
    (tmp_path / "job.sh").write_text(script)
    check = subprocess.run(["bash", "-n", str(tmp_path / "job.sh")], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_no_directive_without_its_value(name: str, tmp_path: Path) -> None:
    """A site with an empty allowed_projects (no accounting) submits without a project: the Theta
    templates wrote ``#COBALT -A`` with no value, which qsub's option parser refuses ("-A option
    requires an argument") before Cobalt could say anything of the project; the scheduler
    plugin's own template writes the line only with a value, and so do the Theta ones now."""
    _, directives = directive_block(render(TEMPLATES[name](), tmp_path, {}, project="", queue=""))
    assert all(len(line.split()) >= 3 for line in directives), directives
    assert not any(line.split()[1] in ("-A", "-q") for line in directives), directives


@pytest.mark.parametrize("options_class,platform_class,logical,message", [
    (ThetaKNLOptions, ThetaKNLPlatform, "0-255",
     "64-255 are hardware threads, not cores: the ids are cores 0-63 (balsam adds core c's other hardware "
     "threads, c + 64, c + 128, c + 192, itself by the job's threads_per_core)"),
    (ThetaGPUOptions, ThetaGPUPlatform, "0-255",
     "128-255 are hardware threads, not cores: the ids are cores 0-127 (balsam adds core c's second hardware "
     "thread, c + 128, itself at threads_per_core=2)"),  # Polaris' and Perlmutter's words: one helper
])
def test_logical_cpus_as_cpu_ids_are_refused(options_class, platform_class, logical: str, message: str) -> None:
    assert options_class(cpu_ids=logical).validate() == {"cpu_ids": message}
    with pytest.raises(ValueError, match=r"^launcher\.platform_options\.cpu_ids: " + message.replace("(", r"\(")
                       .replace(")", r"\)").replace("+", r"\+")):
        platform_class(options={"cpu_ids": logical})
    # cores, or some of them, are what they were
    assert options_class().validate() == {} and options_class(cpu_ids="1-63").validate() == {}
    assert list(platform_class(options={"cpu_ids": "0-31"}).cpu_ids) == list(range(32))


def test_knl_task_pinning_names_only_cpus_the_node_has() -> None:
    knl = ThetaKNLPlatform()
    assert list(knl.cpu_ids) == list(range(64))
    pinned = {cpu for core in knl.cpu_ids for cpu in knl.task_cpu_ids((core,), 4)}
    assert pinned == set(range(256))  # every hardware thread once, none past 255


def test_the_launcher_stops_with_one_error_line_on_lscpu_cpu_ids(balsam_env, fake_machine, tmp_path: Path) -> None:
    machine = fake_machine([])
    _, path = site_for(tmp_path, "theta-knl", platform_options={"cpu_ids": "0-255"})
    proc = start_launcher(path, "serial", 1, machine.env(COBALT_PARTNAME="3824-3825", COBALT_JOBID="512345"))
    assert finish(proc, timeout=60) != 0, Path(proc.console_path).read_text()
    lines = Path(proc.console_path).read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert "launcher.platform_options.cpu_ids: 64-255 are hardware threads, not cores" in lines[0], lines


@pytest.mark.parametrize("partname", ["3824-3827,3830\n", "\t3824-3827, 3830 ", "3824-3827,\n3830"])
def test_cobalt_partname_blanks_are_no_part_of_a_nid(partname: str) -> None:
    assert expand_nid_ranges(partname) == [3824, 3825, 3826, 3827, 3830]
    nodes = ThetaKNLPlatform().discover_nodes({"COBALT_PARTNAME": partname})
    assert [n.hostname for n in nodes] == ["nid03824", "nid03825", "nid03826", "nid03827", "nid03830"]
    with pytest.raises(ValueError, match=r"'3824x' is not a nid"):
        expand_nid_ranges("3824x")



@pytest.mark.parametrize("partname,part", [
    ("3824\n3826", "3824\n3826"), ("3824 3826,3830", "3824 3826"), ("3824-38 27", "3824-38 27"),
])
def test_cobalt_partname_blanks_inside_a_part_are_refused_not_joined(partname: str, part: str) -> None:
    """Two nids without their comma are no nid: joined, they named node 38243826."""
    with pytest.raises(ValueError) as info:
        ThetaKNLPlatform().discover_nodes({"COBALT_PARTNAME": partname})
    assert str(info.value) == f"$COBALT_PARTNAME: {part!r} is not a nid or a nid range"
    assert "\n" not in str(info.value)
    assert expand_nid_ranges(" 3824 - 3826 ,\t3830\n") == [3824, 3825, 3826, 3830]

def _thetagpu_nodes(tmp_path: Path, env: dict, records: str = "") -> list:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("thetagpu05\nthetagpu06\n")
    gpu_lists = tmp_path / "gpulists"
    gpu_lists.mkdir(exist_ok=True)
    if records:  # written after the node file: this allocation's
        for host in ("thetagpu05", "thetagpu06"):
            (gpu_lists / f"balsam-{host}-gpulist.txt").write_text((RECORDED / records).read_text())
    platform = ThetaGPUPlatform(options={"gpu_list_dir": str(gpu_lists), "discover_mig": False})
    return platform.discover_nodes({"COBALT_NODEFILE": str(nodefile), "COBALT_JOBID": "10042", **env})


def test_thetagpu_hands_out_only_the_gpus_of_its_allocation(tmp_path: Path) -> None:
    assert [n.gpu_ids for n in _thetagpu_nodes(tmp_path, {})] == [tuple(str(i) for i in range(8))] * 2
    assert [n.gpu_ids for n in _thetagpu_nodes(tmp_path, {"CUDA_VISIBLE_DEVICES": "5"})] == [("5",)] * 2
    # MIG on (-x mig_count=7): GPU 2's seven instances
    mig = parse_nvidia_smi_list((RECORDED / "thetagpu-mig-1g.5gb-nvidia-smi-L.txt").read_text())
    nodes = _thetagpu_nodes(tmp_path, {"CUDA_VISIBLE_DEVICES": "2"}, "thetagpu-mig-1g.5gb-nvidia-smi-L.txt")
    assert [n.gpu_ids for n in nodes] == [mig.migs["2"]] * 2 and len(mig.migs["2"]) == 7


@pytest.mark.slow
@pytest.mark.mpi
def test_jobs_in_a_single_gpu_allocation_get_its_gpu(balsam_env, fake_machine, tmp_path: Path) -> None:
    machine = fake_machine(["thetagpu05"])
    site = site_for(tmp_path, "thetagpu", platform_options={"gpu_list_dir": str(tmp_path / "none"),
                                                            "discover_mig": False})
    env = machine.env(COBALT_NODEFILE=str(machine.node_file), COBALT_JOBID="10042", CUDA_VISIBLE_DEVICES="5")
    run_jobs(site, "mpi", env, lambda App: [
        App.submit(workdir=f"gpu/{n}", n=n, gpus_per_rank=1, node_packing_count=8, save=False) for n in range(3)],
        command_template='echo "job {{ n }} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"')
    seen = {job_out(site, f"gpu/{n}").split("CUDA_VISIBLE_DEVICES=")[1].split()[0] for n in range(3)}
    assert seen == {"5"}
