"""``balsam job ls`` streams its listing a page at a time (it read every matching job in one request,
sorted them all and printed one string at the end: 2.5 s and 300 MB before the first line at 100,000
jobs); a tag key given twice (``-t exp=1 -t exp=2``) is refused instead of keeping the last value;
``analytics`` names the selected site instead of "all selected sites"."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_test_utils import (balsam, fresh_api_state, job_requests,  # noqa: F401, E402 (fixtures)
                            make_marked_site, sync_hello)


@pytest.fixture
def site(balsam_env: Any, tmp_path: Path) -> Any:
    return make_marked_site(tmp_path, "site-ls")


@pytest.fixture
def hello(site: Any) -> Any:
    return sync_hello("site-ls", "echo hi")


@pytest.fixture
def jobs23(hello: Any) -> list[int]:
    """23 jobs, tags exp=0/1/2 in turn; one on the last page has a workdir longer than any before."""
    from balsam.api import Job

    specs = []
    for i in range(23):
        workdir = "w/a-workdir-much-longer-than-the-first-page-ones" if i == 21 else f"w/{i}"
        specs.append(Job(workdir=workdir, app_id=hello, tags={"exp": str(i % 3)}))
    Job.objects.bulk_create(specs)
    return sorted(j.id for j in Job.objects.all())


def _listed_ids(output: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s", output, re.M)]


# ------------------------------------------------------------------------------ D1: streaming job ls
def test_job_ls_reads_and_prints_page_by_page_in_id_order(jobs23: list[int], job_requests: list[dict],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: one GET /jobs/ with limit=100000, the whole listing built before its first line."""
    import balsam.cli.job as job_cli

    monkeypatch.setattr(job_cli, "LIST_PAGE_SIZE", 5, raising=False)
    out = balsam("job", "ls", "--site", "all")
    assert out.exit_code == 0, out.output
    assert _listed_ids(out.output) == jobs23  # every job once, in id order
    lines = out.output.splitlines()
    assert sum(1 for line in lines if line.split()[:2] == ["ID", "Site"]) == 1
    assert not any(set(line.replace(" ", "")) == {"-"} for line in lines)  # no underline (0.7's layout)
    # Pages of at most 5 (no request asked for more), ordered by id: ceil(23 / 5) requests.
    assert job_requests and all(int(p["limit"]) <= 5 for p in job_requests), job_requests
    assert all(p.get("ordering") == "id" for p in job_requests), job_requests
    assert len(job_requests) == 5, job_requests
    # The columns are the first page's ("Workdir" is wider than w/0..w/4): the long workdir of the
    # last page overflows its column (two spaces, then its state) instead of widening it.
    assert re.search(r" w/0 {6}[A-Z]", out.output), out.output
    assert re.search(r"much-longer-than-the-first-page-ones  [A-Z]", out.output), out.output


