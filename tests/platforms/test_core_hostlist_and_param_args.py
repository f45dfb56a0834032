"""Two faults of the core's platform code, as a user meets them.

1. The default platform reads ``$SLURM_JOB_NODELIST`` with ``expand_hostlist``, which took any text:
   a backwards range (``nid[003-001]``) gave no host, a cut-off list (``nid[001-``) the hosts
   ``nid`` and ``001-``, and ``nid[00a-3]`` a bare ``int()`` ValueError. It now reads Slurm's host
   list syntax as ``scontrol show hostnames`` does (checked against the real one where it is
   installed) and refuses anything else in one line naming the variable and its value.
2. ``launch_param_args`` turned ``{"verbose": True}`` into ``--verbose True`` (the launcher took
   ``True`` for the program to run). A boolean is now a flag, or nothing for False, on every
   launcher line: mpiexec (MPICH, Open MPI, PALS), srun and aprun.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from typing import Any

import pytest

import balsam.util
from balsam._api.model import structure_value
from balsam.builtin import default_platform
from balsam.builtin.default_platform import DefaultPlatform, expand_hostlist
from balsam.platform import LaunchSpec, launch_param_args
from balsam.plugins.manager import get_plugin_manager

# -- 1. Slurm host lists -------------------------------------------------------------------------

#: Host lists in the forms Slurm documents (slurm.conf(5) "node range expression": comma lists,
#: numbers and ranges in one pair of brackets, leading zeros fixing the width, several bracket
#: groups; the Slurm::Hostlist API: blanks separate items too), with what scontrol 22.05 gives.
VALID = [
    ("nid001234", ["nid001234"]),
    ("nid[001234-001236,001240]", ["nid001234", "nid001235", "nid001236", "nid001240"]),
    ("a[1-2],b7,c[09-10]", ["a1", "a2", "b7", "c09", "c10"]),
    ("x[8-11]", ["x8", "x9", "x10", "x11"]),  # no padding: the width of the range's first number
    ("x[08-11]", ["x08", "x09", "x10", "x11"]),
    ("nid[001-3]", ["nid001", "nid002", "nid003"]),
    ("a[0010]", ["a0010"]),  # a single number as written
    ("rack[1-2]n[01-02]", ["rack1n01", "rack1n02", "rack2n01", "rack2n02"]),  # the first varies slowest
    ("rack[0-1]_blade[0-1]", ["rack0_blade0", "rack0_blade1", "rack1_blade0", "rack1_blade1"]),
    ("a[1-2][3-4]", ["a13", "a14", "a23", "a24"]),
    ("nid[1,3-4],gpu[01-02]", ["nid1", "nid3", "nid4", "gpu01", "gpu02"]),  # commas inside brackets
    ("a-[1-2],x[3-3]", ["a-1", "a-2", "x3"]),
    ("nid001 nid002\tnid003", ["nid001", "nid002", "nid003"]),  # blanks separate items, as in Slurm
    ("nid1,,nid2,", ["nid1", "nid2"]),  # empty items skipped, as scontrol does
    ("[1-2]", ["1", "2"]),
]


@pytest.mark.parametrize("text, hosts", VALID)
def test_slurm_host_lists_expand_as_slurm_writes_them(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


def test_a_name_after_the_brackets_is_expanded_the_one_way_it_can_be_read() -> None:
    # slurm.conf(5) does not allow it ("unit[0-31]rack" is invalid), so Slurm never writes it; the
    # reading is unambiguous, as python-hostlist and ClusterShell have it.
    assert expand_hostlist("node[1-3]-ib") == ["node1-ib", "node2-ib", "node3-ib"]


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="Slurm's scontrol is not installed")
def test_the_expansion_is_the_one_of_slurms_own_scontrol() -> None:
    for text, _hosts in VALID:
        out = subprocess.run(["scontrol", "show", "hostnames", text], capture_output=True, text=True, timeout=30)
        if out.returncode != 0 or out.stderr.strip():
            pytest.skip(f"scontrol show hostnames failed here: {out.stderr.strip()[:200]}")
        assert expand_hostlist(text) == out.stdout.split(), text


#: Texts that are not host lists, and what the one line says about them.
MALFORMED = [
    ("nid[003-001]", "the range 003-001 runs backwards"),  # before: no host at all
    ("nid[001-", "the '[' at character 4 is not closed"),  # before: hosts 'nid' and '001-'
    ("nid[00a-3]", "'00a-3' in [00a-3] is not a number or a range of numbers"),  # before: int() ValueError
    ("nid[]", "'' in [] is not a number"),
    ("a[1,,3]", "'' in [1,,3] is not a number"),
    ("a[3-]", "'3-' in [3-] is not a number"),
    ("a[1-2-3]", "'1-2-3' in [1-2-3] is not a number"),
    ("a[1-3]]", "a ']' without its '[', at character 7"),
    ("a[[1-3]", "a '[' inside brackets, at character 3"),
    ("a[0-65536]", "the range 0-65536 names more than 65536 hosts"),  # scontrol: "Too many hosts in range"
    (" , ", "it names no host"),
]


@pytest.mark.parametrize("text, why", MALFORMED)
def test_a_text_that_is_not_a_host_list_is_one_error_naming_it(text: str, why: str) -> None:
    with pytest.raises(ValueError) as error:
        expand_hostlist(text)
    assert type(error.value) is getattr(default_platform, "HostlistError", None)
    assert str(error.value).startswith(f"{text!r} is not a Slurm host list: {why}"), str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text, why", MALFORMED[:4])
def test_the_launcher_s_line_names_the_variable_and_its_value(text: str, why: str) -> None:
    with pytest.raises(RuntimeError) as error:
        DefaultPlatform().discover_nodes({"SLURM_JOB_NODELIST": text})
    message = str(error.value)
    assert message.startswith(f"$SLURM_JOB_NODELIST={text!r} is not a Slurm host list: {why}"), message
    assert "\n" not in message


def test_the_older_variable_is_named_when_it_is_the_one_read() -> None:
    with pytest.raises(RuntimeError, match=r"^\$SLURM_NODELIST='nid\[2-1\]' is not a Slurm host list: the range 2-1 "
                                           r"runs backwards$"):
        DefaultPlatform().discover_nodes({"SLURM_NODELIST": "nid[2-1]"})


def test_each_host_of_the_allocation_is_one_node() -> None:
    # A host named twice would be two nodes to the launcher, and get twice the jobs.
    nodes = DefaultPlatform().discover_nodes({"SLURM_JOB_NODELIST": "n[1-3],n2"})
    assert [n.hostname for n in nodes] == ["n1", "n2", "n3"]
    assert [n.node_id for n in nodes] == ["0", "1", "2"]


# -- 2. Booleans in launch params ----------------------------------------------------------------

def test_a_boolean_is_a_flag_or_nothing() -> None:
    assert launch_param_args({"verbose": True}) == ["--verbose"]
    assert launch_param_args({"verbose": False}) == []
    assert launch_param_args({"l": True, "quiet": False, "c": "8"}) == ["-l", "-c", "8"]
    # As the value reaches a platform: a map of strings ("True" from the client, "true" from the CLI).
    for true in ("True", "true", " TRUE "):
        assert launch_param_args({"verbose": true}) == ["--verbose"], true
    for false in ("False", "false"):
        assert launch_param_args({"verbose": false}) == [], false
    # Other values are passed as they are; the word true itself is written whole in the key.
    assert launch_param_args({"depth": 1, "mem": 0, "--opt=true": ""}) == ["--depth", "1", "--mem", "0", "--opt=true"]
    assert launch_param_args({"cc": "none", "b": True}, prefix="-") == ["-cc", "none", "-b"]  # aprun


def test_the_client_stores_a_boolean_as_the_string_the_platform_reads_as_a_flag() -> None:
    stored = structure_value("Job", "launch_params", {"verbose": True, "quiet": False}, dict[str, str])
    assert stored == {"verbose": "True", "quiet": "False"}
    assert launch_param_args(stored) == ["--verbose"]


HOSTS = ["nid01001", "nid01002"]


@pytest.fixture
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(balsam.util, "_warned", set())
    monkeypatch.delenv("COBALT_NODEFILE", raising=False)


def _platform(name: str) -> Any:
    if name.startswith("default-"):
        return DefaultPlatform(mpi_flavor=name.split("-", 1)[1], mpiexec="mpiexec")
    options = {"polaris": {"gpu_list_dir": "", "discover_mig": False}, "thetagpu": {"gpu_list_dir": ""}}.get(name)
    return get_plugin_manager().load_driver("platform", name)(options=options)


#: Per launcher line: a real flag of that launcher, in the form a job stores it.
FLAGS = {
    "default-mpich": "prepend-rank",      # hydra mpiexec
    "default-openmpi": "report-bindings",  # Open MPI mpiexec
    "polaris": "label",                    # PALS mpiexec
    "aurora": "label",
    "perlmutter-gpu": "label",             # srun
    "theta-knl": "b",                      # aprun -b: do not copy the binary
    "thetagpu": "report-bindings",         # Open MPI mpirun
}


@pytest.mark.usefixtures("_fresh_warnings")
@pytest.mark.parametrize("name", list(FLAGS))
def test_every_launcher_line_gives_a_flag_for_true_and_nothing_for_false(name: str) -> None:
    flag = FLAGS[name]
    option = f"-{flag}" if len(flag) == 1 else f"--{flag}"

    def line(value: Any) -> list[str]:
        spec = LaunchSpec(cmdline="./app", hostnames=HOSTS, ranks_per_node=2, threads_per_rank=4,
                          launch_params={flag: value})
        return shlex.split(_platform(name).mpi_command_line(spec))

    for true in (True, "True", "true"):
        args = line(true)
        assert option in args, (name, true, args)
        assert args[args.index(option) + 1] not in ("True", "true"), (name, args)
        assert "True" not in args and "true" not in args, (name, args)
    for false in (False, "False"):
        args = line(false)
        assert option not in args and "False" not in args, (name, false, args)
    assert args[-1] == "./app"
