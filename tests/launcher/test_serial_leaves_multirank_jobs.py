"""A serial-mode launcher says why it leaves the jobs that need more than one rank or node.

Before: a job created with ``-n 1 -rpn 2`` (docs/cli.md's example) and a BatchJob submitted with
``-j serial`` (docs/quickstart.md's): the server never leases the job to serial mode
(``serial_only``), so it stayed PREPROCESSED for ever, and neither the launcher's log nor the
BatchJob's ``status_info`` said why (the GPU jobs a GPU-less launcher leaves are logged). Now the
launcher counts them once as it ends (a request while jobs ran slowed them), with one listing
request, logs it and writes it in
``status_info["launcher"]`` (``balsam queue ls -v``).

Real uvicorn server (SQLite), a real ``python -m balsam.launcher -j serial`` process; and the
count itself against a recording client (one request, a count beyond the page is "at least").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from launcher_harness import finish, start_launcher
from launcher_helpers import make_runnable, wait_for_states

NOTE = "more than one rank or node and are left for an mpi-mode BatchJob"


@pytest.mark.slow
def test_serial_launcher_names_the_multirank_jobs_it_leaves(new_site) -> None:
    from balsam.api import ApplicationDefinition, BatchJob, Job

    name, path = new_site(idle_ttl_sec=2)

    class Echo(ApplicationDefinition):
        site = name
        command_template = "echo ran {{ n }}"

    Echo.sync()
    [single] = make_runnable([Echo.submit(workdir="single", n=0, save=False)])
    wide = make_runnable([Echo.submit(workdir="rpn2", n=1, ranks_per_node=2, save=False),
                          Echo.submit(workdir="nodes2", n=2, num_nodes=2, save=False),
                          Echo.submit(workdir="both", n=3, num_nodes=2, ranks_per_node=2, save=False)])
    batch_job = BatchJob.objects.create(site_id=Echo.resolve_site_id(), project="local", queue="local", num_nodes=1,
                                        wall_time_min=1, job_mode="serial", scheduler_id=4244)
    proc = start_launcher(path, "serial", 1, env={"BALSAM_BATCH_JOB_ID": str(batch_job.id)})
    console_path = Path(proc.console_path)
    assert finish(proc, timeout=120) == 0, console_path.read_text()
    console = console_path.read_text()

    wait_for_states([single], {"RUN_DONE"}, timeout=30)
    assert {str(j.state) for j in Job.objects.filter(id=wide)} == {"PREPROCESSED"}
    assert console.count(NOTE) == 1, console
    assert f"3 runnable jobs need {NOTE}" in console, console
    assert "serial mode runs single-rank, single-node jobs only" in console
    info = BatchJob.objects.get(id=batch_job.id).status_info
    assert NOTE in info["launcher"], info


class RecordingClient:
    def __init__(self, rows: list[dict[str, Any]], count: int) -> None:
        self.rows, self.count, self.calls = rows, count, []

    def get(self, url: str, params: Any = None, retry_count: Any = None) -> Any:
        self.calls.append((url, params))
        self.retry_count = retry_count
        return {"count": self.count, "results": self.rows}


def test_one_request_and_a_count_beyond_the_page_is_at_least() -> None:
    from balsam.launcher.modes.serial import MULTI_RANK_SCAN_LIMIT, multi_rank_note

    rows = [{"num_nodes": 1, "ranks_per_node": 2}, {"num_nodes": 1, "ranks_per_node": 1}]
    client = RecordingClient(rows, count=len(rows))
    note = multi_rank_note(client, 7, {"campaign": "x"})
    assert note is not None and note.startswith("1 runnable job needs more than one rank or node and is left")
    [(url, params)] = client.calls
    assert url == "/jobs/" and params["site_id"] == 7 and params["tags"] == ["campaign:x"]
    assert params["state"] == ["PREPROCESSED", "RESTART_READY"] and params["limit"] == MULTI_RANK_SCAN_LIMIT

    assert multi_rank_note(RecordingClient(rows, count=MULTI_RANK_SCAN_LIMIT + 5), 7).startswith("at least 1 ")
    assert multi_rank_note(RecordingClient(rows[1:], count=1), 7) is None
