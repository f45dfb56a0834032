"""Job ids of the local scheduler are not 1, 2, 3... in every state directory.

Found by an audit with libEnsemble 1.5.0: two sites sharing one server, each with its own local
scheduler directory (other hosts, another BALSAM_LOCAL_SCHEDULER_DIR, or a wiped directory), both
got scheduler_id 1, and ``BalsamExecutor.revoke_allocation`` (``BatchJob.objects.get(scheduler_id=...)``,
no site filter) raised MultipleObjectsReturned instead of revoking. Each directory now counts from a
start drawn once (hash of host, directory and a random nonce). The nonce is pinned where a test
needs the outcome fixed: then the host or the directory alone must make the ids differ.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from balsam.builtin import local_queue
from balsam.builtin.local_queue import LocalQueue, QueueError
from balsam.builtin.local_scheduler import LocalScheduler
from site_test_utils import batch_job, create_batch_job, wait_for

INT32_MAX = 2**31 - 1


@pytest.fixture
def quick_script(tmp_path: Path) -> Path:
    path = tmp_path / "quick.sh"
    path.write_text("#!/bin/bash\nexit 0\n")
    return path


@pytest.fixture
def pinned_nonce(monkeypatch: pytest.MonkeyPatch) -> None:
    # raising=False: the queue from before the fix had no nonce (and these tests must fail there on
    # the ids, not on a missing name).
    monkeypatch.setattr(local_queue, "_nonce", lambda: b"\x00" * 16, raising=False)


def submit(queue: LocalQueue, script: Path) -> int:
    return queue.submit(script, queue="local", project="local", num_nodes=1, wall_time_min=0, job_name="t")


def wait_finished(queue: LocalQueue) -> None:
    wait_for(lambda: not queue.status(), timeout=30, what="the local jobs to end")


def test_two_directories_give_different_first_ids(tmp_path, quick_script, pinned_nonce):
    first, second = LocalQueue(tmp_path / "ls1"), LocalQueue(tmp_path / "ls2")
    ids = [submit(first, quick_script), submit(second, quick_script)]
    wait_finished(first)
    wait_finished(second)
    assert ids[0] != ids[1], ids
    assert all(0 < i <= INT32_MAX for i in ids), ids


def test_same_directory_on_another_host_or_wiped_gives_other_ids(tmp_path, quick_script, pinned_nonce, monkeypatch):
    state = tmp_path / "local-scheduler"
    monkeypatch.setattr(socket, "gethostname", lambda: "login1")
    on_login1 = submit(LocalQueue(state), quick_script)
    wait_finished(LocalQueue(state))

    # the same path on another host (a shared home mounted elsewhere, a fresh container): same nonce
    shutil.rmtree(state)
    monkeypatch.setattr(socket, "gethostname", lambda: "login2")
    on_login2 = submit(LocalQueue(state), quick_script)
    wait_finished(LocalQueue(state))
    assert on_login2 != on_login1

    # wiped and made again on the same host at the same path: only the nonce differs
    shutil.rmtree(state)
    monkeypatch.setattr(socket, "gethostname", lambda: "login1")
    monkeypatch.setattr(local_queue, "_nonce", lambda: b"\x01" * 16, raising=False)
    again = submit(LocalQueue(state), quick_script)
    wait_finished(LocalQueue(state))
    assert again not in (on_login1, on_login2)


def test_ids_in_one_directory_are_unique_increasing_and_survive_a_restart(tmp_path, quick_script):
    state = tmp_path / "state"
    ids = [submit(LocalQueue(state), quick_script) for _ in range(3)]
    restarted = LocalQueue(state)  # a restarted agent: the counter comes from jobs.json
    ids += [submit(restarted, quick_script) for _ in range(2)]
    wait_finished(restarted)
    assert ids == list(range(ids[0], ids[0] + 5)), ids
    assert 0 < ids[0] and ids[-1] <= INT32_MAX
    assert sorted(int(k) for k in json.loads((state / "jobs.json").read_text())["jobs"]) == ids
    assert all(restarted.history(i)["native_state"] == "COMPLETED" for i in ids)


def test_a_directory_from_before_the_change_keeps_counting(tmp_path, quick_script):
    state = tmp_path / "state"
    state.mkdir()
    old = {"script": str(quick_script), "queue": "local", "project": "local", "num_nodes": 1, "wall_time_min": 0,
           "job_name": "t", "pid": 1, "create_time": 1.0, "submit_time": 1.0, "start_time": 1.0,
           "end_time": 2.0, "state": "finished", "native_state": "COMPLETED", "exit_code": 0}
    # Written by the counter that started at 1: jobs 1..3 given out, 3 still on record.
    (state / "jobs.json").write_text(json.dumps({"next_id": 4, "jobs": {"3": old}}))
    queue = LocalQueue(state)
    assert [submit(queue, quick_script), submit(queue, quick_script)] == [4, 5]
    wait_finished(queue)


def test_ids_stay_below_two_to_the_31(tmp_path, quick_script):
    state = tmp_path / "state"
    state.mkdir()
    (state / "jobs.json").write_text(json.dumps({"next_id": INT32_MAX, "jobs": {}}))
    queue = LocalQueue(state)
    assert submit(queue, quick_script) == INT32_MAX
    wait_finished(queue)
    with pytest.raises(QueueError, match="job ids used up"):
        submit(queue, quick_script)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_sites_on_one_server_get_distinct_scheduler_ids(make_site, client, tmp_path: Path) -> None:
    """The auditor's case end to end: two sites, each with its own local-scheduler directory, submit
    one BatchJob each through the agent's scheduler module and the real queue command; the API
    lookup libEnsemble's revoke_allocation does finds exactly one BatchJob for each id."""
    from balsam.api import BatchJob
    from balsam.site.modules.scheduler import SchedulerModule

    modules, created = [], []
    for n in (1, 2):
        site = make_site()
        # A batch script that just waits (no launcher): what is checked is the id it got.
        template = Path(site.site_path) / "job-template.sh"
        template.write_text("#!/bin/bash\nsleep 300\n")
        scheduler = LocalScheduler(state_dir=tmp_path / f"ls{n}")
        modules.append(SchedulerModule(site, site.settings.scheduler, client, scheduler=scheduler))
        created.append(create_batch_job(client, site.site_id, "serial"))
    try:
        for module in modules:
            module.run_cycle()
        records = [batch_job(client, bj["id"]) for bj in created]
        assert all(r["state"] in ("queued", "running") for r in records), records
        scheduler_ids = [r["scheduler_id"] for r in records]
        assert scheduler_ids[0] != scheduler_ids[1], scheduler_ids
        for record, scheduler_id in zip(records, scheduler_ids):
            found = BatchJob.objects.get(scheduler_id=scheduler_id)  # MultipleObjectsReturned before
            assert (found.id, found.site_id) == (record["id"], record["site_id"])
    finally:
        client.patch("/batch-jobs/", json=[{"id": bj["id"], "state": "pending_deletion"} for bj in created])
        for module in modules:
            module.run_cycle()
        for n, module in zip((1, 2), modules):
            queue = LocalQueue(tmp_path / f"ls{n}")
            wait_for(lambda: not queue.status(), timeout=30, what=f"the job of ls{n} deleted")
