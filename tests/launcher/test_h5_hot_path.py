"""The serial loop's per-job steps made cheaper (issue 14) keep their results: a hand-over's
placement is the one ``attrs.evolve`` made, with every field; the launch environment's check for
non-string values (from a ``balsam_launch_environment`` hook) converts exactly what it did.

Unit tests, no server: the NodeManager, and :func:`~balsam.launcher.runner.launch_environment` with
a hook and a platform of this module."""

from __future__ import annotations

from pathlib import Path

import attrs

from balsam.launcher.app_run import PreparedJob
from balsam.launcher.node_manager import Demand, NodeManager, Placement
from balsam.launcher.runner import launch_environment
from balsam.platform import NodeInfo


def test_hand_over_gives_the_placement_evolve_gave_with_every_field() -> None:
    # A GPU share and two CPUs: every field of Placement holds something other than its default.
    manager = NodeManager([NodeInfo("n0", "host0", [0, 1, 2, 3], ["0", "1"])])
    first = manager.assign(7, Demand(node_packing_count=2, gpus_per_rank=1))
    assert first.gpu_shares and first.gpu_ids[0] and first.cpu_ids[0]
    moved = manager.hand_over(7, 8)
    assert moved == attrs.evolve(first, job_id=8)
    # hand_over builds the Placement field by field: a field added to Placement later, with a
    # default, would silently be reset there. This list makes whoever adds one look at hand_over.
    assert [f.name for f in attrs.fields(Placement)] == [
        "job_id", "node_indexes", "hostnames", "cpu_ids", "gpu_ids", "occupancy", "gpu_shares"]
    # Field by field too.
    for field in attrs.fields(Placement):
        expected = 8 if field.name == "job_id" else getattr(first, field.name)
        assert getattr(moved, field.name) == expected, field.name
    assert manager.placements == {8: moved}
    manager.free(8)
    assert manager.nodes[0].is_empty


class _Platform:
    """Sets one variable for every job (no GPUs here)."""

    def job_environment(self, gpu_ids: list) -> dict:
        return {"FROM_PLATFORM": "p"}


class _StrSubclass(str):
    pass


class _Hook:
    """A ``balsam_launch_environment`` hook caller: one implementation, which runs ``edit``."""

    def __init__(self, edit) -> None:
        self.edit = edit
        self.calls = 0

    def get_hookimpls(self) -> list:
        return [object()]

    def __call__(self, *, job, env, node_hostnames) -> None:
        self.calls += 1
        self.edit(env)


def _prepared(env: dict) -> PreparedJob:
    return PreparedJob(job=None, id=5, workdir=Path("/nonexistent/w"), cmdline="true", env=env)


def _placement() -> Placement:
    return Placement(job_id=5, node_indexes=(0,), hostnames=("host0",), cpu_ids=((0,),), gpu_ids=((),), occupancy=1.0)


def test_launch_environment_converts_what_a_hook_put_in_that_is_not_exactly_a_str() -> None:
    def edit(env: dict) -> None:
        env["NUMBER"] = 3
        env["PATH_VALUE"] = Path("/a/b")
        env["SUBCLASS"] = _StrSubclass("s")  # not exactly str: converted, as before
        env[_StrSubclass("KEY_SUBCLASS")] = "k"

    hook = _Hook(edit)
    env = launch_environment(_prepared({"A": "1"}), _placement(), _Platform(), hook)
    assert hook.calls == 1
    assert env == {"A": "1", "FROM_PLATFORM": "p", "OMP_NUM_THREADS": "1", "NUMBER": "3", "PATH_VALUE": "/a/b",
                   "SUBCLASS": "s", "KEY_SUBCLASS": "k"}
    assert all(type(k) is str and type(v) is str for k, v in env.items())


def test_launch_environment_of_strings_only_keeps_them_and_leaves_the_job_env_alone() -> None:
    hook = _Hook(lambda env: env.update(FROM_HOOK="h"))
    job_env = {"A": "1", "OMP_NUM_THREADS": "4"}
    env = launch_environment(_prepared(job_env), _placement(), _Platform(), hook)
    assert env == {"A": "1", "OMP_NUM_THREADS": "4", "FROM_PLATFORM": "p", "FROM_HOOK": "h"}
    assert list(env) == ["A", "OMP_NUM_THREADS", "FROM_PLATFORM", "FROM_HOOK"]  # order kept
    assert job_env == {"A": "1", "OMP_NUM_THREADS": "4"}  # the prepared job's own copy is not changed


