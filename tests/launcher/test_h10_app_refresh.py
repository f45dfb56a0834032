"""A running launcher re-reads the apps of the jobs it prepares (JobPreparer.refresh_apps): a user who
re-syncs a changed app (same id) gets the new code in the jobs prepared afterwards, not the copy the
launcher loaded first. Unit tests with a fake client counting requests, and an end-to-end run."""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import pytest

from launcher_harness import finish, start_launcher
from launcher_helpers import make_runnable, wait_for_states


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Apps:
    """A fake App listing: ``records`` by id; ``requests`` records each listing's ids."""

    def __init__(self, **payloads: str) -> None:
        self.payloads = {int(k[1:]): v for k, v in payloads.items()}
        self.requests: list[list[int]] = []
        self.loaded: list[str] = []
        self.down = False

    def fetch(self, app_ids: Any) -> list[Any]:
        self.requests.append(list(app_ids))
        if self.down:
            raise ConnectionError("server unreachable")
        return [types.SimpleNamespace(id=i, serialized_class=self.payloads[i]) for i in app_ids if i in self.payloads]

    def load_record(self, record: Any) -> type:
        self.loaded.append(record.serialized_class)
        return _app_class(record.serialized_class)

    def load_by_id(self, app_id: int) -> type:
        return self.load_record(types.SimpleNamespace(id=app_id, serialized_class=self.payloads[app_id]))


def _app_class(payload: str) -> type:
    if payload == "broken":
        raise ValueError("cannot deserialize")

    class App:
        _serialized_class = payload

        def __init__(self, job: Any) -> None:
            self.job = job

        def get_arg_str(self) -> str:
            return f"echo {payload}"

        def get_environ_vars(self) -> dict:
            return {}

        def shell_preamble(self) -> str:
            return ""

    return App


def _job(job_id: int, app_id: int) -> Any:
    return types.SimpleNamespace(id=job_id, app_id=app_id, workdir=f"w{job_id}", num_nodes=1, ranks_per_node=1,
                                 threads_per_rank=1, threads_per_core=1, gpus_per_rank=0, node_packing_count=1,
                                 launch_params={})


def _preparer(tmp_path: Path, apps: _Apps, clock: _Clock) -> Any:
    from balsam.launcher.app_run import JobPreparer

    return JobPreparer(tmp_path, load_app=apps.load_by_id, fetch_apps=apps.fetch, load_record=apps.load_record,
                       app_refresh_sec=10, clock=clock)


def _run_batch(preparer: Any, jobs: list[Any]) -> list[str]:
    preparer.end_stale_runs(jobs)  # what both modes call with each acquired batch
    return [preparer.prepare(job).cmdline for job in jobs]


def test_fresh_apps_send_nothing_and_stale_ones_one_request(tmp_path: Path) -> None:
    apps, clock = _Apps(a1="v1", a2="w1"), _Clock()
    preparer = _preparer(tmp_path, apps, clock)
    assert _run_batch(preparer, [_job(1, 1), _job(2, 2)]) == ["echo v1", "echo w1"]
    clock.now += 5
    assert _run_batch(preparer, [_job(3, 1), _job(4, 2), _job(5, 1)]) == ["echo v1", "echo w1", "echo v1"]
    assert apps.requests == []  # fresh copies: no request at all, none per job
    apps.payloads[1] = "v2"  # app 1 re-synced under the same id
    clock.now += 6
    assert _run_batch(preparer, [_job(6, 1), _job(7, 2), _job(8, 1)]) == ["echo v2", "echo w1", "echo v2"]
    assert apps.requests == [[1, 2]]  # ONE listing for the batch's stale apps
    assert apps.loaded == ["v1", "w1", "v2"]  # app 2 unchanged: not loaded again
    assert _run_batch(preparer, [_job(9, 1)]) == ["echo v2"]
    assert apps.requests == [[1, 2]]


def test_only_the_batchs_stale_apps_are_read(tmp_path: Path) -> None:
    apps, clock = _Apps(a1="v1", a2="w1"), _Clock()
    preparer = _preparer(tmp_path, apps, clock)
    _run_batch(preparer, [_job(1, 1), _job(2, 2)])
    clock.now += 11
    _run_batch(preparer, [_job(3, 2)])
    assert apps.requests == [[2]]


def test_a_deleted_app_is_dropped(tmp_path: Path) -> None:
    from balsam.launcher.app_run import JobBuildError

    apps, clock = _Apps(a1="v1"), _Clock()
    preparer = _preparer(tmp_path, apps, clock)
    _run_batch(preparer, [_job(1, 1)])
    del apps.payloads[1]
    clock.now += 11
    preparer.end_stale_runs([_job(2, 1)])
    with pytest.raises(JobBuildError, match="app 1 no longer exists"):
        preparer.prepare(_job(2, 1))


