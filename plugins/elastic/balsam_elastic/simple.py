"""``simple``: fixed-size blocks, as many as the backlog asks for, up to a maximum (like Parsl's
``simple`` strategy).

Per cycle: ``demand`` = runnable + running footprint (nodes); the blocks wanted are
``ceil(demand * parallelism / nodes_per_block)`` kept within ``[max(min_blocks, 1), max_blocks]``
while there is demand, ``min_blocks`` when there is none. Fewer blocks waiting or running than
wanted: submit the difference at once (never past ``max_queued_jobs``). More: cancel the surplus
blocks that certainly have not started (newest first): its own, waiting for submission or queued per
this cycle's status poll. A running block, one the poll did not see queued, and a BatchJob it did
not create are never cancelled (the latter still count as blocks); a launcher leaves on its own
after ``launcher.idle_ttl_sec`` without work. A block the scheduler says can never start (its
driver's ``never_starts``) is no block, but holds a place among ``max_queued_jobs``, and while one
waits no more blocks are submitted (they would never start either). Backfill windows are not consulted.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import attrs

from balsam.options import option

from .strategy import (Decision, Snapshot, Strategy, StrategyError, Submission, never_starts_reason,
                       not_started_newest_first)


@attrs.frozen
class SimpleOptions:
    nodes_per_block: int = option(1, "Nodes of each BatchJob (block).")
    wall_time_min: int = option(60, "Wall time of each block (minutes).")
    min_blocks: int = option(0, "Blocks kept waiting or running even without work.")
    max_blocks: int = option(4, "Most blocks waiting or running at once.")
    parallelism: float = option(
        1.0, "Fraction of the backlog's node footprint to provision (1: all of it; 0.5: half, letting jobs queue).",
    )


class SimpleStrategy(Strategy):
    name = "simple"
    options_schema = SimpleOptions
    #: Its blocks are strategy_options; none of the backfill keys (nodes, wall times, waits) apply.
    reads_section_keys: ClassVar[frozenset[str]] = frozenset()
    widest_request_key: ClassVar[str] = "strategy_options.nodes_per_block"

    def __init__(self, settings: Any, options: Any = None) -> None:
        super().__init__(settings, options)
        o = self.options
        for key in ("nodes_per_block", "wall_time_min", "max_blocks"):
            if getattr(o, key) < 1:
                raise StrategyError("must be at least 1", key=key)
        if not 0 <= o.min_blocks <= o.max_blocks:
            raise StrategyError(f"must be between 0 and max_blocks ({o.max_blocks})", key="min_blocks")
        if not o.parallelism > 0:
            raise StrategyError("must be greater than 0", key="parallelism")
        if not math.isfinite(o.parallelism):  # .inf: every cycle with demand failed (ceil of infinity)
            raise StrategyError("must be a finite number", key="parallelism")

    def queue_problem(self, queue: str, max_nodes: Any, max_walltime: Any) -> Any:
        # simple counts full blocks of nodes_per_block x wall_time_min: a block clamped to the
        # queue's limits each cycle would leave the demand it was counted for without nodes.
        for key, limit_name, limit in (("nodes_per_block", "max_nodes", max_nodes),
                                       ("wall_time_min", "max_walltime", max_walltime)):
            value = getattr(self.options, key)
            if limit is not None and value > int(limit):
                return f"{key} {value} exceeds queue {queue!r}'s {limit_name} {int(limit)} (scheduler.allowed_queues)"
        return None

    def longest_request_min(self) -> int:
        return self.options.wall_time_min

    def widest_request_nodes(self) -> int:
        return self.options.nodes_per_block

    def decide(self, snapshot: Snapshot) -> Decision:
        o = self.options
        backlog = snapshot.backlog
        # A block the scheduler says can never start brings no nodes, but holds a place in the queue.
        blocks = snapshot.capacity
        queued = len(snapshot.reserving)
        demand = backlog.runnable_footprint + backlog.running_footprint
        if demand > 1e-9:
            blocks_needed = demand * o.parallelism / o.nodes_per_block
            # Capped before rounding: a huge parallelism (1e308) made it infinite, and ceil() raised.
            wanted = o.max_blocks if not blocks_needed < o.max_blocks else math.ceil(round(blocks_needed, 9))
            wanted = min(max(wanted, o.min_blocks, 1), o.max_blocks)
        else:
            wanted = o.min_blocks
        numbers = (("runnable", backlog.runnable_count), ("demand_footprint", demand), ("blocks", len(blocks)),
                   ("wanted", wanted), ("max_blocks", o.max_blocks), ("block", f"{o.nodes_per_block}x{o.wall_time_min}min"))
        if queued > len(blocks):
            numbers += (("never_starts", queued - len(blocks)),)
        if len(blocks) > wanted:
            waiting = not_started_newest_first(blocks)
            surplus = tuple(b.id for b in waiting[: len(blocks) - wanted])
            if surplus:
                return Decision(cancel=surplus, numbers=numbers,
                                reason=f"{len(blocks)} blocks for a demand of {wanted}: cancelling blocks not started yet")
            return Decision(numbers=numbers, reason=(f"{len(blocks)} blocks, {wanted} wanted: the surplus is not ours to "
                                                     f"cancel or may have started, and drains by idle_ttl_sec"))
        if len(blocks) == wanted:
            return Decision(numbers=numbers,
                            reason=backlog.nothing_runnable() if demand <= 1e-9 else f"{wanted} blocks cover the demand")
        if backlog.runnable_count and backlog.min_runnable_nodes > o.nodes_per_block:
            return Decision(numbers=numbers, reason=(f"the smallest runnable job needs {backlog.min_runnable_nodes} nodes, "
                                                     f"more than nodes_per_block ({o.nodes_per_block})"))
        room = self.settings.max_queued_jobs - queued
        count = min(wanted - len(blocks), room)
        if count <= 0:
            return Decision(numbers=numbers, reason=f"max_queued_jobs reached ({queued} of {self.settings.max_queued_jobs})")
        blocked = snapshot.never_starting_as_large(o.nodes_per_block, o.wall_time_min)
        if blocked is not None:
            return Decision(numbers=numbers, reason=never_starts_reason(blocked))
        block = Submission(num_nodes=o.nodes_per_block, wall_time_min=o.wall_time_min)
        return Decision(submit=(block,) * count, numbers=numbers,
                        reason=f"{len(blocks)} blocks for a demand of {wanted}")
