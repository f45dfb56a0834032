"""The placement loop shared by the job modes: put pending jobs on free resources, start them.

Both built-in modes keep a deque of prepared jobs that are leased but not started. When resources
were freed or jobs arrived, :func:`place_pending` walks the deque once: each job is given a
:class:`~balsam.launcher.node_manager.Placement` by the NodeManager and handed to the mode's
``start`` callback (which spawns it locally, or sends it to another node's worker); a job that does
not fit goes back to the end of the deque. A demand that did not fit is not tried again in the same
pass (resources only grow when jobs end), and the pass can stop after ``max_misses`` jobs in a row
did not fit: the serial mode keeps thousands of identical tasks pending, and once a node is full
walking the rest of the deque only costs time.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Optional

from .app_run import PreparedJob
from .node_manager import InsufficientResources, NodeManager, Placement

logger = logging.getLogger(__name__)

#: ``start(prepared, placement)``: launch the job (raise to fail it; the placement is then freed).
StartFn = Callable[[PreparedJob, Placement], None]
#: ``fail(job_id, reason)``: report the job FAILED.
FailFn = Callable[[int, str], None]


def place_pending(
    pending: "deque[PreparedJob]",
    node_manager: NodeManager,
    start: StartFn,
    fail: FailFn,
    *,
    max_misses: Optional[int] = None,
    room: Optional[int] = None,
) -> int:
    """Start as many of ``pending`` as fit (at most ``room``); returns how many started.

    ``max_misses``: stop after this many jobs in a row did not fit (None: one full pass).
    """
    started = 0
    misses = 0
    full_for: set[Any] = set()  # demands that did not fit in this pass: they will not fit again in it
    for _ in range(len(pending)):
        if room is not None and started >= room:
            break
        if max_misses is not None and misses >= max_misses:
            break
        prepared = pending.popleft()
        if prepared.demand in full_for:
            pending.append(prepared)
            misses += 1
            continue
        try:
            placement = node_manager.assign(prepared.id, prepared.demand)
        except InsufficientResources:
            pending.append(prepared)
            full_for.add(prepared.demand)
            misses += 1
            continue
        misses = 0
        try:
            start(prepared, placement)
        except Exception as exc:
            node_manager.free(prepared.id)
            reason = f"An exception occurred while preparing the launch: {type(exc).__name__}: {exc}"
            logger.error("job %s FAILED: %s", prepared.id, reason)
            fail(prepared.id, reason)
            continue
        started += 1
    return started
