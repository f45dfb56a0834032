"""Two faults of the core's platform code, as a user meets them.

1. The default platform reads ``$SLURM_JOB_NODELIST`` with ``expand_hostlist``, which took any text:
   a backwards range (``nid[003-001]``) gave no host, a cut-off list (``nid[001-``) the hosts
   ``nid`` and ``001-``, and ``nid[00a-3]`` a bare ``int()`` ValueError. It now reads Slurm's host
   list syntax as ``scontrol show hostnames`` does (checked against the real one where it is
   installed), in Slurm's order with three bracket groups or more, and refuses anything else in one
   line naming the variable and its value (the part of it around the fault, for a long one). Its
   hosts are counted before any is made: ``a[0-65535]b[0-65535]`` (20 characters) ran out of
   memory after a minute, and a long number made huge hosts or a bare ValueError. A host named
   twice is one node and a WARNING; ``$COBALT_PARTNAME`` in Cray nids is refused, not read as hosts.
2. ``launch_param_args`` turned ``{"verbose": True}`` into ``--verbose True`` (the launcher took
   ``True`` for the program to run). A boolean is now a flag, or nothing for False, on every
   launcher line: mpiexec (MPICH, Open MPI, PALS), srun and aprun.
"""

from __future__ import annotations

import shlex
import shutil
import socket
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
    # Three groups or more: hostlist.c takes them apart from the right, so the last varies fastest,
    # then the first, and the one before the last slowest (scontrol 22.05 gives exactly these).
    ("a[1-2]b[3-4]c[5-6]", ["a1b3c5", "a1b3c6", "a2b3c5", "a2b3c6", "a1b4c5", "a1b4c6", "a2b4c5", "a2b4c6"]),
    ("a[1-3]b[3-4]c[5-6]", ["a1b3c5", "a1b3c6", "a2b3c5", "a2b3c6", "a3b3c5", "a3b3c6",
                            "a1b4c5", "a1b4c6", "a2b4c5", "a2b4c6", "a3b4c5", "a3b4c6"]),
    ("a[1-2]b[3-4]c[5-6]d[7-8]", ["a1b3c5d7", "a1b3c5d8", "a2b3c5d7", "a2b3c5d8", "a1b4c5d7", "a1b4c5d8", "a2b4c5d7",
                                  "a2b4c5d8", "a1b3c6d7", "a1b3c6d8", "a2b3c6d7", "a2b3c6d8", "a1b4c6d7", "a1b4c6d8",
                                  "a2b4c6d7", "a2b4c6d8"]),
    ("a[000000000000000001-2]", ["a000000000000000001", "a000000000000000002"]),  # 18 digits: the most taken
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


def test_a_range_of_as_many_hosts_as_slurm_allows_is_taken() -> None:
    # scontrol takes a[0-65535] (65,536 hosts) and refuses a[0-65536] ("Too many hosts in range").
    hosts = expand_hostlist("a[0-65535]")
    assert len(hosts) == 65536 and hosts[:2] == ["a0", "a1"] and hosts[-1] == "a65535"


#: Host lists too big to be an allocation, or with numbers no node has: each refused in one line
#: before any host is made (before: 2**32 hosts, a MemoryError after a minute at 3 GB; the bracket
#: of 1,000 ranges ran for minutes; 4,000 digits of padding made 65,536 hosts of 4 KB; a long
#: number a bare int() ValueError; a host of a million characters).
TOO_BIG = [
    ("a[0-65535]b[0-65535]", "it names more than 1048576 hosts, more than any allocation has (the item at "
                             "character 1 passes the limit)"),
    ("a[0-65535]b[0-16]", "it names more than 1048576 hosts"),  # 1,114,112: before, all made
    ("n[0-65535]," * 16 + "n0", "it names more than 1048576 hosts, more than any allocation has (the item at "
                                "character 177 passes the limit)"),  # counted over the items
    ("a[" + ",".join(["0-65535"] * 1000) + "]", "it names more than 1048576 hosts"),
    ("a[0000000000000000001-3]", "'0000000000000000001-3' in [0000000000000000001-3] has a number of 19 digits, "
                                 "more than the 18 of a node number"),
    ("a[" + "0" * 4000 + "0-65535]", "has a number of 4001 digits, more than the 18 of a node number"),
    ("a[1-" + "9" * 5000 + "]", "has a number of 5000 digits"),  # before: int()'s own ValueError
    ("a[" + "9" * 5000 + "]", "has a number of 5000 digits"),
    ("a" * 254 + "[8-10]", "would be 256 characters long, more than the 255 of a host name"),
    ("n" * 1_000_000, "would be 1000000 characters long"),
]


