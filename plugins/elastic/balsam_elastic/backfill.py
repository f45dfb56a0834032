"""``backfill``: Balsam 0.7's elastic-queue policy (the default strategy), with its faults fixed.

Per cycle (inventory §9):

1. The module's own BatchJobs queued longer than ``max_queue_wait_time_min`` missed the window
   they were sized for: they are cancelled (``pending_deletion``) and no longer count below; so
   are those the scheduler module holds back in pending_submission (a queue at a scheduler limit,
   ``BatchJobView.held``) more than ``max_queue_wait_time_min`` after their creation.
   BatchJobs it did not create (by hand, queue_maintainer's) are never cancelled (0.7 cancelled a
   hand-made BatchJob after 10 minutes), nor are regular-queue ones as stale (see 3).
2. ``reserved`` = nodes of the module's BatchJobs that wait or run, less those the scheduler says can
   never start (``BatchJobView.never_starts``: they hold a place in the queue, no nodes); at
   ``max_queued_jobs`` of them (those included), nothing more is submitted, nor, while one that can
   never start waits, a request at least as large as it (the same limit would hold it back).
3. Nothing runnable: nothing to submit, and its own BatchJobs that certainly have not started
   (waiting for their submission, held back or not, or queued per this cycle's status poll;
   regular-queue ones too) are cancelled: they would start later, for a backlog long gone, and
   run nothing. When the idle nodes cover the runnable footprint, the newest such ones the others
   can spare are. The module reads each again just before the PATCH and keeps one submitted or
   started since the snapshot (``still_cancellable``), as for ``simple``'s surplus blocks.
4. The window: with ``use_backfill`` the scheduler's windows for the submit queue, less the nodes
   its own window-fitted BatchJobs requested and have not taken yet (the scheduler shows them idle
   until those start; a queued one keeps its claim until a status poll shows it running), at least ``min_wall_time_min`` long, long enough for a BatchJob whose launcher leases the
   shortest runnable job (``request_min_for``: the launcher's margins and start-up) plus ``wall_time_pad_min``, and as wide
   as the smallest runnable job and the submit queue's ``min_nodes``, the largest by nodes x minutes; without it, no
   window: 5 sizes the request as for a window of ``max_num_nodes`` x ``max_wall_time_min`` (so
   ``max_wall_time_min - wall_time_pad_min`` long, at most ``max_num_nodes`` wide), and it waits in
   the regular queue (never cancelled as stale).
5. ``idle = reserved - running footprint``; when the runnable footprint exceeds it, one BatchJob of
   ``min(max(min_num_nodes, shortfall), window nodes, max_num_nodes)`` nodes for the window's
   length less ``wall_time_pad_min``.
6. Optional (``regular_queue_after_min`` > 0; 0.7 had no such thing): no window fits and a runnable
   job has waited that long: one BatchJob in the regular queue (``max_wall_time_min`` long, never
   cancelled as stale, one waiting at a time).

Fixed against 0.7: a fractional shortfall is rounded up (0.7 truncated 2.5 to 2); the request is at
least as wide as the smallest runnable job (0.7 could submit a BatchJob that can run nothing); the
wall time never exceeds ``max_wall_time_min`` (0.7 asked for a Slurm partition's whole 24 h limit);
a stale BatchJob's nodes are not counted as reserved in the cycle that cancels it; and the windows
come from every scheduler driver (0.7's PBS and Slurm drivers returned none, so it never fired).
"""

from __future__ import annotations

from typing import Any, Optional

from balsam.models import BackfillWindow
from balsam.states import BatchJobState

from .strategy import (STRATEGY_SECTION_KEYS, BatchJobView, Decision, Snapshot, Strategy, Submission, never_starts_reason,
                       nodes_for, not_started_newest_first, request_min_for, show_figure)


