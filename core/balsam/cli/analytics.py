"""``balsam analytics throughput|utilization``: campaign figures from the EventLog, as a table or a PNG.

The series come from :mod:`balsam.analytics` (the same functions as the Python API and the web
dashboard). The table splits the campaign's time span into ``--rows`` equal intervals; ``--plot
FILE.png`` also draws the whole series with matplotlib (``pip install 'balsam[plot]'``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

import click

from balsam.analytics import _instant, _seconds, from_instant  # standard library only: no start-up cost

from ._site_selector import UpperChoice, current_site_id, format_table, site_filter, site_names, site_option


def _state_type() -> click.Choice:
    """The job states, case-insensitive as ``job ls --state``: a wrong one is a usage error (exit 2),
    not the server's HTTP 422."""
    from balsam.states import JobState

    return UpperChoice([s.value for s in JobState])


def _event_filters(site_selector: str, tags: tuple[str, ...]) -> dict[str, Any]:
    tag_pairs = None
    if tags:
        # job ls's check of --tag (its count against the API's limit, naming the option), a usage
        # error before any request. Imported here: the job commands' module takes longer to load
        # than this one, and is needed only here.
        from .job import tag_filters

        tag_pairs = tag_filters(tags, colon_hint="the events of such jobs cannot be selected by tag (narrow by --site)")
    filters: dict[str, Any] = dict(site_filter(site_selector))
    if tag_pairs is not None:
        filters["tags"] = tag_pairs
    return filters


def _edges(start: dt.datetime, end: dt.datetime, rows: int) -> list[dt.datetime]:
    """``rows`` equal intervals of real time: naive ``start + step * i`` ignored daylight saving's
    fall-back (an hour short, the repeated hour's edges out of order)."""
    first, step = _instant(start), _seconds(start, end) / rows
    # The last edge is ``end`` itself: the division rounds, and an edge 1 us short left the jobs of
    # the last bulk update (one timestamp) out of the cumulative table.
    return [start] + [from_instant(first + step * i, start) for i in range(1, rows)] + [end]


def _fmt(when: dt.datetime, span: "dt.timedelta | None" = None) -> str:
    """A time of a table; to the millisecond when the table spans under a minute (its rows would
    all read the same second)."""
    if span is not None and span < dt.timedelta(minutes=1):
        return when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return when.strftime("%Y-%m-%d %H:%M:%S")


def _not_drawn(plot_path: Optional[str]) -> str:
    """What becomes of ``--plot FILE`` when there is nothing to draw: a user looked for the file."""
    return f" Nothing to draw: {plot_path} was not written." if plot_path else ""


def _load_pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException("--plot needs matplotlib: pip install 'balsam[plot]'") from None
    return plt


def _save(fig: Any, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    click.echo(f"Wrote {path}")


def _selection_text(site_selector: str, tags: tuple[str, ...], filters: dict[str, Any]) -> str:
    """What was selected, by name: ``site big (current)``, ``sites a, b (active)``, ``all sites``,
    then the tags. ``filters`` are the query's (``site_id`` as :func:`site_filter` resolved it)."""
    from balsam.models import SITE_SELECTOR_ACTIVE, SITE_SELECTOR_THIS

    selector = (site_selector or "").strip()
    ids = filters.get("site_id")
    if "site_id" not in filters:
        where = "all sites"
    elif not ids:
        where = "no active site" if selector in ("", SITE_SELECTOR_ACTIVE) else "no site"
    else:
        names = site_names(list(ids))
        where = ("site " if len(ids) == 1 else "sites ") + ", ".join(str(names.get(i, i)) for i in ids)
        if selector == SITE_SELECTOR_THIS or (not selector and current_site_id() is not None):
            where += " (current)"
        elif selector in ("", SITE_SELECTOR_ACTIVE):
            where += " (active)"
    return ", ".join(p for p in (where, " ".join(tags)) if p)


@click.group("analytics")
def analytics() -> None:
    """Throughput and utilization of a campaign (tables, or figures with --plot)."""


@analytics.command("throughput")
@site_option
@click.option("-t", "--tag", "tags", multiple=True, help="KEY=VALUE job tag filter (repeatable)")
@click.option("--to-state", default="JOB_FINISHED", show_default=True, type=_state_type(),
              help="Count jobs reaching this state")
@click.option("--rows", default=12, show_default=True, type=click.IntRange(min=1, max=1000), help="Intervals in the table")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False, writable=True), help="Also draw the figure to FILE.png")
def throughput(site_selector: str, tags: tuple, to_state: str, rows: int, plot_path: Optional[str]) -> None:
    """Jobs finished over time: per interval, cumulative, and the rate."""
    from balsam.analytics import step_at, throughput_report
    from balsam.api import EventLog

    plt = _load_pyplot() if plot_path else None
    filters = _event_filters(site_selector, tags)
    events = EventLog.objects.filter(to_state=to_state.upper(), **filters)
    times, counts = throughput_report(events, to_state=to_state.upper())
    if not times:
        click.echo(f"No job reached {to_state.upper()} yet ({_selection_text(site_selector, tags, filters)})."
                   + _not_drawn(plot_path))
        return
    start, end = times[0], times[-1]
    table = []
    span = _seconds(start, end)
    edges = _edges(start, end, rows) if span > 0 else [start, end]
    for lo, hi in zip(edges, edges[1:]):
        before = step_at(times, counts, lo) if _seconds(start, lo) > 0 else 0
        total = step_at(times, counts, hi)
        minutes = _seconds(lo, hi) / 60
        table.append([_fmt(hi, dt.timedelta(seconds=span)), total - before, total,
                      f"{(total - before) / minutes:.1f}" if minutes > 0 else ""])
    click.echo(format_table(["Until", "In interval", "Total", "Per minute"], table, right={1, 2, 3}))
    # N arrivals span N - 1 intervals; under a second, a rate says nothing.
    rate = f", {(len(times) - 1) / span * 60:.1f} per minute on average" if span >= 1 and len(times) > 1 else ""
    click.echo(f"{len(times)} jobs reached {to_state.upper()} between {_fmt(start)} and {_fmt(end)}{rate}")
    if plt is not None:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.step(times, counts, where="post", color="#0b5fad")
        ax.set_xlabel("time")
        ax.set_ylabel(f"jobs {to_state.upper()}")
        ax.set_title(f"Throughput ({_selection_text(site_selector, tags, filters)})")
        ax.grid(alpha=0.3)
        fig.autofmt_xdate()
        _save(fig, plot_path)


