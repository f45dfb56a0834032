"""The processing module gives back a job whose workdir cannot be prepared for want of room
(ENOSPC, EDQUOT: the site's fault, not the job's), as the launcher gives such jobs back: it was
FAILED ("cannot prepare workdir 'w/5': OSError: [Errno 122] Disk quota exceeded: '.../job.out'"),
and a full ``data/`` failed every STAGED_IN job in seconds. Now the job is held (leased to the
module's session), tried again every ``NO_ROOM_RETRY_SEC``, preprocessed once there is room, and
the module logs once while the disk is full, not once per job.

A real API server; the fault is injected at the workdir's preparation (``create_job_output``) in
the agent process for the default preprocess, and the hook worker's own FAILED result (the real
``run_hook_on_job``, same injection) for a preprocess of the app's own.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from balsam.site import hooks_runner
from balsam.site.modules import processing
from balsam.site.modules.processing import ProcessingModule
from site_test_utils import job_rows, process_until


def _no_room(code: int) -> Any:
    def create_job_output(workdir: Any) -> None:
        raise OSError(code, os.strerror(code), str(Path(workdir) / "job.out"))
    return create_job_output


def _states(client: Any, ids: list[int]) -> dict[int, str]:
    return {r["id"]: r["state"] for r in job_rows(client, id=ids)}


@pytest.fixture
def module(make_site: Any, client: Any) -> Any:
    site = make_site()
    made = ProcessingModule(site, site.settings.processing, client)
    yield site, made
    made.close()


def _plain_jobs(site_id: int, count: int) -> list[int]:
    from balsam.api import ApplicationDefinition, Job

    class Plain(ApplicationDefinition):  # the default preprocess: made in the agent process
        site = site_id
        command_template = "true"

    Plain.sync()
    return [j.id for j in Job.objects.bulk_create([Job(f"w/{i}", Plain) for i in range(count)])]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_gives_staged_in_jobs_back_until_there_is_room(
        module: Any, client: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int) -> None:
    site, mod = module
    ids = _plain_jobs(site.site_id, 5)
    assert set(_states(client, ids).values()) == {"STAGED_IN"}
    real = hooks_runner.create_job_output
    monkeypatch.setattr(hooks_runner, "create_job_output", _no_room(code))
    monkeypatch.setattr(processing, "NO_ROOM_RETRY_SEC", 0.0, raising=False)  # tried again at every cycle
    with caplog.at_level(logging.INFO):
        process_until(mod, lambda: len(getattr(mod, "no_room", ())) == 5 or "FAILED" in _states(client, ids).values(),
                      "the 5 jobs given back", timeout=20)
        assert "FAILED" not in _states(client, ids).values(), "given back, not FAILED"
        assert len(mod.no_room) == 5
        for _ in range(3):  # tried again while the disk stays full: nothing moves, nothing more logged
            mod.run_cycle()
            mod.flush()
        assert _states(client, ids) == {i: "STAGED_IN" for i in ids}, "given back, not FAILED"
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings
        assert str(site.data_path) in warnings[0] and "bytes free" in warnings[0]
        assert f"[Errno {code}]" in warnings[0]

        monkeypatch.setattr(hooks_runner, "create_job_output", real)  # room again
        process_until(mod, lambda: set(_states(client, ids).values()) == {"PREPROCESSED"}, "PREPROCESSED", timeout=20)
    assert all((Path(site.data_path) / f"w/{i}" / "job.out").exists() for i in range(5))
    assert sum("can be prepared again" in r.getMessage() for r in caplog.records) == 1
    assert not mod.no_room


def test_a_hook_workers_no_room_result_gives_the_job_back(module: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A preprocess of the app's own runs in a hook worker, whose workdir preparation fails the job
    with the errno in its text: that result is not sent, the job is held as above; any other
    FAILED result (the hook's own error, a workdir that fails for another reason) is sent."""
    site, mod = module
    monkeypatch.setattr(hooks_runner, "create_job_output", _no_room(errno.EDQUOT))
    job = {"id": 5, "state": "STAGED_IN", "workdir": "w/5", "app_id": 1}
    update = hooks_runner.run_hook_on_job(object, job, False, Path(site.data_path))
    assert update["state"] == "FAILED" and "[Errno 122] Disk quota exceeded" in update["state_data"]["error"]
    mod._hook_jobs[5] = job
    other = {"id": 6, "state": "FAILED", "state_data": {"error": "cannot prepare workdir 'w/6': OSError: [Errno 13] "
                                                                  "Permission denied: 'x'"}}
    mod._hook_jobs[6] = dict(job, id=6)
    assert mod._take_no_room([update, other]) == [other]
    assert mod.no_room == [job] and mod._hook_jobs == {6: dict(job, id=6)}


@pytest.mark.parametrize("backlog", ["depth", "more_than_max_held"])
def test_jobs_held_for_want_of_room_do_not_hold_back_the_run_done_ones(
        module: Any, client: Any, monkeypatch: pytest.MonkeyPatch, backlog: str) -> None:
    """Held jobs that fill ``prefetch_depth`` leave the hook overflow open: a launcher's RUN_DONE
    (the default postprocess, no disk needed) still reaches JOB_FINISHED, and with it the file
    cleaner that may free the room (it waited for the disk it could free). With more jobs to
    prepare than ``max_held`` behind them, the overflow leases no more of those while the disk is
    full (each overflow acquire held more, until max_held was reached and the RUN_DONEs waited)."""
    from balsam.api import ApplicationDefinition, Job

    site, mod = module
    site_id = site.site_id
    monkeypatch.setattr(type(mod), "prefetch_depth", property(lambda self: 3))
    monkeypatch.setattr(hooks_runner, "create_job_output", _no_room(errno.ENOSPC))
    monkeypatch.setattr(processing, "NO_ROOM_RETRY_SEC", 60.0)  # held throughout the test
    _plain_jobs(site_id, 3 if backlog == "depth" else mod.max_held + 10)
    process_until(mod, lambda: len(mod.no_room) == 3, timeout=10)

    class Other(ApplicationDefinition):
        site = site_id
        command_template = "true"

    Other.sync()
    done = [j.id for j in Job.objects.bulk_create([Job(f"d/{i}", Other) for i in range(2)])]
    client.patch("/jobs/", json=[{"id": i, "state": "PREPROCESSED"} for i in done])
    session = client.post("/sessions/", json={"site_id": site_id})["id"]
    client.post(f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {}})  # a launcher's acquire
    for state in ("RUNNING", "RUN_DONE"):
        client.patch("/jobs/", json=[{"id": i, "state": state} for i in done])
    client.delete(f"/sessions/{session}")
    process_until(mod, lambda: set(_states(client, done).values()) == {"JOB_FINISHED"}, timeout=10)
    assert len(mod.no_room) == 3  # still held (the disk is still full), and no more leased to prepare