@pytest.mark.parametrize("text, why", TOO_BIG, ids=range(len(TOO_BIG)))
def test_a_list_of_more_hosts_or_longer_ones_than_any_allocation_is_refused_before_expanding(text: str,
                                                                                              why: str) -> None:
    with pytest.raises(ValueError) as error:
        expand_hostlist(text)
    assert type(error.value) is default_platform.HostlistError
    message = str(error.value)
    assert why in message and "\n" not in message and len(message) < 300, message[:500]


def test_the_total_limit_is_the_most_hosts_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_platform, "MAX_HOSTS", 4)
    assert expand_hostlist("a[1-2],b[1-2]") == ["a1", "a2", "b1", "b2"]
    assert expand_hostlist("a[1-2]b[1-2]") == ["a1b1", "a1b2", "a2b1", "a2b2"]
    for text, at in (("a[1-2],b[1-3]", 8), ("a[1-2]b[1-3]", 1), ("a,b,c,d,e", 9)):
        with pytest.raises(ValueError, match=rf"it names more than 4 hosts, .* at character {at} passes the limit"):
            expand_hostlist(text)
    # The longest host name taken is the limit itself.
    assert expand_hostlist("a" * 253 + "[8-10]")[-1] == "a" * 253 + "10"


def test_the_error_of_a_long_list_quotes_the_part_around_the_fault() -> None:
    # A real-size list (9,000 entries, 63,000 characters) with one bad range at its end: the line
    # was 63,000 characters long.
    text = "nid[" + ",".join(f"{i:06d}" for i in range(1, 9000)) + ",009010-009009]"
    with pytest.raises(RuntimeError) as error:
        DefaultPlatform().discover_nodes({"SLURM_JOB_NODELIST": text})
    message = str(error.value)
    assert message == f"$SLURM_JOB_NODELIST='...{text[-80:]}' is not a Slurm host list: the range 009010-009009 runs " \
                      "backwards", message[:300]
    # A fault at the start is quoted from the start; the entry and its bracket are cut too.
    text = "nid[00x1," + ",".join(f"{i:06d}" for i in range(2, 9000)) + "]"
    message = str(pytest.raises(ValueError, expand_hostlist, text).value)
    assert message.startswith(f"'{text[:80]}...' is not a Slurm host list: '00x1' in [00x1,000002,"), message[:300]
    assert len(message) < 250 and "\n" not in message


def test_a_host_named_twice_is_one_node_and_one_warning_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="balsam"):
        nodes = DefaultPlatform().discover_nodes({"SLURM_JOB_NODELIST": "n[1-3],n2,n[3-4],n3"})
    assert [n.hostname for n in nodes] == ["n1", "n2", "n3", "n4"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["$SLURM_JOB_NODELIST names 2 host(s) more than once (n2, n3): each is one node"], warnings


def test_a_list_with_no_host_twice_gives_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="balsam"):
        assert DefaultPlatform().hostnames({"SLURM_JOB_NODELIST": "n[1-3],m1"}) == ["n1", "n2", "n3", "m1"]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("partition", ["1001-1003,1030", "3835", "1001-", " 3824, 3826-3827\n"])
def test_cobalt_s_cray_node_ids_are_refused_in_one_line_naming_the_variable(partition: str) -> None:
    # Theta KNL's $COBALT_PARTNAME: before, read as the hosts '1001-1003' and '1030', or for one nid
    # the service node the job script runs on. The default platform's mpiexec reaches neither.
    with pytest.raises(RuntimeError) as error:
        DefaultPlatform().hostnames({"COBALT_PARTNAME": partition, "COBALT_JOBID": "7"})
    message = str(error.value)
    assert message.startswith(f"$COBALT_PARTNAME={partition!r} names Cray node ids"), message
    assert "set launcher.platform to the machine's platform" in message and "\n" not in message


def test_cobalt_s_host_names_are_read_as_a_host_list_naming_the_variable(tmp_path: Any) -> None:
    platform = DefaultPlatform()
    assert platform.hostnames({"COBALT_PARTNAME": "thetagpu[05-06]"}) == ["thetagpu05", "thetagpu06"]
    with pytest.raises(RuntimeError, match=r"^\$COBALT_PARTNAME='gpu\[3-1\]' is not a Slurm host list: the range 3-1 "
                                           r"runs backwards$"):
        platform.hostnames({"COBALT_PARTNAME": "gpu[3-1]"})
    # The node file, when Cobalt writes one (ThetaGPU, Cooley), is read first.
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("thetagpu05\nthetagpu06\n")
    assert platform.hostnames({"COBALT_PARTNAME": "1001", "COBALT_NODEFILE": str(nodefile)}) == ["thetagpu05",
                                                                                               "thetagpu06"]
    assert platform.hostnames({"COBALT_PARTNAME": " "}) == [socket.gethostname()]


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