@analytics.command("utilization")
@site_option
@click.option("-t", "--tag", "tags", multiple=True, help="KEY=VALUE job tag filter (repeatable)")
@click.option("--count-jobs", is_flag=True, help="Count running jobs instead of the nodes they use")
@click.option("--rows", default=12, show_default=True, type=click.IntRange(min=1, max=1000), help="Intervals in the table")
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False, writable=True), help="Also draw the figure to FILE.png")
def utilization(site_selector: str, tags: tuple, count_jobs: bool, rows: int, plot_path: Optional[str]) -> None:
    """Busy nodes (running jobs) against the nodes held by BatchJobs, over time."""
    from balsam.analytics import (available_nodes, batch_jobs_serving, first_runs_query, time_average,
                                  utilization_report)
    from balsam.api import BatchJob, EventLog

    plt = _load_pyplot() if plot_path else None
    filters = _event_filters(site_selector, tags)
    events = list(EventLog.objects.filter(to_state="RUNNING", **filters)) + list(
        EventLog.objects.filter(from_state="RUNNING", **filters))
    busy_t, busy_y = utilization_report(events, node_weighting=not count_jobs)
    bj_filters = {k: v for k, v in filters.items() if k == "site_id"}
    batch_jobs = batch_jobs_serving(BatchJob.objects.filter(**bj_filters), filters.get("tags"))
    avail_t, avail_y = available_nodes(batch_jobs, first_runs=first_runs_query(batch_jobs, EventLog))
    if not busy_t and not avail_t:
        click.echo(f"No job has run yet and no BatchJob has started ({_selection_text(site_selector, tags, filters)})."
                   + _not_drawn(plot_path))
        return
    if not busy_t:
        # A table of zeros would not say that nothing was selected (a tag no job has, say).
        held = (f"; its BatchJobs held up to {max(avail_y):g} nodes between {_fmt(avail_t[0])} and {_fmt(avail_t[-1])}"
                if avail_y else "")
        click.echo(f"No job has run yet ({_selection_text(site_selector, tags, filters)}){held}." + _not_drawn(plot_path))
        return

    start = min(busy_t[:1] + avail_t[:1], key=_instant)
    end = max(busy_t[-1:] + avail_t[-1:], key=_instant)
    unit = "jobs" if count_jobs else "nodes"
    table = []
    span = _seconds(start, end)
    edges = _edges(start, end, rows) if span > 0 else [start, end]
    for lo, hi in zip(edges, edges[1:]):
        busy, held = time_average(busy_t, busy_y, lo, hi), time_average(avail_t, avail_y, lo, hi)
        share = f"{100 * busy / held:.0f}%" if held > 0 and not count_jobs else ""
        table.append([_fmt(hi, dt.timedelta(seconds=span)), f"{busy:.1f}", f"{held:.1f}", share])
    click.echo(format_table(["Until", f"Busy {unit} (mean)", "Nodes held (mean)", "Utilization"], table, right={1, 2, 3}))
    peak = max(busy_y) if busy_y else 0
    click.echo(f"Peak: {peak:g} {unit} busy; {_fmt(start)} to {_fmt(end)}")
    if plt is not None:
        fig, ax = plt.subplots(figsize=(8, 4))
        if busy_t:
            ax.step(busy_t, busy_y, where="post", color="#1a7f37", label=f"busy {unit}")
        if avail_t:
            ax.step(avail_t, avail_y, where="post", color="#9a6700", linestyle="--", label="nodes held by BatchJobs")
        ax.set_xlabel("time")
        ax.set_ylabel(unit)
        ax.set_title(f"Utilization ({_selection_text(site_selector, tags, filters)})")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
        fig.autofmt_xdate()
        _save(fig, plot_path)


commands = [analytics]
