"""Launch params that name an option the platform sets from balsam's placement (rank count, ranks
per node, hosts or node list, node count) are not passed: given twice, the MPI launcher takes the
last one (or refuses the line) and the ranks do not run where balsam accounted for them. One
warning per (app, key) in a launcher process names the job, the key and balsam's own value.

Before: ``{"ppn": 4}`` on Aurora gave ``mpiexec ... --ppn 2 ... --envall --ppn 4 app``, Polaris's
``{"d": 8}`` gave ``-d 4 ... -d 8``, Theta's ``{"d": 8}`` ``-d 4 -j 1 -d 8``, without a word."""

from __future__ import annotations

import logging
import re
import shlex

import pytest

import balsam.util
from balsam.builtin.default_platform import DefaultPlatform
from balsam.platform import LaunchSpec
from balsam.plugins.manager import get_plugin_manager

HOSTS = ["nid01001", "nid01002"]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(balsam.util, "_warned", set())  # "once" counts from each test
    monkeypatch.delenv("COBALT_NODEFILE", raising=False)


def platform(name: str):
    if name.startswith("default-"):
        return DefaultPlatform(mpi_flavor=name.split("-", 1)[1], mpiexec="mpiexec")
    options = {"polaris": {"gpu_list_dir": "", "discover_mig": False}, "thetagpu": {"gpu_list_dir": ""}}.get(name)
    return get_plugin_manager().load_driver("platform", name)(options=options)


def line(name: str, params: dict, **kw) -> list[str]:
    spec = LaunchSpec(cmdline="./app", hostnames=HOSTS, ranks_per_node=2, threads_per_rank=4, launch_params=params, **kw)
    args = shlex.split(platform(name).mpi_command_line(spec))
    assert args[-1] == "./app"
    return args[:-1]


def option_names(args: list[str]) -> list[str]:
    """The options of a launcher line, without dashes or an attached value (``--cpu-bind=cores``)."""
    return [re.split("=", a.lstrip("-"), maxsplit=1)[0] for a in args[1:] if a.startswith("-")]


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "not passed" in r.getMessage()]


