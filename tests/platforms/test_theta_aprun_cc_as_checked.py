"""theta-knl's ``aprun -cc``: the settings check took ``cpu_affinity: ' depth '`` (quoted, with
blanks) as ``depth``, but the launch line passed ``-cc ' depth '`` as it was, which aprun refuses:
every job failed at launch after ``balsam site check-settings`` said nothing. A job's
``launch_params`` spelling a keyword in another case (``"None"``, as Python users write it; Balsam
0.7 ran anything but ``none``/``depth`` as ``-cc none``) reached aprun the same way. The line now
passes what the check accepted: blanks dropped, keywords in lower case; a CPU list as given."""

from __future__ import annotations

import pytest

from balsam.platform import LaunchSpec
from balsam_platform_theta.platform import ThetaKNLOptions, ThetaKNLPlatform


def cc_of(platform: ThetaKNLPlatform, **launch_params: str) -> str:
    args = platform.mpi_launch_args(LaunchSpec(cmdline="app", hostnames=("nid01001", "nid01002"), ranks_per_node=4,
                                               threads_per_rank=2, threads_per_core=2, launch_params=launch_params))
    assert args[:7] == ["aprun", "-n", "8", "-N", "4", "-L", "1001,1002"]
    assert args[9:] == ["-d", "2", "-j", "2"]
    return args[args.index("-cc") + 1]


def test_the_option_as_the_check_accepted_it() -> None:
    assert ThetaKNLOptions(cpu_affinity=" depth ").validate() == {}
    assert cc_of(ThetaKNLPlatform({"cpu_affinity": " depth "})) == "depth"
    assert cc_of(ThetaKNLPlatform({"cpu_affinity": "none\n"})) == "none"
    assert cc_of(ThetaKNLPlatform({"cpu_affinity": " 0-3:4-7 "})) == "0-3:4-7"


@pytest.mark.parametrize("key,value,passed", [
    ("cpu_affinity", "None", "none"), ("cc", "Depth ", "depth"), ("-cc", " numa_node", "numa_node"),
    ("cpu_affinity", "0-7,x", "0-7,x"),
])
def test_a_jobs_cc_keyword_in_another_case_or_with_blanks(key: str, value: str, passed: str) -> None:
    assert cc_of(ThetaKNLPlatform(), **{key: value}) == passed


def test_the_default_and_a_plain_value_are_unchanged() -> None:
    assert cc_of(ThetaKNLPlatform()) == "depth"
    assert cc_of(ThetaKNLPlatform(), cpu_affinity="none") == "none"
