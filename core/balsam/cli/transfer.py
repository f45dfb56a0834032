"""``balsam transfer ls``: the stage-in/stage-out items of jobs, with their state, tries and error."""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

import click

from . import JOB_ID, newest_pages
from ._site_selector import format_table, site_filter, site_option, watch_output

#: Above this many jobs, ``job ls`` reads their sites' items in one paged listing instead of by job ids.
MANY_JOBS = 2000
#: The ``transfer_info`` keys shown as progress.
PROGRESS_KEYS = ("files_done", "files_transferred", "files", "bytes", "bytes_transferred")


def _states() -> list[str]:
    from balsam.states import TransferItemState

    return [s.value for s in TransferItemState]


def transfer_summary(items: list[dict]) -> dict[int, str]:
    """``{job id: "in 1/2 out 0/1"}``: done/total per direction (``!`` marks an item in error)."""
    totals: dict[int, Counter] = {}
    for item in items:
        counts = totals.setdefault(int(item["job_id"]), Counter())
        direction = item["direction"]
        counts[(direction, "total")] += 1
        if item["state"] == "done":
            counts[(direction, "done")] += 1
        if item["state"] == "error":
            counts[(direction, "error")] += 1
    summary = {}
    for job_id, counts in totals.items():
        parts = []
        for direction in ("in", "out"):
            total = counts[(direction, "total")]
            if total:
                mark = "!" if counts[(direction, "error")] else ""
                parts.append(f"{direction} {counts[(direction, 'done')]}/{total}{mark}")
        summary[job_id] = " ".join(parts)
    return summary


def job_transfer_summary(job_ids: list[int], site_ids: Optional[list[int]] = None) -> dict[int, str]:
    """Transfer progress of these jobs: their items by id in chunks of 500 jobs, or, for many jobs,
    every item of their sites in one paged listing."""
    from balsam.api import TransferItem

    items: list[dict] = []
    if site_ids and len(job_ids) > MANY_JOBS:
        wanted = set(job_ids)
        items = [d for d in (_as_dict(t) for t in TransferItem.objects.filter(site_id=site_ids)) if d["job_id"] in wanted]
    else:
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start:start + 500]
            items.extend(_as_dict(t) for t in TransferItem.objects.filter(job_id=chunk))
    return transfer_summary(items)


def _as_dict(item: Any) -> dict:
    def plain(v: Any) -> Any:
        return getattr(v, "value", v)

    return {f: plain(getattr(item, f)) for f in ("id", "job_id", "direction", "local_path", "remote_path",
                                                  "location_alias", "state", "task_id", "transfer_info")}


def _progress(item_info: dict) -> str:
    info = item_info.get("task") or {}
    if info.get("files") is not None:
        done = info.get("files_done", info.get("files_transferred"))
        if done is not None:
            return f"task: {done}/{info['files']} files"
    if info.get("bytes_transferred") is not None:
        return f"task: {info['bytes_transferred']} bytes"
    return ""


def _note(item: dict) -> str:
    info = item.get("transfer_info") or {}
    if item["state"] == "pending" and info.get("error") and info.get("reason"):
        # Its retry is due and it waits for something (a free slot, a location refusing): that
        # first, the last try's error after it. The error first read as if it still waited for
        # its retry time, long past ("disk quota exceeded (retry after <an hour ago>)").
        return f"{info['reason']} (last try failed: {info['error']})"
    if item["state"] == "error" or (item["state"] == "pending" and info.get("error")):
        when = f" (retry after {info['retry_after'][:19]})" if item["state"] == "pending" and info.get("retry_after") else ""
        return f"{info.get('error', '')}{when}"
    reason, progress = info.get("reason"), _progress(info)
    if reason and progress and item["state"] in ("active", "inactive"):
        # Why the task is not moving, and how far it got.
        return f"{reason} ({progress})"
    return reason or progress


@click.group("transfer")
def transfer() -> None:
    """Stage-in and stage-out items of jobs."""


@transfer.command("ls")
@click.option("--job", "job_ids", multiple=True, type=JOB_ID, help="Only this job's items (repeatable)")
@click.option("-s", "--state", "states", multiple=True, type=click.Choice(_states()), help="Only items in this state (repeatable)")
@click.option("-d", "--direction", type=click.Choice(["in", "out"]), default=None, help="Only stage-ins or stage-outs")
@click.option("-n", "--num", "limit", default=None, type=click.IntRange(min=1), help="Only the newest N items")
@click.option("--by-state", is_flag=True, help="Count items per direction and state")
@site_option
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds until Ctrl-C")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds between redraws (--watch)")
@click.option("--rounds", default=None, type=click.IntRange(min=1), hidden=True, help="Stop --watch after N redraws (tests)")
def ls(job_ids: tuple[int, ...], states: tuple[str, ...], direction: Optional[str], limit: Optional[int], by_state: bool,
       site_selector: str, watch: bool, interval: float, rounds: Optional[int]) -> None:
    """List transfer items with their state, task, tries and error or progress."""
    # Items of jobs named by id need no default site restriction; an explicit --site still narrows.
    filters: dict[str, Any] = site_filter(site_selector) if not job_ids or site_selector else {}
    if job_ids:
        filters["job_id"] = list(job_ids)
    if states:
        filters["state"] = list(states)
    if direction:
        filters["direction"] = direction

    def draw() -> None:
        _list(filters, limit, by_state)

    if watch:
        watch_output(draw, interval, title="balsam transfer ls", iterations=rounds)
    else:
        draw()


def _list(filters: dict[str, Any], limit: Optional[int], by_state: bool) -> None:
    from balsam.api import TransferItem

    query = TransferItem.objects.filter(**filters)
    if by_state:
        # One count request per direction and state (limit=0): every item was read to be counted
        # here (10^5 items of a campaign's stage-ins: 1.8 s and 190 MB for one line).
        directions = [filters["direction"]] if filters.get("direction") else ["in", "out"]
        wanted = [s for s in _states() if s in filters["state"]] if filters.get("state") else _states()
        rows = [[d, s, n] for d in directions for s in wanted
                if (n := TransferItem.objects.filter(**{**filters, "direction": d, "state": [s]}).count())]
        click.echo(format_table(["Direction", "State", "Count"], rows, right={2}) if rows else "No matching transfer items.")
        return
    if limit:
        # The newest N: one request of N (ordering=-id) up to a page, else from the N-th newest id on.
        items = sorted((_as_dict(t) for page, _ in newest_pages(query, limit, query.page_size) for t in page),
                       key=lambda t: t["id"])
    else:
        items = sorted((_as_dict(t) for t in query), key=lambda t: t["id"])
    if not items:
        click.echo("No matching transfer items.")
        return
    rows = []
    for t in items:
        info = t["transfer_info"] or {}
        remote = f"{t['location_alias']}:{t['remote_path']}"
        rows.append([t["id"], t["job_id"], t["direction"], t["state"], t["local_path"], remote, t["task_id"] or "-",
                     info.get("attempts", 0), _note(t)])
    click.echo(format_table(["ID", "Job", "Dir", "State", "Local", "Remote", "Task", "Tries", "Progress / error"],
                            rows, right={0, 1, 7}))


commands = [transfer]
