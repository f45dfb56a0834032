"""A job's own ``cpu_bind`` launch param on the PALS machines (Polaris, Aurora) gets the check the
option ``launcher.platform_options.cpu_bind`` gets in settings.yml: a value PALS ``mpiexec``
refuses fails the job with one line naming the key, the job, its app and the value, before any
mpiexec starts (on Aurora every launch counts against the ~1,000 a batch job has); blanks around a
good value are dropped instead of reaching mpiexec inside the word (``--cpu-bind ' depth '``), for
the option as for the launch param. Every keyword PALS documents passes (``thread`` failed jobs);
the serial workers' line names the setting, and Theta's ``-cc`` the key the job used."""

from __future__ import annotations

import pytest

from balsam.platform import PALS_CPU_BIND_KINDS, LaunchSpec, pals_cpu_bind_problem
from balsam_platform_aurora import AuroraPlatform
from balsam_platform_polaris.platform import PolarisPlatform

PLATFORMS = [PolarisPlatform, AuroraPlatform]
#: The app's id: what a LaunchSpec carries (and the launcher's one line names), not its name.
APP_ID = 3


def _spec(params: dict, job_id=17) -> LaunchSpec:
    return LaunchSpec(cmdline="./app", hostnames=["x1", "x2"], ranks_per_node=4, threads_per_rank=8,
                      launch_params=params, job_id=job_id, app_id=None if job_id is None else APP_ID)


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("key, value", [
    ("cpu_bind", "depht"),              # a typo
    ("cpu-bind", "list:0-3:x"),         # a rank's CPUs that are not ids
    ("--cpu-bind", "list:7-3"),          # a range backwards
    ("cpu_bind", "Depth"),              # PALS's kinds are lower case (the option is refused so too)
    ("cpu_bind", "threads"),            # srun's spelling, not PALS's
    ("cpu_bind", "verbose"),            # verbose leads a keyword; alone it binds nothing
    ("cpu_bind", "mask:0xff:zz"),       # a mask that is not hex
    # Forms no public source takes (HPE's cray mpiexec: "[verbose,]<keyword>[:arguments]", handed
    # to PALS unparsed; Chapel's launch-pals.c: the bare keywords): still refused, by name.
    ("cpu_bind", "depth,verbose"),      # verbose after the keyword
    ("cpu_bind", "verbose,verbose,depth"),
    ("cpu_bind", "mask:0XFF"),          # 0X: the sources write no such mask
    ("cpu_bind", 0),                    # a CPU id alone (a job's 0 is stored "0"): not a binding
])
def test_a_cpu_bind_pals_refuses_fails_the_job_in_one_line(platform, key: str, value: str) -> None:
    with pytest.raises(ValueError) as error:
        platform().mpi_launch_args(_spec({key: value}))
    message = str(error.value)
    assert message.startswith(f"launch param {key!r} of job 17 (app {APP_ID}) is not a PALS --cpu-bind: "), message
    assert repr(value) in message and "\n" not in message


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("bind", ["thread", "verbose,thread", "socket", "none", "verbose,numa"])
def test_every_keyword_pals_documents_goes_to_mpiexec(platform, bind: str) -> None:
    # HPE's `cray mpiexec --help`: none; numa, socket, core, thread; depth; list; mask. `thread`
    # (one hardware thread per rank, as ALCF users pass it) failed every such job.
    args = platform().mpi_launch_args(_spec({"cpu_bind": bind}))
    assert _option(args, "--cpu-bind") == bind


def test_the_kinds_are_those_pals_documents() -> None:
    assert set(PALS_CPU_BIND_KINDS) == {"none", "numa", "socket", "core", "thread", "depth"}
    assert pals_cpu_bind_problem("thread") is None and pals_cpu_bind_problem(" verbose,thread ") is None


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_serial_workers_line_names_the_setting(platform) -> None:
    # launcher.serial_mode_startup_params reach the workers' mpiexec as a spec of no job: the error
    # read "launch param 'cpu-bind' (app None)", naming neither the setting nor a job.
    with pytest.raises(ValueError) as error:
        platform().mpi_launch_args(_spec({"cpu-bind": "depht"}, job_id=None))
    message = str(error.value)
    assert message.startswith("launcher.serial_mode_startup_params 'cpu-bind' is not a PALS --cpu-bind: "), message
    assert "None" not in message and "'depht'" in message


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("option, bind", [(" depth ", "depth"), ("core\n", "core"), ("verbose,thread ", "verbose,thread")])
def test_the_option_goes_to_mpiexec_without_blanks(platform, option: str, bind: str) -> None:
    # The settings check passes ' depth ' (it strips), which reached mpiexec blanks and all.
    args = platform({"cpu_bind": option}).mpi_launch_args(_spec({}))
    assert _option(args, "--cpu-bind") == bind