#: Per platform: the colliding keys of one job (several spellings of each), the launcher options
#: each may appear only once on the line (balsam's placement, its depth and binding), and the flag
#: the line has already.
CASES = {
    "aurora": ({"ppn": "4", "-n": "8", "np": "8", "--hosts": "x1,x2", "host": "x1", "hostfile": "/tmp/h", "d": "8"},
               {"n": "4", "ppn": "2", "hosts": "nid01001,nid01002", "d": "8"}, "envall"),
    "sunspot": ({"--ppn": "4", "n": "8"}, {"n": "4", "ppn": "2"}, "envall"),
    "polaris": ({"-ppn": "4", "n": "8", "hosts": "x1", "d": "8"},
                {"n": "4", "ppn": "2", "hosts": "nid01001,nid01002", "d": "8"}, None),
    "perlmutter-gpu": ({"N": "3", "--nodes": "3", "ntasks": "8", "n": "8", "nodelist": "x1", "w": "x1",
                        "ntasks-per-node": "4", "c": "16"},
                       {"n": "4", "ntasks-per-node": "2", "nodes": "2", "nodelist": "nid01001,nid01002",
                        "cpus-per-task": "16"}, "overlap"),
    "perlmutter-cpu": ({"--ntasks-per-node": "4", "-N": "1"}, {"ntasks-per-node": "2", "nodes": "2"}, "overlap"),
    "theta-knl": ({"n": "8", "-N": "4", "L": "1,2", "node-list": "3", "d": "8", "j": "2"},
                  {"n": "4", "N": "2", "L": "1001,1002", "d": "8", "j": "2"}, None),
    "thetagpu": ({"np": "8", "npernode": "4", "H": "x1", "--host": "x1", "bind-to": "core"},
                 {"n": "4", "npernode": "2", "host": "nid01001,nid01002", "bind-to": "core"}, "oversubscribe"),
    "default-mpich": ({"n": "8", "-ppn": "4", "hosts": "x1", "f": "/tmp/h"},
                      {"n": "4", "ppn": "2", "hosts": "nid01001,nid01002"}, None),
    "default-openmpi": ({"np": "8", "npernode": "4", "N": "4", "H": "x1", "hostfile": "/tmp/h"},
                        {"n": "4", "npernode": "2", "host": "nid01001:2,nid01002:2"}, None),
}
#: The keys of CASES that are not refused (their value replaces the computed one: depth, binding).
OVERRIDES = {"d", "j", "c", "bind-to"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_colliding_keys_give_one_line_without_duplicates(name: str, caplog: pytest.LogCaptureFixture) -> None:
    params, expected, flag = CASES[name]
    if flag:
        params = {**params, flag: ""}
    with caplog.at_level(logging.WARNING):
        args = line(name, params)
    names = option_names(args)
    for option, value in expected.items():
        assert names.count(option) == 1, (option, args)
        at = next(i for i, a in enumerate(args) if a.lstrip("-") == option)
        assert args[at + 1] == value, (option, args)
    if flag:
        assert names.count(flag) == 1, args  # dropped: the line has it already
    refused = [k for k in params if k not in OVERRIDES and k != flag]
    warnings = refusals(caplog)
    assert len(warnings) == len(refused), warnings
    for key in refused:
        assert sum(f"launch param {key!r}=" in w for w in warnings) == 1, (key, warnings)


@pytest.mark.parametrize("name,key,option", [
    ("aurora", "ppn", "--ppn 2"), ("polaris", "--hosts", "--hosts nid01001,nid01002"), ("perlmutter-gpu", "N", "--nodes 2"),
    ("theta-knl", "N", "-N 2"), ("thetagpu", "np", "-n 4"), ("default-mpich", "np", "-n 4"),
    ("default-openmpi", "host", "--host nid01001:2,nid01002:2"),
])
def test_one_warning_per_app_and_key_names_the_job_and_balsams_value(name, key, option, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        first = line(name, {key: "8"}, job_id=12, app_id=3)
        again = line(name, {key: "8"}, job_id=13, app_id=3)  # same app, same key: no second line
        other_app = line(name, {key: "8"}, job_id=14, app_id=4)
    assert first == again == other_app
    warnings = refusals(caplog)
    assert len(warnings) == 2, warnings
    assert f"launch param {key!r}='8' of job 12 (app 3) not passed" in warnings[0]
    assert f"balsam sets {option} itself" in warnings[0] and "num_nodes and ranks_per_node" in warnings[0]
    assert "every job of app 3" in warnings[0] and "job 14 (app 4)" in warnings[1]


def test_harmless_duplicates_and_other_keys_say_nothing(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        aurora = line("aurora", {"envall": "", "label": "", "env": "FOO=1"})
        polaris = line("polaris", {"envall": ""})  # Polaris's line has no --envall: the job's is passed
        srun = line("perlmutter-gpu", {"--overlap": "", "gpu-bind": "none"})
    assert option_names(aurora).count("envall") == 1 and aurora[-3:] == ["--label", "--env", "FOO=1"]
    assert polaris[-1] == "--envall"
    assert option_names(srun).count("overlap") == 1 and srun[-3:] == ["--gpu-bind", "none", "--overlap"]
    assert refusals(caplog) == []


@pytest.mark.parametrize("name", ["polaris", "aurora"])
def test_depth_keys_replace_the_computed_depth(name: str) -> None:
    for key in ("d", "-d", "depth", "--depth"):
        args = line(name, {key: "8"})
        assert option_names(args).count("d") == 1 and args[args.index("-d") + 1] == "8", (key, args)
        assert "depth" not in option_names(args)


def test_theta_depth_and_hyperthreads_replace_the_computed_ones() -> None:
    args = line("theta-knl", {"d": "16", "--cpus-per-cu": "2"})
    assert args == ["aprun", "-n", "4", "-N", "2", "-L", "1001,1002", "-cc", "depth", "-d", "16", "-j", "2"]


def test_serial_workers_params_are_refused_the_same_way(caplog) -> None:
    """The serial-mode workers' line (no job): a reserved key in serial_mode_startup_params would
    put two workers on one node, which the master then refuses."""
    spec = LaunchSpec(cmdline="worker", hostnames=HOSTS, ranks_per_node=1, launch_params={"cpu-bind": "none", "ppn": "2"})
    with caplog.at_level(logging.WARNING):
        args = shlex.split(platform("aurora").mpi_command_line(spec))
    assert args.count("--ppn") == 1 and args[args.index("--ppn") + 1] == "1"
    [warning] = refusals(caplog)
    assert warning.startswith("launch param 'ppn'='2' not passed to mpiexec")


#: Per platform: the launch params whose value replaces one the line computes, as groups of the
#: keys that name one option (the first is the option on the line), and the launcher's reserved map.
#: Every key is tried in every spelling: bare, ``-key``, ``--key``, ``--key=value`` (value in the key).
_PALS = [("d", "depth"), ("cpu-bind", "cpu_bind")]
SPELLING_CASES = {
    "aurora": _PALS, "sunspot": _PALS, "polaris": _PALS,
    "perlmutter-gpu": [("gres",), ("gpus-per-task",), ("cpus-per-task", "c"), ("cpu-bind", "cpu_bind")],
    "perlmutter-cpu": [("cpus-per-task", "c"), ("cpu-bind", "cpu_bind")],
    "theta-knl": [("cc", "cpu_affinity"), ("d", "depth", "cpus-per-pe"), ("j", "cpus-per-cu")],
    "thetagpu": [("bind-to",)],
    "default-mpich": [], "default-openmpi": [],
}


def _reserved_map(name: str) -> dict:
    from balsam.builtin import default_platform
    from balsam.platform import launch_option_name

    if name.startswith("default-"):
        reserved = default_platform.RESERVED_OPTIONS[name.split("-", 1)[1]]
    else:
        module = __import__(type(platform(name)).__module__, fromlist=["_"])
        reserved = next(getattr(module, attr) for attr in ("RESERVED_OPTIONS", "KNL_RESERVED_OPTIONS", "GPU_RESERVED_OPTIONS")
                        if hasattr(module, attr) and (attr != "KNL_RESERVED_OPTIONS" or name == "theta-knl")
                        and (attr != "GPU_RESERVED_OPTIONS" or name == "thetagpu"))
    return {key: launch_option_name(option) for key, option in reserved.items()}


def _spellings(key: str, value: str = "7") -> list[tuple[str, str]]:
    return [(key, value), (f"-{key}", value), (f"--{key}", value), (f"--{key}={value}", ""), (f"-{key}={value}", "")]


@pytest.mark.parametrize("name", sorted(SPELLING_CASES))
def test_no_option_twice_for_any_spelling(name: str) -> None:
    """A key replacing a computed value (depth, binding, ...) or naming a reserved option, in any
    spelling, never puts a second option on the line. Before: ``{"-bind-to": "core"}``,
    ``{"--depth=8": ""}``, ``{"--cpu-bind=...": ""}`` were matched exactly and appended."""
    canonical = _reserved_map(name)
    for group in SPELLING_CASES[name]:
        canonical.update({key: group[0] for key in group})
    keys = [key for group in SPELLING_CASES[name] for key in group] + sorted(_reserved_map(name))
    for key in keys:
        # PALS refuses a --cpu-bind of "7" (the platforms fail such a job): a kind it takes.
        good = "core" if name in ("aurora", "sunspot", "polaris") and key in ("cpu-bind", "cpu_bind") else "7"
        for spelled, value in _spellings(key, good):
            args = line(name, {spelled: value})
            names = [canonical.get(option, option) for option in option_names(args)]
            doubled = sorted({option for option in names if names.count(option) > 1})
            assert not doubled, (spelled, value, args)
            if any(key in group for group in SPELLING_CASES[name]):  # the job's value replaces the computed one
                option = canonical[key]
                at = next(i for i, a in enumerate(args[1:], 1) if a.startswith("-")
                          and canonical.get(option_names(["", a])[0], option_names(["", a])[0]) == option)
                shown = args[at].split("=", 1)[1] if "=" in args[at] else args[at + 1]
                assert shown == good, (spelled, value, args)


def test_platforms_use_the_launchers_maps_of_core() -> None:
    """One map per MPI launcher, in balsam.platform: PALS (Aurora, Polaris), Open MPI (the default
    platform's, ThetaGPU's), MPICH hydra (the default platform's)."""
    from balsam import platform as core
    from balsam.builtin import default_platform
    from balsam_platform_aurora import platform as aurora
    from balsam_platform_polaris import platform as polaris
    from balsam_platform_theta import platform as theta

    assert aurora.RESERVED_OPTIONS is polaris.RESERVED_OPTIONS is core.PALS_RESERVED_OPTIONS
    assert theta.GPU_RESERVED_OPTIONS is default_platform.RESERVED_OPTIONS["openmpi"] is core.OPENMPI_RESERVED_OPTIONS
    assert default_platform.RESERVED_OPTIONS["mpich"] is core.HYDRA_RESERVED_OPTIONS