def test_an_unreachable_server_keeps_the_copies(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    apps, clock = _Apps(a1="v1"), _Clock()
    preparer = _preparer(tmp_path, apps, clock)
    _run_batch(preparer, [_job(1, 1)])
    apps.down = True
    apps.payloads[1] = "v2"
    clock.now += 11
    with caplog.at_level(logging.WARNING, logger="balsam.launcher.app_run"):
        assert _run_batch(preparer, [_job(2, 1)]) == ["echo v1"]
        assert _run_batch(preparer, [_job(3, 1)]) == ["echo v1"]  # not tried again per batch
        clock.now += 11
        assert _run_batch(preparer, [_job(4, 1)]) == ["echo v1"]
    assert len(apps.requests) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "could not re-read apps [1]" in warnings[0], warnings
    apps.down = False
    clock.now += 11
    assert _run_batch(preparer, [_job(5, 1)]) == ["echo v2"]


def test_a_failed_app_loads_once_fixed(tmp_path: Path) -> None:
    from balsam.launcher.app_run import JobBuildError

    apps, clock = _Apps(a1="broken"), _Clock()
    preparer = _preparer(tmp_path, apps, clock)
    preparer.end_stale_runs([_job(1, 1)])
    with pytest.raises(JobBuildError, match="loading the app"):
        preparer.prepare(_job(1, 1))
    apps.payloads[1] = "v2"
    clock.now += 11
    assert _run_batch(preparer, [_job(2, 1)]) == ["echo v2"]


def test_an_app_first_seen_after_the_limit_is_read_in_the_same_request(tmp_path: Path) -> None:
    """The records the launcher prefetched at its start (ApplicationDefinition.prefetch_site) are as
    old as the launcher: an app first used later is read afresh, with the batch's stale apps."""
    apps, clock = _Apps(a1="v1", a2="w1"), _Clock()
    preparer = _preparer(tmp_path, apps, clock)
    _run_batch(preparer, [_job(1, 1)])
    clock.now += 11
    assert _run_batch(preparer, [_job(2, 1), _job(3, 2)]) == ["echo v1", "echo w1"]
    assert apps.requests == [[1, 2]]


def test_a_callers_own_loader_is_not_overridden(tmp_path: Path) -> None:
    """A JobPreparer given its own load_app (a third-party mode, a test) and no fetch_apps never
    reads the server: its apps are its loader's."""
    from balsam.launcher.app_run import JobPreparer

    apps, clock = _Apps(a1="v1"), _Clock()
    preparer = JobPreparer(tmp_path, load_app=apps.load_by_id, app_refresh_sec=0, clock=clock)
    _run_batch(preparer, [_job(1, 1)])
    clock.now += 100
    assert _run_batch(preparer, [_job(2, 1)]) == ["echo v1"]
    assert preparer.app_refreshes == 0


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["serial", "mpi"])
def test_a_resynced_app_runs_its_new_code_in_a_running_launcher(mode: str, new_site: Any, tmp_path: Path) -> None:
    from balsam._api.app import parse_run_markers
    from balsam._api.codec import deserialize
    from balsam.api import ApplicationDefinition

    name, path = new_site(idle_ttl_sec=2)
    release = tmp_path / "release"

    class Hold(ApplicationDefinition):  # keeps the launcher running until the test is done
        site = name
        command_template = f"bash -c 'while [ ! -e {release} ]; do sleep 0.1; done'"

    class Versioned(ApplicationDefinition):
        site = name

        def run(self) -> str:
            return "v1"

    hold = make_runnable([Hold.submit(workdir="hold", node_packing_count=4, save=False)])
    first = make_runnable([Versioned.submit(workdir="v1", node_packing_count=4, save=False)])
    app_id = Versioned.__app_id__
    # 0: every batch re-reads its apps (the default 10 s would make the test wait).
    proc = start_launcher(path, mode, 2, env={"BALSAM_LAUNCHER_APP_REFRESH_SEC": "0"})
    try:
        wait_for_states(first, {"RUN_DONE"})

        class Versioned(ApplicationDefinition):  # type: ignore[no-redef]  # re-synced: same name, same id
            site = name

            def run(self) -> str:
                return "v2"

        Versioned.sync()
        assert Versioned.__app_id__ == app_id
        second = make_runnable([Versioned.submit(workdir="v2", node_packing_count=4, save=False)])
        wait_for_states(second, {"RUN_DONE"})
    finally:
        release.touch()
    wait_for_states(hold, {"RUN_DONE"})
    assert finish(proc) == 0
    results = {}
    for workdir in ("v1", "v2"):
        value, exc = parse_run_markers((path / "data" / workdir / "job.out").read_text())
        assert exc is None
        results[workdir] = deserialize(value)
    assert results == {"v1": "v1", "v2": "v2"}
