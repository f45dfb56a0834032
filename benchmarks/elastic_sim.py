"""Elastic queue strategies in simulation: a 48-hour XPCS-like campaign on a busy machine.

Seed 004's XPCS run: 48 hours of continuous analysis fed by three light sources (about 3.5 tasks
per source per hour), backlog surges, executed through a backfill queue in 46 BatchJobs. This
simulation replays such a stream against a simulated scheduler clock (one-minute steps) and runs the
real decision functions of ``balsam_elastic`` (``BackfillStrategy.decide``, ``SimpleStrategy.decide``)
every ``service_period``; only the machine, the scheduler and the launchers are simulated:

- the machine: ``--nodes`` nodes; other users' work leaves a varying number of nodes free in phases
  of 20-180 minutes (most of the time a few, sometimes none, sometimes many); the scheduler reports
  the free nodes as a backfill window lasting until the phase ends (Cobalt-style windows);
- the scheduler: a request that fits the current window (nodes free, wall time before the phase
  ends) starts at once, or ``--start-lag`` minutes after its submission (the scheduler module's
  cycle plus the scheduler's backfill pass; meanwhile the window still shows its nodes free); any other request waits in the regular queue and starts after
  ``--queue-wait`` minutes (the machine's typical wait; it is then given its nodes);
- launchers: each task takes one node; a launcher starts a task only if it ends before the wall
  time, and leaves after ``--idle-ttl`` minutes without work or at its wall time.

Compared on the same arrivals: ``backfill`` (the default strategy, as 0.7: windows only), ``backfill``
with ``regular_queue_after_min`` (a backlog no window served for that long gets one BatchJob in the
regular queue), ``simple`` (fixed blocks), and a
static allocation holding the same node-hours as ``backfill`` used, as one reservation of
``ceil(node-hours / campaign hours)`` nodes for the whole campaign (the peer). Printed per strategy:
BatchJobs submitted, node-hours held, idle node-hours (held with nothing running), mean and 95th
percentile minutes from a task's creation to RUNNING, and tasks not started by the end.

Usage::

    python benchmarks/elastic_sim.py [--hours 48] [--nodes 128] [--seed 4] [--queue-wait 120]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Optional

import attrs

from balsam.models import BackfillWindow
from balsam.states import BatchJobState
from balsam_elastic import (BackfillStrategy, Backlog, BatchJobView, ElasticQueueOptions, SimpleStrategy, Snapshot,
                            Strategy)


# -- the workload ------------------------------------------------------------------------------------
@dataclass
class Task:
    id: int
    created: int
    duration: int
    started: Optional[int] = None
    ended: Optional[int] = None


def xpcs_arrivals(hours: int, rng: random.Random, sources: int = 3, per_source_hour: float = 3.5,
                  surge_every_h: float = 8.0, surge_size: int = 40) -> list[Task]:
    """Poisson arrivals per source plus surges (a backlog re-queued at once, as after timed-out jobs)."""
    minutes = hours * 60
    tasks: list[Task] = []
    for _ in range(sources):
        t = 0.0
        while True:
            t += rng.expovariate(per_source_hour / 60.0)
            if t >= minutes:
                break
            tasks.append(Task(0, int(t), _duration(rng)))
    surge = rng.uniform(2, surge_every_h) * 60
    while surge < minutes:
        for _ in range(surge_size):
            tasks.append(Task(0, int(surge + rng.uniform(0, 10)), _duration(rng)))
        surge += rng.uniform(0.5, 1.5) * surge_every_h * 60
    tasks.sort(key=lambda task: task.created)
    for i, task in enumerate(tasks):
        task.id = i
    return tasks


def _duration(rng: random.Random) -> int:
    return max(3, min(60, int(rng.lognormvariate(math.log(15), 0.5))))


# -- the machine -------------------------------------------------------------------------------------
@dataclass
class Phase:
    start: int
    end: int
    free: int


def availability(hours: int, nodes: int, rng: random.Random) -> list[Phase]:
    phases: list[Phase] = []
    t = 0
    while t < hours * 60 + 24 * 60:  # beyond the campaign so the last requests can finish
        length = rng.randint(20, 180)
        roll = rng.random()
        free = 0 if roll < 0.25 else (rng.randint(1, max(1, nodes // 16)) if roll < 0.8 else rng.randint(nodes // 8, nodes // 4))
        phases.append(Phase(t, t + length, free))
        t += length
    return phases


@dataclass
class Block:
    """A BatchJob in the simulated scheduler."""

    id: int
    nodes: int
    wall: int
    submitted: int
    started: Optional[int] = None
    ended: Optional[int] = None
    idle_since: Optional[int] = None
    cancelled: bool = False
    regular_queue: bool = False
    running: list[Task] = field(default_factory=list)
    busy_node_minutes: int = 0

    @property
    def state(self) -> BatchJobState:
        if self.ended is not None:
            return BatchJobState.finished
        return BatchJobState.running if self.started is not None else BatchJobState.queued


class Simulation:
    def __init__(self, tasks: list[Task], phases: list[Phase], *, queue_wait: int, idle_ttl: int, period: int,
                 horizon: int, start_lag: int = 0) -> None:
        self.tasks = [Task(t.id, t.created, t.duration) for t in tasks]
        self.phases = phases
        self.queue_wait = queue_wait
        self.start_lag = start_lag
        self.idle_ttl = idle_ttl
        self.period = period
        self.horizon = horizon
        self.blocks: list[Block] = []
        self.now = 0

    def phase(self, t: int) -> Phase:
        return next(p for p in self.phases if p.start <= t < p.end)

    def held(self) -> int:
        return sum(b.nodes for b in self.blocks if b.state == BatchJobState.running)

    def free_now(self) -> tuple[int, int]:
        """(free nodes for us, minutes until the phase ends)."""
        p = self.phase(self.now)
        return max(0, p.free - self.held()), p.end - self.now

    def submit(self, nodes: int, wall: int, regular_queue: bool = False) -> Block:
        block = Block(len(self.blocks) + 1, nodes, wall, self.now, regular_queue=regular_queue)
        self.blocks.append(block)
        return block

    # one simulated minute
    def step(self) -> None:
        t = self.now
        # the scheduler starts what fits a window, or what waited its turn in the regular queue
        for b in self.blocks:
            if b.state == BatchJobState.queued and not b.cancelled:
                free, left = self.free_now()
                fits = b.nodes <= free and b.wall <= left and t - b.submitted >= self.start_lag
                if fits or t - b.submitted >= self.queue_wait:
                    b.started = t
                    b.idle_since = t
        # launchers: finish tasks, start runnable ones (FIFO), leave when idle or at wall time
        runnable = [task for task in self.tasks if task.created <= t and task.started is None]
        for b in (b for b in self.blocks if b.state == BatchJobState.running):
            for task in list(b.running):
                if task.started + task.duration <= t:
                    task.ended = t
                    b.running.remove(task)
            remaining = b.started + b.wall - t
            while runnable and len(b.running) < b.nodes and runnable[0].duration <= remaining:
                task = runnable.pop(0)
                task.started = t
                b.running.append(task)
            if b.running:
                b.idle_since = None
            elif b.idle_since is None:
                b.idle_since = t
            if remaining <= 0 or (not b.running and t - b.idle_since >= self.idle_ttl):
                for task in b.running:  # killed at wall time: back to the backlog
                    task.started = None
                b.running = []
                b.ended = t
            else:
                b.busy_node_minutes += len(b.running)

    def snapshot(self) -> Snapshot:
        t = self.now
        runnable = [task for task in self.tasks if task.created <= t and task.started is None]
        running = sum(len(b.running) for b in self.blocks if b.state == BatchJobState.running)
        views = tuple(BatchJobView(id=b.id, state=b.state, num_nodes=b.nodes, wall_time_min=b.wall,
                                   queued_time_min=(t - b.submitted) if b.state == BatchJobState.queued else None,
                                   regular_queue=b.regular_queue)
                      for b in self.blocks if b.state != BatchJobState.finished and not b.cancelled)
        free, left = self.free_now()
        windows = (BackfillWindow(num_nodes=free, wall_time_min=left),) if free else ()
        return Snapshot(batch_jobs=views, windows=windows,
                        backlog=Backlog(runnable_count=len(runnable), runnable_footprint=float(len(runnable)),
                                        min_runnable_nodes=1 if runnable else 0, max_runnable_nodes=1 if runnable else 0,
                                        running_count=running, running_footprint=float(running),
                                        oldest_runnable_wait_min=float(t - min((r.created for r in runnable), default=t))))

    def run(self, strategy: Optional[Strategy]) -> None:
        while self.now < self.horizon:
            if strategy is not None and self.now % self.period == 0 and self.now < self.horizon:
                decision = strategy.decide(self.snapshot())
                for block_id in decision.cancel:
                    block = self.blocks[block_id - 1]
                    if block.state == BatchJobState.queued:
                        block.cancelled = True
                        block.ended = self.now
                for request in decision.submit:
                    self.submit(request.num_nodes, request.wall_time_min, request.regular_queue)
            self.step()
            self.now += 1
            if self.now >= self.horizon and any(t.started is None for t in self.tasks) and strategy is None:
                break

    def report(self) -> dict:
        used = sum(b.nodes * ((b.ended if b.ended is not None else self.now) - b.started)
                   for b in self.blocks if b.started is not None)
        busy = sum(b.busy_node_minutes for b in self.blocks)
        waits = sorted(t.started - t.created for t in self.tasks if t.started is not None)
        return {
            "batch_jobs": sum(1 for b in self.blocks if b.started is not None),
            "cancelled": sum(1 for b in self.blocks if b.cancelled),
            "node_hours": used / 60,
            "idle_node_hours": (used - busy) / 60,
            "mean_wait": statistics.fmean(waits) if waits else float("nan"),
            "p95_wait": waits[min(len(waits) - 1, int(0.95 * len(waits)))] if waits else float("nan"),
            "not_started": sum(1 for t in self.tasks if t.started is None),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=int, default=48)
    parser.add_argument("--nodes", type=int, default=128)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--queue-wait", type=int, default=120, help="minutes a request outside a window waits")
    parser.add_argument("--idle-ttl", type=int, default=5, help="launcher idle_ttl_sec, in minutes")
    parser.add_argument("--period", type=int, default=1, help="elastic_queue service_period, in minutes")
    parser.add_argument("--start-lag", type=int, default=0,
                        help="minutes before a request that fits a window starts (its nodes still show free meanwhile)")
    parser.add_argument("--regular-after", type=int, default=60, help="regular_queue_after_min of the second backfill row")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    tasks = xpcs_arrivals(args.hours, rng)
    phases = availability(args.hours, args.nodes, random.Random(args.seed + 1))
    horizon = args.hours * 60 + 12 * 60  # 12 h after the last arrival to drain the backlog
    work = sum(t.duration for t in tasks) / 60
    print(f"XPCS-like campaign: {len(tasks)} one-node tasks over {args.hours} h ({work:.0f} node-hours of work), "
          f"{args.nodes}-node machine, windows in {len(phases)} phases, regular queue wait {args.queue_wait} min, "
          f"idle_ttl {args.idle_ttl} min, cycle {args.period} min, start lag {args.start_lag} min, seed {args.seed}")

    backfill_settings = ElasticQueueOptions(min_wall_time_min=35, max_wall_time_min=360, wall_time_pad_min=5,
                                            min_num_nodes=1, max_num_nodes=32, max_queue_wait_time_min=10,
                                            max_queued_jobs=5)
    runs: dict[str, dict] = {}
    sim = Simulation(tasks, phases, queue_wait=args.queue_wait, idle_ttl=args.idle_ttl, period=args.period, horizon=horizon,
                     start_lag=args.start_lag)
    sim.run(BackfillStrategy(backfill_settings))
    runs["backfill (default)"] = sim.report()

    fallback = attrs.evolve(backfill_settings, regular_queue_after_min=args.regular_after)
    sim = Simulation(tasks, phases, queue_wait=args.queue_wait, idle_ttl=args.idle_ttl, period=args.period, horizon=horizon,
                     start_lag=args.start_lag)
    sim.run(BackfillStrategy(fallback))
    runs[f"backfill, regular queue after {args.regular_after} min"] = sim.report()

    simple_options = {"nodes_per_block": 4, "wall_time_min": 120, "min_blocks": 0, "max_blocks": 8, "parallelism": 1.0}
    sim = Simulation(tasks, phases, queue_wait=args.queue_wait, idle_ttl=args.idle_ttl, period=args.period, horizon=horizon,
                     start_lag=args.start_lag)
    sim.run(SimpleStrategy(ElasticQueueOptions(max_queued_jobs=8), simple_options))
    runs["simple (4 nodes x 120 min, <= 8)"] = sim.report()

    static_nodes = max(1, math.ceil(runs["backfill (default)"]["node_hours"] / (horizon / 60)))
    sim = Simulation(tasks, phases, queue_wait=args.queue_wait, idle_ttl=horizon, period=args.period, horizon=horizon,
                     start_lag=args.start_lag)
    reservation = sim.submit(static_nodes, horizon)
    reservation.started = 0
    sim.run(None)
    runs[f"static ({static_nodes} nodes, same node-hours)"] = sim.report()

    no_windows = Simulation(tasks, [Phase(0, horizon + 1, 0)], queue_wait=args.queue_wait, idle_ttl=args.idle_ttl,
                            period=args.period, horizon=horizon,
                     start_lag=args.start_lag)
    no_windows.run(BackfillStrategy(backfill_settings))
    runs["0.7 on PBS/Slurm (no windows)"] = no_windows.report()

    header = f"{'strategy':<38} {'BatchJobs':>9} {'cancelled':>9} {'node-h':>8} {'idle node-h':>12} {'mean wait':>10} {'p95 wait':>9} {'not run':>8}"
    print(header)
    print("-" * len(header))
    for name, r in runs.items():
        idle_share = 100 * r["idle_node_hours"] / r["node_hours"] if r["node_hours"] else 0.0
        print(f"{name:<38} {r['batch_jobs']:>9} {r['cancelled']:>9} {r['node_hours']:>8.1f} "
              f"{r['idle_node_hours']:>6.1f} ({idle_share:>3.0f}%) {r['mean_wait']:>8.1f} m {r['p95_wait']:>7.0f} m "
              f"{r['not_started']:>8}")
    print("wait = minutes from a task's creation to RUNNING; node-h = node-hours held by BatchJobs; "
          "idle = held with nothing running; not run = tasks never started.")


if __name__ == "__main__":
    main()