def test_demand_of_a_job_is_the_demand_built_from_its_values() -> None:
    """Demand.of shares one Demand per set of values: each is the one its values build, types and
    defaults as before (None and 0 read as the default, floats and strings converted)."""
    import types

    import pytest

    from balsam.launcher.node_manager import Demand

    def job(**values):
        fields = dict(num_nodes=1, ranks_per_node=1, threads_per_rank=1, threads_per_core=1, gpus_per_rank=0.0,
                      node_packing_count=1)
        fields.update(values)
        return types.SimpleNamespace(**fields)

    cases = [
        (job(), Demand()),
        (job(node_packing_count=64), Demand(node_packing_count=64)),
        (job(num_nodes=None, ranks_per_node=0, gpus_per_rank=None), Demand()),
        (job(threads_per_rank="4", gpus_per_rank="0.5", threads_per_core=2.0), Demand(threads_per_rank=4, gpus_per_rank=0.5,
                                                                                      threads_per_core=2)),
        (job(num_nodes=True, gpus_per_rank=1), Demand(gpus_per_rank=1.0)),
        (job(ranks_per_node=-3, gpus_per_rank=-1.0), Demand()),
        (types.SimpleNamespace(), Demand()),  # no such attributes: the defaults
    ]
    for _ in range(2):  # built, then found
        for source, expected in cases:
            got = Demand.of(source)
            assert got == expected and type(got) is Demand
            assert [type(getattr(got, f.name)) for f in attrs.fields(Demand)] == [int, int, int, int, float, int]
    # One shared object per set of values (frozen: safe to share).
    assert Demand.of(job(node_packing_count=8)) is Demand.of(job(node_packing_count=8))
    # An unhashable value is not cached; a bad one raises as before, each time.
    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __int__(self) -> int:
            return 2

        def __bool__(self) -> bool:
            return True

    for _ in range(2):
        assert Demand.of(job(num_nodes=Unhashable())) == Demand(num_nodes=2)
    for _ in range(2):
        with pytest.raises(ValueError):
            Demand.of(job(threads_per_rank="x"))

    class Wider(Demand):
        pass

    wide = Wider.of(job(node_packing_count=4))
    assert type(wide) is Wider and wide == Wider(node_packing_count=4)


def _plain_job(job_id: int, workdir: str):
    import types

    return types.SimpleNamespace(id=job_id, app_id=1, workdir=workdir, num_nodes=1, ranks_per_node=1, threads_per_rank=1,
                                 threads_per_core=1, gpus_per_rank=0, node_packing_count=1, launch_params={},
                                 parameters={}, serialized_parameters="", get_parameters=lambda: {})


def _noop_app():
    from balsam.api import ApplicationDefinition

    class Noop(ApplicationDefinition):
        site = 1
        command_template = "true"

    return Noop


def test_prepare_uses_the_workdir_of_its_batch_check_only_while_the_job_still_names_it(tmp_path: Path) -> None:
    """end_stale_runs makes each job's workdir path; prepare takes it from there (not made twice)
    while the job's workdir value is the one checked, and makes it again otherwise."""
    import pytest

    from balsam.launcher.app_run import JobBuildError, JobPreparer

    preparer = JobPreparer(tmp_path, load_app=lambda _app_id: _noop_app())
    first, second, third = _plain_job(1, "a/1"), _plain_job(2, "a/2"), _plain_job(3, "a/3")
    preparer.end_stale_runs([first, second, third])
    second.workdir = "b/2"  # changed since the check: its own path, not the checked one
    third.workdir = "../outside"  # and one the check would have refused: still refused
    assert preparer.prepare(first).workdir == tmp_path / "a" / "1"
    assert preparer.prepare(second).workdir == tmp_path / "b" / "2"
    with pytest.raises(JobBuildError, match="workdir"):
        preparer.prepare(third)
    assert (tmp_path / "a" / "1" / "job.out").exists() and (tmp_path / "b" / "2" / "job.out").exists()
    assert not (tmp_path / "a" / "2").exists()
    # The next batch replaces the last one's paths: a job prepared again makes its own.
    preparer.end_stale_runs([_plain_job(4, "c/4")])
    again = _plain_job(1, "d/1")
    assert preparer.prepare(again).workdir == tmp_path / "d" / "1"
    assert preparer.prepare(_plain_job(4, "c/4")).workdir == tmp_path / "c" / "4"