class BackfillStrategy(Strategy):
    name = "backfill"
    uses_backfill_windows = True
    reads_section_keys = frozenset(STRATEGY_SECTION_KEYS)
    #: With use_backfill false every request lasts max_wall_time_min - wall_time_pad_min, as wide as
    #: the shortfall (min_num_nodes to max_num_nodes), in the regular queue: no window is chosen
    #: (min_wall_time_min), no request is fitted to one and so none is stale (max_queue_wait_time_min),
    #: and the regular-queue fallback, taken when no window fits, never is (regular_queue_after_min).
    window_only_keys = frozenset({"min_wall_time_min", "max_queue_wait_time_min", "regular_queue_after_min"})
    widest_request_key = "max_num_nodes"

    def decide(self, snapshot: Snapshot) -> Decision:
        s = self.settings
        backlog = snapshot.backlog
        stale_queued = tuple(b.id for b in snapshot.batch_jobs if self.stale_queued(b))
        stale_held = tuple(b.id for b in snapshot.batch_jobs if self.stale_held(b))
        stale = stale_queued + stale_held
        live = [b for b in snapshot.reserving if b.id not in stale]
        # One the scheduler says can never start keeps its place in the queue but brings no nodes:
        # counted, it covered the backlog for ever ("16 idle >= 16 needed" with none coming).
        never = [b for b in live if b.never_starts]
        reserved = sum(b.num_nodes for b in live if not b.never_starts)
        idle = reserved - backlog.running_footprint
        numbers: list[tuple[str, Any]] = [
            ("runnable", backlog.runnable_count), ("runnable_footprint", backlog.runnable_footprint),
            ("running_footprint", backlog.running_footprint), ("reserved", reserved), ("idle", max(idle, 0.0)),
            ("batch_jobs", f"{len(live)}/{s.max_queued_jobs}"),
        ]
        if stale_queued:
            numbers.append(("stale", f"queued>{s.max_queue_wait_time_min}min"))
        if stale_held:
            numbers.append(("stale_held", f"pending>{s.max_queue_wait_time_min}min"))
        if never:
            numbers.append(("never_starts", len(never)))
        # Its requests not started yet (waiting for submission, held back at a queue limit, or
        # queued per the poll; regular-queue ones too) that the runnable jobs no longer need (the
        # backlog is gone, or the other nodes cover it): they would start later and run nothing.
        unneeded = self.unneeded_requests(live, idle, backlog)
        if unneeded:
            numbers.append(("unneeded", len(unneeded)))

        def nothing(reason: str) -> Decision:
            why = [f"{len(stale_queued)} BatchJob(s) queued past max_queue_wait_time_min"] if stale_queued else []
            if stale_held:
                why.append(f"{len(stale_held)} BatchJob(s) held in pending_submission past max_queue_wait_time_min")
            if unneeded:
                why.append(f"{len(unneeded)} BatchJob(s) not started yet that no runnable job needs")
            return Decision(cancel=stale + unneeded, reason="; ".join(why + [reason]), numbers=tuple(numbers))

        # Nothing runnable first: at max_queued_jobs with an empty backlog, the line said
        # "max_queued_jobs reached", as if work were waiting for room.
        if backlog.runnable_count <= 0:
            return nothing(backlog.nothing_runnable())
        if len(live) >= s.max_queued_jobs:
            return nothing(f"max_queued_jobs reached ({len(live)} of {s.max_queued_jobs} BatchJobs wait or run)")
        if backlog.runnable_footprint <= idle + 1e-9:
            # Figures shown as in the numbers (show_figure: float noise rounded off), so that a sum in
            # another row order does not change the line.
            return nothing(f"idle nodes cover the backlog ({show_figure(max(idle, 0.0))} idle >= "
                           f"{show_figure(backlog.runnable_footprint)} needed)")
        smallest = max(1, backlog.min_runnable_nodes)
        if smallest > s.max_num_nodes:
            return nothing(f"the smallest runnable job needs {smallest} nodes, more than max_num_nodes ({s.max_num_nodes})")
        window, why_none = self.choose_window(snapshot, smallest)
        numbers.append(("window", window if window is not None else "none"))
        shortfall = nodes_for(backlog.runnable_footprint - max(idle, 0.0))
        if window is None:
            return self.regular_queue_fallback(snapshot, live, shortfall, smallest, why_none, stale, numbers) or nothing(why_none)
        # Raised to the queue's min_nodes here (a window narrower than it fits nothing, see
        # choose_window), so that the decision and its log line say the size that is submitted.
        num_nodes = max(min(max(s.min_num_nodes, shortfall, smallest), window.num_nodes, s.max_num_nodes),
                        snapshot.min_nodes)
        wall_time = min(window.wall_time_min - s.wall_time_pad_min, s.max_wall_time_min)
        numbers.append(("shortfall", shortfall))
        blocked = snapshot.never_starting_as_large(num_nodes, wall_time)
        if blocked is not None:
            return nothing(never_starts_reason(blocked))
        # Without use_backfill the request is not fitted to a window: it waits its turn in the
        # regular queue, and waiting longer than max_queue_wait_time_min makes it no less useful.
        request = Submission(num_nodes=num_nodes, wall_time_min=wall_time, regular_queue=not s.use_backfill)
        return Decision(
            submit=(request,), cancel=stale, numbers=tuple(numbers),
            reason=(f"{show_figure(backlog.runnable_footprint)} runnable nodes of work, {show_figure(max(idle, 0.0))} idle"
                    + (f"; {len(stale)} stale BatchJob(s) cancelled" if stale else "")),
        )

    def stale_queued(self, b: BatchJobView) -> bool:
        """Its own window-fitted BatchJob queued past ``max_queue_wait_time_min``: it missed the window."""
        return (b.owned and b.state == BatchJobState.queued and not b.regular_queue and b.queued_time_min is not None
                and b.queued_time_min > self.settings.max_queue_wait_time_min and not b.withdrawn)

    def stale_held(self, b: BatchJobView) -> bool:
        """Its own window-fitted BatchJob that the scheduler module holds back in pending_submission
        (the queue is at a scheduler limit) more than ``max_queue_wait_time_min`` after it was
        created: it missed the window as surely as one queued that long, and once the hold lifted
        it was submitted for the window (and backlog) of long ago."""
        return (b.owned and b.state == BatchJobState.pending_submission and not b.regular_queue and bool(b.held)
                and b.age_min is not None and b.age_min > self.settings.max_queue_wait_time_min)

    def unneeded_requests(self, live: list[BatchJobView], idle: float, backlog: Any) -> tuple[int, ...]:
        """Its own BatchJobs that certainly have not started (waiting for their submission, or
        queued per this cycle's status poll: ``not_started_newest_first``, as ``simple`` sheds its
        surplus blocks) and that nothing runnable needs: all of them without a runnable job; else
        the newest ones whose nodes the idle nodes can spare while still covering the runnable
        footprint. Regular-queue ones included: kept, one started hours later, for a backlog long
        gone, and ran nothing (audit: "BJ 4 kind=regular_queue ran=16.0s jobs=0"). BatchJobs it did
        not create are never candidates; the module reads each candidate again before its PATCH
        (``still_cancellable``) and keeps one submitted or started since the snapshot."""
        if backlog.runnable_count > 0 and backlog.runnable_footprint > idle + 1e-9:
            return ()
        waiting = not_started_newest_first(live)
        if backlog.runnable_count <= 0:
            return tuple(b.id for b in waiting)
        spare = idle - backlog.runnable_footprint
        cancel = []
        for b in waiting:
            if b.num_nodes <= spare + 1e-9:
                cancel.append(b.id)
                spare -= b.num_nodes
        return tuple(cancel)

    def widest_request_nodes(self) -> int:
        return self.settings.max_num_nodes

    def longest_request_min(self) -> int:
        s = self.settings
        # Fitted to a window: up to max_wall_time_min (a long window, or the regular-queue fallback);
        # without use_backfill always max_wall_time_min - wall_time_pad_min.
        return s.max_wall_time_min if s.use_backfill else s.max_wall_time_min - s.wall_time_pad_min

    def regular_queue_fallback(self, snapshot: Snapshot, live: list, shortfall: int, smallest: int, why_none: str,
                               stale: tuple[int, ...], numbers: list) -> Optional[Decision]:
        """``regular_queue_after_min``: a backlog that no window has served for that long gets one
        BatchJob in the regular queue (one at a time). None: the option is off or not due yet."""
        s = self.settings
        waited = snapshot.backlog.oldest_runnable_wait_min
        if not s.regular_queue_after_min or waited < s.regular_queue_after_min:
            return None
        numbers.append(("oldest_wait_min", waited))
        if any(b.regular_queue and b.state != BatchJobState.running for b in live):
            return Decision(cancel=stale, numbers=tuple(numbers),
                            reason=f"{why_none}; a regular-queue BatchJob already waits")
        numbers.append(("shortfall", shortfall))
        request = Submission(num_nodes=max(min(max(s.min_num_nodes, shortfall, smallest), s.max_num_nodes),
                                           snapshot.min_nodes),
                             wall_time_min=s.max_wall_time_min, regular_queue=True)
        blocked = snapshot.never_starting_as_large(request.num_nodes, request.wall_time_min)
        if blocked is not None:
            return Decision(cancel=stale, numbers=tuple(numbers), reason=f"{why_none}; {never_starts_reason(blocked)}")
        # The minutes grow every cycle: a submission the module then holds back (a BatchJob held at
        # a queue limit, a back-off) kept this reason, and its unchanged idle line was logged at
        # INFO every cycle. clock_text: not compared (oldest_wait_min shows them too).
        waited_text = f"a runnable job has waited {waited:.0f} min"
        return Decision(submit=(request,), cancel=stale, numbers=tuple(numbers), clock_text=(waited_text,),
                        reason=f"{why_none}, and {waited_text} (regular_queue_after_min {s.regular_queue_after_min})")

    def choose_window(self, snapshot: Snapshot, smallest: int) -> tuple[Optional[BackfillWindow], str]:
        s = self.settings
        if not s.use_backfill:
            return BackfillWindow(num_nodes=s.max_num_nodes, wall_time_min=s.max_wall_time_min), ""
        if snapshot.windows is None:
            return None, f"backfill windows unavailable ({snapshot.windows_error or 'scheduler error'})"
        if not snapshot.windows:
            return None, f"no backfill window in queue {s.submit_queue!r}"
        windows, requested, elsewhere = self.unclaimed_windows(snapshot)
        # A launcher leases only jobs of wall_time_min <= its whole minutes left before its margins
        # (its batch script's -t, then its own safety margin: request_min_for): a window whose
        # request is shorter than that for the shortest runnable job (0: a job without one fits
        # any) gives a BatchJob that runs nothing and leaves, every cycle (one minute longer than
        # the job was not enough: the margins take 5 minutes of a 30-minute BatchJob).
        shortest = snapshot.backlog.min_runnable_wall_time_min
        shortest_request = request_min_for(shortest) if shortest else 0
        need_min = max(s.min_wall_time_min, shortest_request + s.wall_time_pad_min if shortest else 0)
        # Nor narrower than the queue's min_nodes (Polaris prod: 10): the module raises every request
        # to it, and a 10-node request for a 4-node window does not fit it. It waited in the regular
        # queue, claimed no window (unclaimed_windows), so the next cycle requested another, one
        # each cycle up to max_queued_jobs, each cancelled as stale and requested again.
        need_nodes = max(smallest, snapshot.min_nodes)
        fitting = [w for w in windows if w.wall_time_min >= need_min and w.num_nodes >= need_nodes]
        if not fitting:
            shown = ", ".join(f"{w.num_nodes}x{w.wall_time_min}min" for w in snapshot.windows)
            claimed = f", {requested} nodes of them already requested by its BatchJobs not started yet" if requested else ""
            held = [b for b in snapshot.batch_jobs if b.owned and b.held and not b.regular_queue and not self.stale_held(b)]
            if requested and held:
                # Not coming soon: the scheduler module holds them back (a queue at a scheduler limit).
                claimed += f" ({len(held)} of them held back, BatchJob {held[0].id}: {held[0].held})"
            if elsewhere:
                claimed += (f", {elsewhere} nodes by the user's other jobs that wait in the queue (another site's "
                            f"requests, jobs submitted by hand)")
            why = (f"; the shortest runnable job needs {shortest} min, which a BatchJob of {shortest_request} min "
                   f"or more leases (its launcher stops jobs a safety margin before its end), plus "
                   f"wall_time_pad_min {s.wall_time_pad_min}" if need_min > s.min_wall_time_min else "")
            if need_nodes > smallest:
                why += f"; queue {s.submit_queue!r} takes no job of fewer than {need_nodes} nodes (min_nodes)"
            return None, (f"no backfill window fits (need >= {need_nodes} nodes x >= {need_min} min{why}; "
                          f"windows {shown}{claimed})")
        return max(fitting, key=lambda w: (w.num_nodes * w.wall_time_min, w.num_nodes)), ""

    def unclaimed_windows(self, snapshot: Snapshot) -> tuple[list[BackfillWindow], int, int]:
        """The windows less the nodes its own window-fitted BatchJobs have asked for and not taken
        yet (waiting for submission, or queued and neither seen running by this cycle's status poll
        nor queued past ``max_queue_wait_time_min``), and how many
        nodes that took off. The scheduler keeps showing a window's nodes idle until the BatchJob
        sized to it starts (a scheduler-module cycle plus the scheduler's backfill pass): without
        this, every cycle until then requested the same window again. Each request is taken off the
        window it was fitted to: among those that still hold it, one whose length less
        ``wall_time_pad_min`` is the request's wall time, else the largest by nodes x minutes (as
        it was chosen). One that no window holds claims none (the nodes it was sized for are gone:
        it will be stale). Then the user's other jobs waiting in the queue
        (:attr:`Snapshot.others_waiting`) take theirs the same way: another site of the user on the
        same machine sees the same windows, and both sites requested each one (one request then
        waited past max_queue_wait_time_min, cancelled). The third number: the nodes they took."""
        s = self.settings
        left = [[w.num_nodes, w.wall_time_min] for w in snapshot.windows or ()]
        requested = 0
        # A queued one keeps its claim until a poll shows it running (its nodes then left the
        # windows). A failed poll, or one that does not list it yet (just submitted), says
        # nothing: releasing the claim then requested the same window again, every such cycle.
        # One queued past max_queue_wait_time_min is stale; one that can never start takes no nodes,
        # nor does one withdrawn (deleted if it still waits; if it started, its nodes left the windows),
        # nor one held, waiting for a dependency or a begin time.
        # The site's BatchJobs made by hand that run the backlog (in the snapshot, not its own) claim
        # too, if queued per this cycle's poll within max_queue_wait_time_min: left out (their
        # scheduler ids are the site's, so not among others_waiting either), their window was
        # requested again. (One waiting for its submission is not sized to any window.)
        def claims(b: BatchJobView) -> bool:
            if b.never_starts or b.withdrawn or b.waits_for_other:
                return False
            if not b.owned:
                return (b.state == BatchJobState.queued and b.polled_state == BatchJobState.queued
                        and b.queued_time_min is not None and b.queued_time_min <= s.max_queue_wait_time_min)
            return not b.regular_queue and (
                (b.state == BatchJobState.pending_submission and not self.stale_held(b))
                or (b.state == BatchJobState.queued and b.polled_state != BatchJobState.running
                    and (b.queued_time_min is None or b.queued_time_min <= s.max_queue_wait_time_min)))

        waiting = (b for b in snapshot.batch_jobs if claims(b))
        def claim(num_nodes: int, wall_time_min: int) -> int:
            holders = [w for w in left if w[0] >= num_nodes and w[1] >= wall_time_min]
            if not holders:
                return 0
            window = max(holders, key=lambda w: (w[1] - s.wall_time_pad_min == wall_time_min, w[0] * w[1], w[0]))
            window[0] -= num_nodes
            return num_nodes

        for b in sorted(waiting, key=lambda b: b.id):
            requested += claim(b.num_nodes, b.wall_time_min)
        elsewhere = sum(claim(o.num_nodes, o.wall_time_min) for o in snapshot.others_waiting)
        return [BackfillWindow(num_nodes=n, wall_time_min=m) for n, m in left if n > 0], requested, elsewhere
