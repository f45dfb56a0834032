"""A job's own ``cpu_bind`` launch param on the PALS machines (Polaris, Aurora) gets the check the
option ``launcher.platform_options.cpu_bind`` gets in settings.yml: a value PALS ``mpiexec``
refuses fails the job with one line naming the key, the job, its app and the value, before any
mpiexec starts (on Aurora every launch counts against the ~1,000 a batch job has); blanks around a
good value are dropped instead of reaching mpiexec inside the word (``--cpu-bind ' depth '``)."""

from __future__ import annotations

import pytest

from balsam.platform import LaunchSpec
from balsam_platform_aurora import AuroraPlatform
from balsam_platform_polaris.platform import PolarisPlatform

PLATFORMS = [PolarisPlatform, AuroraPlatform]


def _spec(params: dict) -> LaunchSpec:
    return LaunchSpec(cmdline="./app", hostnames=["x1", "x2"], ranks_per_node=4, threads_per_rank=8,
                      launch_params=params, job_id=17, app_id="Sim")


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("key, value", [
    ("cpu_bind", "depht"),              # a typo
    ("cpu-bind", "list:0-3:x"),         # a rank's CPUs that are not ids
    ("--cpu-bind", "list:7-3"),          # a range backwards
    ("cpu_bind", "Depth"),              # PALS's kinds are lower case (the option is refused so too)
])
def test_a_cpu_bind_pals_refuses_fails_the_job_in_one_line(platform, key: str, value: str) -> None:
    with pytest.raises(ValueError) as error:
        platform().mpi_launch_args(_spec({key: value}))
    message = str(error.value)
    assert message.startswith(f"launch param {key!r} of job 17 (app Sim) is not a PALS --cpu-bind: "), message
    assert repr(value) in message and "\n" not in message


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("params, bind", [
    ({"cpu_bind": " depth "}, "depth"),
    ({"--cpu-bind": "core\n"}, "core"),
    ({"cpu-bind": "list:0-7:8-15:16-23:24-31"}, "list:0-7:8-15:16-23:24-31"),
    ({"cpu_bind": "verbose,depth"}, "verbose,depth"),
    ({"--cpu-bind=numa": ""}, "numa"),
])
def test_a_good_cpu_bind_goes_to_mpiexec_without_blanks(platform, params: dict, bind: str) -> None:
    args = platform().mpi_launch_args(_spec(params))
    assert _option(args, "--cpu-bind") == bind
    assert args.count("--cpu-bind") == 1


def test_polaris_core_binding_still_sets_the_depth_to_the_cores_per_rank() -> None:
    # 0.7: -d is the cores per rank with --cpu-bind core; a blank around "core" lost that before.
    spec = LaunchSpec(cmdline="./app", hostnames=["x1"], ranks_per_node=2, threads_per_rank=1,
                      cpu_ids=[list(range(8))], launch_params={"cpu_bind": "core "}, job_id=3, app_id="Sim")
    args = PolarisPlatform().mpi_launch_args(spec)
    assert _option(args, "--cpu-bind") == "core" and _option(args, "-d") == "4"


@pytest.mark.parametrize("key, value", [("cpu_affinity", "depht"), ("cc", "0-3;4-7"), ("-cc", "numa")])
def test_theta_knl_a_cpu_affinity_aprun_refuses_fails_the_job_in_one_line(key: str, value: str) -> None:
    from balsam_platform_theta.platform import ThetaKNLPlatform

    spec = LaunchSpec(cmdline="./app", hostnames=["nid01001"], ranks_per_node=4, launch_params={key: value},
                      job_id=5, app_id="Sim")
    with pytest.raises(ValueError, match=r"^launch param cpu_affinity of job 5 \(app Sim\) is not an aprun -cc: ") as error:
        ThetaKNLPlatform().mpi_launch_args(spec)
    assert repr(value) in str(error.value)
    # Good ones as before: a keyword in any case, a CPU list.
    for good, cc in (("Depth", "depth"), ("none", "none"), ("0-15:16-31", "0-15:16-31")):
        args = ThetaKNLPlatform().mpi_launch_args(LaunchSpec(cmdline="./app", hostnames=["nid01001"],
                                                             launch_params={"cpu_affinity": good}))
        assert args[args.index("-cc") + 1] == cc