def test_job_ls_by_ids_and_filters_page_too(jobs23: list[int], job_requests: list[dict],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import balsam.cli.job as job_cli

    monkeypatch.setattr(job_cli, "LIST_PAGE_SIZE", 5, raising=False)
    wanted = jobs23[::2]  # 12 ids, given in reverse order
    args = [a for i in reversed(wanted) for a in ("--id", str(i))]
    out = balsam("job", "ls", *args)
    assert out.exit_code == 0, out.output
    assert _listed_ids(out.output) == wanted
    assert job_requests and all(int(p["limit"]) <= 5 for p in job_requests), job_requests
    job_requests.clear()
    out = balsam("job", "ls", "--site", "all", "-t", "exp=1")
    assert out.exit_code == 0, out.output
    assert _listed_ids(out.output) == jobs23[1::3]
    assert job_requests and all(int(p["limit"]) <= 5 for p in job_requests), job_requests


def test_job_ls_verbose_streams_yaml_documents(jobs23: list[int], job_requests: list[dict],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    import balsam.cli.job as job_cli

    monkeypatch.setattr(job_cli, "LIST_PAGE_SIZE", 5, raising=False)
    out = balsam("job", "ls", "--site", "all", "-v")
    assert out.exit_code == 0, out.output
    docs = list(yaml.safe_load_all(out.output))
    assert [d["id"] for d in docs] == jobs23
    assert all(int(p["limit"]) <= 5 for p in job_requests) and len(job_requests) == 5, job_requests


def test_job_ls_one_page_is_laid_out_as_one_table(jobs23: list[int]) -> None:
    """The default page holds the whole listing: the columns fit its widest values, as before."""
    out = balsam("job", "ls", "--site", "all")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert _listed_ids(out.output) == jobs23
    header = lines[0]  # no underline (0.7's layout): the Workdir column's width from where State starts
    workdir_width = header.index("State") - header.index("Workdir") - 2
    assert workdir_width == len("w/a-workdir-much-longer-than-the-first-page-ones")


def test_job_ls_transfers_column_is_there_from_the_first_page_when_later_jobs_may_have_slots(
        site: Any, hello: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first page's jobs have no transfer slots, a later page's do: the column is laid out from
    the start (the table is not re-laid out after its first page)."""
    from balsam.api import ApplicationDefinition, Job

    import balsam.cli.job as job_cli

    class Mover(ApplicationDefinition):
        site = "site-ls"
        command_template = "echo mv"
        transfers = {"inp": {"required": False, "direction": "in", "local_path": "in.txt"}}

    Mover.sync()
    Job.objects.bulk_create([Job(workdir=f"h/{i}", app_id=hello) for i in range(6)])
    Job.objects.bulk_create([Job(workdir=f"m/{i}", app_id=Mover) for i in range(3)])
    monkeypatch.setattr(job_cli, "LIST_PAGE_SIZE", 5, raising=False)
    out = balsam("job", "ls", "--site", "all")
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[0].split() == ["ID", "Site", "App", "Workdir", "State", "Transfers", "Tags"]
    assert len(_listed_ids(out.output)) == 9


def test_job_ls_into_a_closed_pipe_ends_quietly(jobs23: list[int], balsam_env: Any, tmp_path: Path) -> None:
    """``balsam job ls | head``: the reader is gone before the first page is written; the command
    ends without a traceback and reads no further page."""
    counter = tmp_path / "requests.txt"
    script = (
        "import atexit, balsam.cli.job as j\n"
        "from balsam.client.rest import RESTClient\n"
        "j.LIST_PAGE_SIZE = 5\n"
        "n = []\n"
        "send = RESTClient._send\n"
        "def rec(self, method, path, **kw):\n"
        "    if method.upper() == 'GET' and path.rstrip('/') == '/jobs': n.append(1)\n"
        "    return send(self, method, path, **kw)\n"
        "RESTClient._send = rec\n"
        f"atexit.register(lambda: open({str(counter)!r}, 'w').write(str(len(n))))\n"
        "from balsam.cli import main\n"
        "main(['job', 'ls', '--site', 'all'], prog_name='balsam')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "BALSAM_CLI_TRACEBACK": ""})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader goes away at once
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert err == "", err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert counter.read_text() == "1"  # the first page only: nothing more was read


# ------------------------------------------------------------------------------ D2: a tag key twice
@pytest.mark.parametrize("command", [["job", "ls"], ["job", "rm", "-y"], ["job", "modify", "-s", "FAILED", "-y"],
                                     ["analytics", "throughput"]])
def test_a_tag_key_given_twice_is_a_usage_error(jobs23: list[int], command: list[str]) -> None:
    """Before: the last value won: `job rm -t exp=1 -t exp=2` offered to delete the exp=2 jobs."""
    from balsam.api import Job

    out = balsam(*command, "--site", "all", "-t", "exp=1", "-t", "exp=2")
    assert out.exit_code == 2, out.output
    error = [line for line in out.output.splitlines() if line.startswith("Error:")]
    assert error == ["Error: --tag: key 'exp' given twice (exp=1 and exp=2); give each key once"], out.output
    assert Job.objects.count() == 23 and Job.objects.filter(state="FAILED").count() == 0


def test_the_same_tag_pair_twice_is_harmless(jobs23: list[int]) -> None:
    out = balsam("job", "ls", "--site", "all", "-t", "exp=1", "-t", "exp=1")
    assert out.exit_code == 0, out.output
    assert _listed_ids(out.output) == jobs23[1::3]


def test_parse_key_values_refuses_a_key_with_two_values() -> None:
    import click

    from balsam.cli._site_selector import parse_key_values

    assert parse_key_values(("a=1", "b=2", "a=1"), "--tag") == {"a": "1", "b": "2"}
    with pytest.raises(click.UsageError, match=r"--param: key 'n' given twice \(n=1 and n=2\)"):
        parse_key_values(("n=1", "n=2"), "--param")


# ------------------------------------------------------------------------------ D4: analytics selection
def test_analytics_names_the_current_site(site: Any) -> None:
    """Before: "(all selected sites)" when the selection was the site the command ran in."""
    os.chdir(site.path)
    out = balsam("analytics", "utilization")
    assert out.exit_code == 0, out.output
    assert "(site site-ls (current))" in out.output, out.output
    out = balsam("analytics", "throughput", "-t", "exp=1")
    assert "(site site-ls (current), exp=1)" in out.output, out.output
    out = balsam("analytics", "throughput", "--site", "all")
    assert "(all sites)" in out.output, out.output
    out = balsam("analytics", "utilization", "--site", "site-ls")
    assert "(site site-ls)" in out.output, out.output