@pytest.mark.parametrize("platform", PLATFORMS)
def test_a_blank_option_or_launch_param_is_the_computed_list(platform) -> None:
    # Blank is empty, as the settings check reads it: the computed list:..., not --cpu-bind ' '.
    spec = LaunchSpec(cmdline="./app", hostnames=["x1"], ranks_per_node=2, threads_per_rank=1,
                      cpu_ids=[[1, 2]], job_id=4, app_id=APP_ID)
    computed = _option(platform().mpi_launch_args(spec), "--cpu-bind")
    assert computed.startswith("list:")
    assert _option(platform({"cpu_bind": "  "}).mpi_launch_args(spec), "--cpu-bind") == computed
    blank_param = LaunchSpec(cmdline="./app", hostnames=["x1"], ranks_per_node=2, threads_per_rank=1,
                             cpu_ids=[[1, 2]], job_id=4, app_id=APP_ID, launch_params={"cpu_bind": " "})
    assert _option(platform().mpi_launch_args(blank_param), "--cpu-bind") == computed


def test_one_job_cpu_bind_in_core_for_both_platforms() -> None:
    # Polaris and Aurora each had a verbatim copy; both read the core's now.
    import balsam_platform_aurora.platform as aurora
    from balsam.platform import job_cpu_bind
    import balsam_platform_polaris.platform as polaris

    assert not hasattr(polaris, "job_cpu_bind") or polaris.job_cpu_bind is job_cpu_bind
    assert not hasattr(aurora, "job_cpu_bind") or aurora.job_cpu_bind is job_cpu_bind
    assert job_cpu_bind(_spec({"--cpu-bind=thread": ""}), ("cpu_bind", "cpu-bind")) == "thread"


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
                      job_id=5, app_id=APP_ID)
    # The key the job used: it read "launch param cpu_affinity" for cc and -cc too.
    with pytest.raises(ValueError, match=rf"^launch param {key!r} of job 5 \(app {APP_ID}\) is not an aprun -cc: ") as error:
        ThetaKNLPlatform().mpi_launch_args(spec)
    assert repr(value) in str(error.value)
    # The serial workers' line names the setting.
    serial = LaunchSpec(cmdline="./worker", hostnames=["nid01001"], launch_params={key: value})
    with pytest.raises(ValueError, match=rf"^launcher.serial_mode_startup_params {key!r} is not an aprun -cc: "):
        ThetaKNLPlatform().mpi_launch_args(serial)
    # Good ones as before: a keyword in any case, a CPU list.
    for good, cc in (("Depth", "depth"), ("none", "none"), ("0-15:16-31", "0-15:16-31"), (" cpu ", "cpu")):
        args = ThetaKNLPlatform().mpi_launch_args(LaunchSpec(cmdline="./app", hostnames=["nid01001"],
                                                             launch_params={"cpu_affinity": good}))
        assert args[args.index("-cc") + 1] == cc


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("params", [
    {"cpu_bind": False}, {"cpu_bind": "false"}, {"--cpu-bind": " FALSE "}, {"--cpu-bind=False": ""},
])
def test_a_false_cpu_bind_is_not_set(platform, params: dict) -> None:
    # docs/launcher.md: {"opt": False} leaves the option out (launch_param_words' rule; a job's
    # False is stored "False"). It failed the job ("got 'False'"), where before it meant the default.
    default = _option(platform().mpi_launch_args(_spec({})), "--cpu-bind")
    args = platform().mpi_launch_args(_spec(params))
    assert _option(args, "--cpu-bind") == default and args.count("--cpu-bind") == 1
    # ... and the option's own binding stands.
    assert _option(platform({"cpu_bind": "core"}).mpi_launch_args(_spec(params)), "--cpu-bind") == "core"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_a_cpu_id_alone_is_refused_with_the_list_form(platform) -> None:
    # 0 is a value, not "unset": it reaches the platform as "0" (CPU 0 for aprun -cc, below).
    with pytest.raises(ValueError, match=r"got '0' \(CPUs are written list:0\)$"):
        platform().mpi_launch_args(_spec({"cpu_bind": "0"}))


def test_theta_knl_a_false_cc_is_the_default_and_0_is_cpu_0() -> None:
    from balsam_platform_theta.platform import ThetaKNLPlatform

    def cc(params: dict) -> str:
        args = ThetaKNLPlatform().mpi_launch_args(LaunchSpec(cmdline="./app", hostnames=["nid01001"],
                                                             launch_params=params, job_id=5, app_id=APP_ID))
        return args[args.index("-cc") + 1]

    default = cc({})
    assert default == "depth"
    assert cc({"cc": False}) == cc({"cpu_affinity": "False"}) == cc({"-cc": "false"}) == default
    assert cc({"cc": 0}) == cc({"cc": "0"}) == "0"


def test_aurora_a_blank_option_keeps_the_tiles_binding_of_a_whole_node_gpu_job() -> None:
    # A blank option is empty (the settings check reads it so): a whole-node GPU job's ranks go on
    # the cores near their tiles, as with no option. Read as set ("  " is truthy), it gave the even
    # spread, ranks 2 and 3 on the socket away from their tiles.
    spec = LaunchSpec(cmdline="./app", hostnames=["x1", "x2"], ranks_per_node=4, threads_per_rank=1,
                      gpus_per_rank=1, whole_nodes=True, job_id=1, app_id=APP_ID)
    tiles = _option(AuroraPlatform().mpi_launch_args(spec), "--cpu-bind")
    assert tiles == "list:1-12:13-24:25-36:37-48"
    for blank in ("  ", "\t", " \n"):
        assert _option(AuroraPlatform({"cpu_bind": blank}).mpi_launch_args(spec), "--cpu-bind") == tiles
