"""Perlmutter as a user moving from Balsam 0.7 meets it: the shared QOS that
docs/platforms/perlmutter.md submits to (``balsam queue submit -q shared -x exclusive=no ...``) is
one of a new site's queues, and a ``$SLURM_JOB_NODELIST`` that is not a Slurm host list stops the
launcher in one line naming it (before: a cut-off ``nid[001-`` gave hosts ``nid`` and ``001-``, a
backwards range no node at all), read by the core's parser as Slurm reads it: the plugin's own
regular expression check hung on a cut-off list of a few items, and refused blanks and empty items,
which Slurm skips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from balsam_platform_perlmutter.platform import PerlmutterCPUPlatform, PerlmutterGPUPlatform
from test_site_init_platforms import balsam




@pytest.mark.parametrize("platform", [PerlmutterGPUPlatform, PerlmutterCPUPlatform])
def test_the_shared_qos_is_a_queue_of_both_node_types(platform) -> None:
    queues = platform().settings_defaults()["scheduler"]["allowed_queues"]
    # One node at most (the QOS shares a node among jobs), up to 48 hours.
    assert queues["shared"] == {"max_nodes": 1, "max_walltime": 2880, "max_queued_jobs": 5000}
    assert {"regular", "debug"} <= set(queues)


def test_the_documented_shared_qos_submission_is_accepted(balsam_env, client, tmp_path: Path) -> None:
    path = tmp_path / "pm"
    balsam("site", "init", "--platform", "perlmutter-gpu", "-A", "m1234", "-n", "pm", str(path))
    settings = yaml.safe_load((path / "settings.yml").read_text())["scheduler"]
    assert "shared" in settings["allowed_queues"], settings["allowed_queues"]
    # docs/platforms/perlmutter.md, as written.
    balsam("queue", "submit", "-n", "1", "-t", "30", "-q", "shared", "-A", "m1234", "-j", "mpi",
           "-x", "exclusive=no", "-x", "gpus_per_node=1", cwd=path)
    (batch_job,) = client.get("/batch-jobs/", params={"site_id": int((path / ".balsam-site").read_text())})["results"]
    assert batch_job["queue"] == "shared"
    assert batch_job["optional_params"] == {"exclusive": "no", "gpus_per_node": "1"}
    # More than the one node the QOS allows is refused by name.
    proc = balsam("queue", "submit", "-n", "2", "-t", "30", "-q", "shared", "-A", "m1234", "-j", "mpi",
                  "-x", "exclusive=no", cwd=path, check=False)
    assert proc.returncode != 0 and "shared" in proc.stderr


@pytest.mark.parametrize("nodelist, why", [
    ("nid[001234-", "the '[' at character 4 is not closed (a cut-off list?)"),  # hosts 'nid', '001234-' before
    ("nid[001236-001234]", "the range 001236-001234 runs backwards"),            # no node at all before
    ("nid[]", "'' in [] is not a number or a range of numbers like 1-3"),
    ("nid[1-2-3]", "'1-2-3' in [1-2-3] is not a number or a range of numbers like 1-3"),
    ("nid001234]", "a ']' without its '[', at character 10"),
])
def test_a_nodelist_that_is_not_a_host_list_is_named_in_one_line(nodelist: str, why: str) -> None:
    with pytest.raises(RuntimeError) as error:
        PerlmutterGPUPlatform().discover_nodes({"SLURM_JOB_NODELIST": nodelist})
    message = str(error.value)
    assert message == f"$SLURM_JOB_NODELIST={nodelist!r} is not a Slurm host list: {why}", message


def test_the_older_variable_is_named_when_it_is_the_one_read() -> None:
    with pytest.raises(RuntimeError, match=r"^\$SLURM_NODELIST='nid\[2-1\]' is not a Slurm host list: "
                                           r"the range 2-1 runs backwards$"):
        PerlmutterCPUPlatform().discover_nodes({"SLURM_NODELIST": "nid[2-1]"})


#: A cut-off list of several items (the end of a long $SLURM_JOB_NODELIST lost): the plugin's own
#: regular expression check backtracked exponentially on it (two items: 0.8 s; four: past a 40 s
#: wait), so the launcher hung without a word until walltime. Run in a child process, so that a
#: hang is a failed test (its timeout), not a hung test run; no timing is asserted beyond "it ends".
CUT_OFF_LISTS = [
    ",".join(f"nid{1234 + i:06d}" for i in range(12)) + ",nid[0014",
    ",".join(f"nid[{1000 + 10 * i:06d}-{1002 + 10 * i:06d}]" for i in range(12)) + ",nid[001234-00",
]


@pytest.mark.parametrize("nodelist", CUT_OFF_LISTS)
def test_a_cut_off_list_of_many_items_is_refused_and_does_not_hang(nodelist: str) -> None:
    code = ("import sys\n"
            "from balsam_platform_perlmutter.platform import PerlmutterGPUPlatform\n"
            "try:\n"
            "    PerlmutterGPUPlatform().discover_nodes({'SLURM_JOB_NODELIST': sys.argv[1]})\n"
            "except RuntimeError as exc:\n"
            "    print(exc)\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code, nodelist], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"discover_nodes did not return within 120 s on {nodelist!r}")
    assert proc.returncode == 0, proc.stderr
    # Quoted around its fault (test_a_long_nodelist_is_quoted_around_its_fault): the cut-off end shows.
    line = proc.stdout.strip()
    assert line.startswith("$SLURM_JOB_NODELIST='") and nodelist[-20:] in line and len(line) < 300, line
    assert line.endswith(f"is not a Slurm host list: the '[' at character {nodelist.rindex('[') + 1} is not closed "
                         "(a cut-off list?)"), line


@pytest.mark.parametrize("nodelist, hosts", [
    # Read as Slurm reads them (scontrol show hostnames): blanks separate items as commas do, and
    # empty items are skipped. This plugin's own check refused both before; the core's parser
    # (balsam.builtin.default_platform.expand_hostlist), which it uses now, follows Slurm.
    ("nid001234, nid001235", ["nid001234", "nid001235"]),
    ("nid001234,,nid001235", ["nid001234", "nid001235"]),
    # A host named twice is one node.
    ("nid[001234-001235],nid001234", ["nid001234", "nid001235"]),
])
def test_lists_slurm_reads_are_read_as_slurm_reads_them(nodelist: str, hosts: list[str]) -> None:
    nodes = PerlmutterGPUPlatform().discover_nodes({"SLURM_JOB_NODELIST": nodelist})
    assert [n.hostname for n in nodes] == hosts


@pytest.mark.parametrize("nodelist, hosts", [
    ("nid[001234-001236,001240]", ["nid001234", "nid001235", "nid001236", "nid001240"]),
    ("nid001234", ["nid001234"]),
    ("nid[001234-001235],login07", ["nid001234", "nid001235", "login07"]),
    ("rack[1-2]n[01-02]", ["rack1n01", "rack1n02", "rack2n01", "rack2n02"]),
])
def test_host_lists_slurm_writes_still_expand(nodelist: str, hosts: list[str]) -> None:
    nodes = PerlmutterGPUPlatform().discover_nodes({"SLURM_JOB_NODELIST": nodelist})
    assert [n.hostname for n in nodes] == hosts


@pytest.mark.parametrize("where", ["end", "middle"])
def test_a_long_nodelist_is_quoted_around_its_fault(where: str) -> None:
    # A 10,000-node list with a fault: the one line repeated all ~100,000 characters of it.
    good = [f"nid{i:06d}" for i in range(10000)]
    fault = "nid[0014" if where == "end" else "nid[000300-000200]"
    nodelist = ",".join(good + [fault] if where == "end" else good[:5000] + [fault] + good[5000:])
    with pytest.raises(RuntimeError) as error:
        PerlmutterGPUPlatform().discover_nodes({"SLURM_JOB_NODELIST": nodelist})
    message = str(error.value)
    assert len(message) < 400 and "\n" not in message, message
    assert message.startswith("$SLURM_JOB_NODELIST='...") and fault in message, message
    assert "is not a Slurm host list: " in message
