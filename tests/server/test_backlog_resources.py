"""``GET /sites/{id}/backlog`` with the nodes' shape (``node_gpus``, ``node_cpus``,
``cpu_ids_are_cores``, ``hardware_threads_per_core``): each job's footprint is what the launcher's
node manager takes when it places the job (GPU-bound, CPU-bound, packing-bound, multi-node), in
the same aggregate query; without the shape the answer is 0.7's. On SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from server_testlib import runnable

from balsam.launcher.node_manager import Demand, InsufficientResources, NodeManager
from balsam.platform import NodeInfo

#: A Polaris-like node: 32 cores (2 hardware threads each) and 4 GPUs.
POLARIS = {"node_gpus": 4, "node_cpus": 32, "cpu_ids_are_cores": "true", "hardware_threads_per_core": 2}

#: name -> (job fields, footprint of one job on a POLARIS node, 0.7's footprint of one job)
SHAPES = {
    # 4 to a node, 2 of the 4 GPUs each: half a node (0.7: a quarter)
    "gpu": (dict(node_packing_count=4, ranks_per_node=2, gpus_per_rank=1.0), 0.5, 0.25),
    # 1.5 GPUs take 2 whole GPUs, as the node manager gives them
    "gpu_frac": (dict(node_packing_count=8, ranks_per_node=1, gpus_per_rank=1.5), 0.5, 0.125),
    # 4 ranks x 4 threads at 1 thread per core: 16 of 32 cores
    "cpu": (dict(node_packing_count=8, ranks_per_node=4, threads_per_rank=4), 0.5, 0.125),
    # 4 threads per core, capped at the core's 2: 16 threads on 8 cores
    "cpu_smt": (dict(node_packing_count=16, ranks_per_node=4, threads_per_rank=4, threads_per_core=4), 0.25, 1 / 16),
    # half a GPU and one core: the packing count is the largest share
    "packing": (dict(node_packing_count=2, ranks_per_node=1, gpus_per_rank=0.5), 0.5, 0.5),
    # more GPUs than the node has: never placed here, one node at most
    "too_big": (dict(node_packing_count=4, ranks_per_node=8, gpus_per_rank=1.0), 1.0, 0.25),
    # multi-node: whole nodes, whatever the packing count
    "multi": (dict(num_nodes=2, node_packing_count=4, ranks_per_node=4, gpus_per_rank=1.0), 2.0, 0.5),
}


def _backlog(api, site_id: int, **params) -> dict:
    return api.ok("GET", f"/sites/{site_id}/backlog", params=params)["states"]


@pytest.fixture
def shaped(api, site_app) -> int:
    """Two runnable jobs of each shape, tagged ``shape:<name>``; the site id."""
    site, app = site_app
    for name, (fields, _, _) in SHAPES.items():
        runnable(api, app["id"], 2, tags={"shape": name}, **fields)
    return site["id"]


@pytest.mark.parametrize("name", list(SHAPES))
def test_each_shape_counts_what_the_launcher_takes(api, shaped, name) -> None:
    fields, footprint, old = SHAPES[name]
    row = _backlog(api, shaped, tags=f"shape:{name}", **POLARIS)["PREPROCESSED"]
    assert row["count"] == 2
    assert row["footprint"] == pytest.approx(2 * footprint)
    # unpacked_footprint keeps its meaning: each job on its num_nodes whole nodes
    assert row["unpacked_footprint"] == 2 * fields.get("num_nodes", 1)
    assert _backlog(api, shaped, tags=f"shape:{name}")["PREPROCESSED"]["footprint"] == pytest.approx(2 * old)


@pytest.mark.parametrize("name", ["gpu", "gpu_frac", "cpu", "cpu_smt", "packing"])
def test_footprint_matches_the_node_managers_placement(name) -> None:
    """As many such jobs fit on one idle Polaris-like node as 1 / footprint: the node manager itself
    places them (the elastic estimate then matches placement)."""
    fields, footprint, _ = SHAPES[name]
    node = NodeInfo(node_id="n0", hostname="n0", cpu_ids=range(32), gpu_ids=("3", "2", "1", "0"))
    manager = NodeManager([node], cpu_ids_are_cores=True, hardware_threads_per_core=2)
    demand = Demand(**fields)
    placed = 0
    with pytest.raises(InsufficientResources):
        while placed < 100:
            manager.assign(placed, demand)
            placed += 1
    assert placed == round(1 / footprint)


def test_totals_per_state_and_node_sizes_alone(api, shaped, site_app) -> None:
    everything = _backlog(api, shaped, **POLARIS)["PREPROCESSED"]
    assert everything["count"] == 2 * len(SHAPES)
    assert everything["footprint"] == pytest.approx(sum(2 * f for _, f, _ in SHAPES.values()))
    assert everything["unpacked_footprint"] == 2 * (len(SHAPES) - 1) + 4
    old = _backlog(api, shaped)["PREPROCESSED"]
    assert old["footprint"] == pytest.approx(sum(2 * o for _, _, o in SHAPES.values()))
    assert {k: v for k, v in everything.items() if k != "footprint"} == {k: v for k, v in old.items() if k != "footprint"}
    # GPUs alone: the CPU-bound jobs count their packing share only
    gpus_only = _backlog(api, shaped, tags="shape:cpu", node_gpus=4)["PREPROCESSED"]
    assert gpus_only["footprint"] == pytest.approx(2 / 8)
    # CPU ids that are hardware threads (the default platform): one id per thread, no cap
    threads = _backlog(api, shaped, tags="shape:cpu_smt", node_cpus=32)["PREPROCESSED"]
    assert threads["footprint"] == pytest.approx(2 * 16 / 32)
    # cores without a cap on threads per core: 16 threads at 4 per core on 4 of 32 cores
    uncapped = _backlog(api, shaped, tags="shape:cpu_smt", node_cpus=32, cpu_ids_are_cores="true")["PREPROCESSED"]
    assert uncapped["footprint"] == pytest.approx(2 * 4 / 32)
    # running jobs get the same measure
    site, app = site_app
    running = runnable(api, app["id"], 3, tags={"shape": "run"}, **SHAPES["gpu"][0])
    api.patch_states(running, "RUNNING")
    row = _backlog(api, shaped, state="RUNNING", **POLARIS)["RUNNING"]
    assert (row["count"], row["footprint"]) == (3, pytest.approx(1.5))


@pytest.mark.parametrize("query, name, words", [
    ("node_gpus=0", "node_gpus", "must be >= 1"),
    ("node_gpus=four", "node_gpus", "expected an integer"),
    ("node_gpus=4&node_gpus=4", "node_gpus", "takes one value, got 2"),
    ("node_cpus=-1", "node_cpus", "must be >= 1"),
    ("node_cpus=1.5", "node_cpus", "expected an integer"),
    ("node_cpus=32&cpu_ids_are_cores=maybe", "cpu_ids_are_cores", "expected true or false"),
    ("node_cpus=32&hardware_threads_per_core=-1", "hardware_threads_per_core", "must be >= 0"),
])
def test_bad_node_shapes_are_422_naming_the_parameter(api, site_app, query, name, words) -> None:
    site, _ = site_app
    resp = api.http.get(f"/sites/{site['id']}/backlog?{query}")
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    assert error["loc"] == ["query", name] and words in error["msg"], error


def test_the_cpu_qualifiers_alone_count_nothing_and_are_not_refused(api, site_app) -> None:
    """``cpu_ids_are_cores`` and ``hardware_threads_per_core`` qualify ``node_cpus``; without it they
    change no footprint. Not refused: the API document cannot state that dependency, and a request
    it allows is answered (the fuzz test holds the server to that)."""
    site, app = site_app
    runnable(api, app["id"], 2, tags={"shape": "qualifiers"}, **SHAPES["cpu"][0])
    plain = _backlog(api, site["id"], tags="shape:qualifiers")
    for query in ({"cpu_ids_are_cores": "true"}, {"hardware_threads_per_core": 2}):
        assert _backlog(api, site["id"], tags="shape:qualifiers", **query) == plain


def test_huge_rank_and_thread_counts_do_not_overflow_on_postgresql(api, site_app) -> None:
    """ranks_per_node x threads_per_rank passes 2^31 (each field may be up to 2^31 - 1): PostgreSQL's
    32-bit integer product raised (HTTP 500 on every elastic cycle), SQLite's 64-bit one did not.
    Such a job asks more than a node has: it counts one node."""
    site, app = site_app
    runnable(api, app["id"], 1, tags={"shape": "huge"}, ranks_per_node=65536, threads_per_rank=65536,
             gpus_per_rank=65536.0)
    row = _backlog(api, site["id"], tags="shape:huge", **POLARIS)["PREPROCESSED"]
    assert (row["count"], row["footprint"]) == (1, pytest.approx(1.0))
