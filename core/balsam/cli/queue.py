"""``balsam queue submit|ls|term``: BatchJobs (allocation requests) of your sites."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Optional

import click

from ..models import MAX_TAG_FILTERS, SUBMITTED_BY_KEY
from . import BATCH_JOB_ID, SCHEDULER_ID
from ._site_selector import (dump_yaml, format_table, json_option, json_record, parse_key_values, resolve_one_site,
                             silent_for, site_filter, site_names, site_option, site_option_with, write_json_array)

ACTIVE_STATES = ("pending_submission", "queued", "running", "pending_deletion")
#: Widest reason shown in the table (``-v`` prints status_info whole).
REASON_CHARS = 60
#: How ``queue ls`` shows (and ``--submitted-by`` names) a BatchJob without that mark: one its user
#: submitted (``balsam queue submit``, the API), or one of a program that does not set it.
NOT_MARKED = "-"
#: Widest submitted_by shown in the table.
SUBMITTED_BY_CHARS = 24
#: ``queue ls`` without --history also names the BatchJobs that failed to submit this recently: one
#: created from Python with a queue the site refuses is accepted by the API (as in 0.7) and refused
#: by the agent, and the bare "No active batch jobs" left its user waiting for it.
RECENT_SUBMIT_FAILURES = dt.timedelta(hours=24)
#: Widest reason in those lines.
FAILURE_REASON_CHARS = 200


def submitted_by(status_info: dict[str, Any]) -> str:
    """The BatchJob's ``status_info["submitted_by"]`` as one word (a table cell that whitespace-split
    parsing keeps whole), :data:`NOT_MARKED` without one. Whole: ``--submitted-by`` matches it."""
    return "_".join(str(status_info.get(SUBMITTED_BY_KEY) or "").split()) or NOT_MARKED


def submitted_by_cell(name: str) -> str:
    return name if len(name) <= SUBMITTED_BY_CHARS else name[: SUBMITTED_BY_CHARS - 3] + "..."


def waiting_reason(state: str, status_info: dict[str, Any]) -> str:
    """Why a BatchJob is not running, in a few words: the scheduler's reason while it is queued, the
    agent's ``waiting`` note or last error before submission, the error of a refused one; while
    queued, the agent's scheduler-status outage (``scheduler_status_error``) where nothing else says."""
    if state == "queued":
        keys: tuple[str, ...] = ("scheduler_reason", "error", "scheduler_status_error")
    elif state == "pending_submission":
        keys = ("waiting", "error")
    elif state == "submit_failed":
        keys = ("error",)
    else:
        return ""
    text = next((str(status_info[k]) for k in keys if status_info.get(k)), "")
    text = " ".join(text.split())
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def parse_partition(text: str) -> dict[str, Any]:
    """``MODE:NODES[:KEY=VALUE...]`` -> ``{"job_mode", "num_nodes", "filter_tags"}``."""
    parts = text.split(":")
    if len(parts) < 2:
        raise click.UsageError(f"--part {text!r}: expected MODE:NODES[:KEY=VALUE...] (e.g. mpi:2:role=leader)")
    mode, nodes, *tags = parts
    if mode not in ("mpi", "serial"):
        raise click.UsageError(f"--part {text!r}: job mode must be mpi or serial, not {mode!r}")
    if not nodes.isdecimal() or int(nodes) < 1:
        raise click.UsageError(f"--part {text!r}: node count must be a positive integer, not {nodes!r}")
    return {"job_mode": mode, "num_nodes": int(nodes), "filter_tags": parse_key_values(tuple(tags), f"--part {text}")}


def check_filter_tag_count(filter_tags: dict[str, str], texts: tuple[str, ...], partitions: list[dict[str, Any]]) -> None:
    """The BatchJob's launchers acquire with its ``--tag`` filter tags, a partition's (``--part``)
    merged with them: at most :data:`MAX_TAG_FILTERS` (the server refuses the BatchJob otherwise,
    naming its body's fields, not the options). ``texts``: the ``--part`` options as given."""
    if len(filter_tags) > MAX_TAG_FILTERS:
        raise click.BadParameter(f"{len(filter_tags)} tags (a KEY=VALUE given twice counted once): a launcher "
                                 f"acquires jobs with at most {MAX_TAG_FILTERS} filter tags", param_hint="'-tag' / '--tag'")
    for text, partition in zip(texts, partitions):
        merged = {**filter_tags, **partition["filter_tags"]}
        if len(merged) > MAX_TAG_FILTERS:
            raise click.BadParameter(f"{text!r}: {len(merged)} filter tags (--tag: {len(filter_tags)}, this --part's: "
                                     f"{len(partition['filter_tags'])}; keys counted once): a launcher acquires jobs "
                                     f"with at most {MAX_TAG_FILTERS}", param_hint="'-p' / '--part'")


@click.group("queue")
def queue() -> None:
    """Request allocations (BatchJobs) at your sites, list and cancel them."""


@queue.command("submit")
@click.option("-n", "--num-nodes", required=True, type=click.IntRange(min=1), help="Nodes to request")
@click.option("-t", "--wall-time-min", required=True, type=click.IntRange(min=1), help="Wall time to request, in minutes")
@click.option("-q", "--queue", "queue_name", required=True, help="Scheduler queue (one of the site's allowed_queues)")
@click.option("-A", "--project", required=True, help="Project/allocation to charge")
@click.option("-j", "--job-mode", required=True, type=click.Choice(["mpi", "serial"]),
              help="Launcher job mode: mpi (one launch per job) or serial (many single-node jobs per worker)")
@click.option("-tag", "--tag", "tags", multiple=True, help="KEY=VALUE: only run jobs with this tag (repeatable)")
@click.option("-p", "--part", "parts", multiple=True, help="Partition MODE:NODES[:KEY=VALUE...] (repeatable)")
@click.option("-x", "--extra-param", "extra", multiple=True, help="KEY=VALUE for the job template (repeatable)")
@site_option_with("One site: this, or an id, name or path fragment (default: this site)")
def submit(num_nodes: int, wall_time_min: int, queue_name: str, project: str, job_mode: str, tags: tuple,
           parts: tuple, extra: tuple, site_selector: str) -> None:
    """Request an allocation; the site agent submits it to the scheduler."""
    from balsam.api import BatchJob

    filter_tags = parse_key_values(tags, "--tag")
    partitions = [parse_partition(p) for p in parts]
    check_filter_tag_count(filter_tags, parts, partitions)
    site = resolve_one_site(site_selector)
    batch_job = BatchJob(
        site_id=site.id, num_nodes=num_nodes, wall_time_min=wall_time_min, queue=queue_name, project=project,
        job_mode=job_mode, filter_tags=filter_tags,
        partitions=partitions or None,
        optional_params=parse_key_values(extra, "--extra-param"),
    )
    try:
        batch_job.validate(site.allowed_queues, site.allowed_projects, site.optional_batch_job_params)
    except ValueError as exc:
        hint = "" if site.allowed_queues else " (the site has no allowed_queues yet: check settings.yml and run `balsam site sync`)"
        raise click.ClickException(f"Refused by site {site.name}: {exc}{hint}") from None
    batch_job.save()
    click.echo(dump_yaml(batch_job.display_dict()), nl=False)
    warnings = authorization_warnings(site) + filter_tags_warnings(site, batch_job.filter_tags or {})
    for warning in warnings + server_address_warnings(site):
        click.echo(f"Warning: {warning}", err=True)


def filter_tags_warnings(site: Any, batch_job_tags: dict) -> list[str]:
    """The site agent submits only BatchJobs whose filter_tags include the site's (settings.yml's
    ``filter_tags``): say so when this one's do not. Only where the site's settings.yml can be read
    here (the site directory on this machine); else nothing is said."""
    from balsam.config.settings import SettingsError, load_settings

    path = Path(str(site.path)) / "settings.yml"
    try:
        if not path.is_file():
            return []
        site_tags = load_settings(path, only=("filter_tags",)).filter_tags or {}
    except (OSError, SettingsError):
        return []
    if all(batch_job_tags.get(k) == v for k, v in site_tags.items()):
        return []
    def show(tags: dict) -> str:
        return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(tags.items())) + "}"

    flags = " ".join(f"--tag {k}={v}" for k, v in sorted(site_tags.items()))
    return [f"this BatchJob's filter_tags {show(batch_job_tags)} do not include site {site.name}'s filter_tags "
            f"{show(site_tags)}: its agent will not submit it (it stays pending_submission). Submit with {flags}"]


def server_address_warnings(site: Any) -> list[str]:
    """A launcher reaches the server at the api root of the agent's login (its BatchJob credential
    copies it): a unix:// socket or loopback address works for the local scheduler's launchers,
    which run on this host, but not from a batch scheduler's compute nodes, where the launcher
    would retry for minutes and fail. Said when the site's settings.yml can be read here."""
    from balsam.api import get_default_client
    from balsam.config.settings import SettingsError, load_settings

    from .launcher import SHARED_SERVER_DOCS, reachable_from_this_host_only

    path = Path(str(site.path)) / "settings.yml"
    try:
        if not path.is_file():
            return []
        scheduler = load_settings(path, only=("scheduler",), log_warnings=False).scheduler.name
    except (OSError, SettingsError, AttributeError):
        return []
    api_root = str(getattr(get_default_client(), "api_root", "") or "")
    if scheduler == "local" or not api_root or not reachable_from_this_host_only(api_root):
        return []
    return [f"site {site.name}'s scheduler is {scheduler}, but its launchers will use the server at {api_root}, which "
            f"only this host can reach: from a compute node the launcher cannot reach it (see {SHARED_SERVER_DOCS})"]


#: A site whose agent has not refreshed its record for this long has no agent running (0.7's "active").
AGENT_SILENT_AFTER = dt.timedelta(minutes=2)


def authorization_warnings(site: Any) -> list[str]:
    """What could leave this allocation without a valid credential: no agent (nothing submits it
    or renews its launcher's credential) or no refresh credential (the agent stops when its access
    token expires). The agent's silence is real time (:func:`silent_for`), across a daylight
    saving change too."""
    from balsam.api import get_default_client
    from balsam.client import APIError

    warnings = []
    last = site.last_refresh
    silent = silent_for(last)
    if silent is None or silent > AGENT_SILENT_AFTER:
        seen = f"since {last:%Y-%m-%d %H:%M}" if last else "ever"
        warnings.append(f"no site agent has reported for site {site.name} {seen}: nothing will submit this BatchJob "
                        "or keep its launcher's credential valid. Start it: `balsam site start`")
    try:
        refresh = get_default_client().get("/auth/credentials", params={"kind": "refresh", "active": "true", "limit": 0})
    except APIError:
        return warnings  # a server without credential routes: nothing to tell
    if int(refresh.get("count", 0)) == 0:
        warnings.append("your account has no active refresh credential: a site agent logged in without one stops when "
                        "its access token expires, and then nothing renews the launcher's credential. Run "
                        "`balsam login` where the agent runs, then restart it")
    return warnings


def recent_submit_failures(batch_jobs: list[Any], now: dt.datetime) -> list[Any]:
    """The submit_failed BatchJobs whose ``status_info.error_time`` (ISO, UTC) is within
    :data:`RECENT_SUBMIT_FAILURES` of ``now`` (aware), oldest first. One without a readable time is
    left out: nothing says it is recent."""
    recent = []
    for b in batch_jobs:
        text = str((b.status_info or {}).get("error_time") or "")
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            continue
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        if now - when <= RECENT_SUBMIT_FAILURES:
            recent.append((when, b.id, b))
    return [b for _when, _id, b in sorted(recent, key=lambda r: (r[0], r[1]))]


def echo_submit_failures(failures: list[Any]) -> None:
    """One line each, on stderr: stdout stays the 0.7 table (or line) that scripts parse."""
    if not failures:
        return
    names = site_names(sorted({b.site_id for b in failures}))
    hours = int(RECENT_SUBMIT_FAILURES.total_seconds() // 3600)
    click.echo(f"Failed to submit in the last {hours} hours (`balsam queue ls --history` lists all batch jobs):",
               err=True)
    for b in failures:
        reason = " ".join(str((b.status_info or {}).get("error") or "no reason recorded").split())
        if len(reason) > FAILURE_REASON_CHARS:
            reason = reason[: FAILURE_REASON_CHARS - 3] + "..."
        nodes = "node" if b.num_nodes == 1 else "nodes"
        click.echo(f"  BatchJob {b.id} (site {names.get(b.site_id, b.site_id)}, queue {b.queue}, project {b.project}, "
                   f"{b.num_nodes} {nodes}): {reason}", err=True)


@queue.command("ls")
@click.option("-n", "--num", default=0, type=click.IntRange(min=0), help="Show only the last N")
@click.option("-h", "--history", is_flag=True,
              help="Include finished and failed batch jobs (-h here means --history, as in Balsam 0.7; --help for help)")
@click.option("-v", "--verbose", is_flag=True, help="Every field (YAML)")
@click.option("--scheduler-id", "scheduler_id", default=None, type=SCHEDULER_ID, help="Only the batch job with this scheduler id")
@click.option("--scheduler_id", "scheduler_id_07", default=None, type=SCHEDULER_ID, hidden=True,
              help="Balsam 0.7 spelling of --scheduler-id")
@click.option("--submitted-by", "submitted_by_names", multiple=True, metavar="NAME",
              help=f"Only batch jobs whose status_info.{SUBMITTED_BY_KEY} is NAME (e.g. an agent module's); "
                   f"'{NOT_MARKED}': only those without one, e.g. your own (repeatable)")
@site_option
@json_option
def ls(num: int, history: bool, verbose: bool, scheduler_id: Optional[int], scheduler_id_07: Optional[int],
       submitted_by_names: tuple, site_selector: str, as_json: bool) -> None:
    """List batch jobs (active ones unless --history / -h).

    A "submitted_by" column appears when a batch job was created by a program that marks its own
    (status_info.submitted_by, e.g. an agent module); "-" for the others. A "reason" column appears
    when a job waits for a reason the scheduler gave (e.g. Slurm's PartitionNodeLimit), was refused,
    or failed to submit; -v shows the whole status_info. Without --history, the batch jobs that
    failed to submit in the last 24 hours follow, one line each with the reason (on stderr).
    """
    from balsam.api import BatchJob

    if scheduler_id is not None and scheduler_id_07 is not None and scheduler_id != scheduler_id_07:
        raise click.UsageError("--scheduler-id and --scheduler_id disagree; give one")
    scheduler_id = scheduler_id if scheduler_id is not None else scheduler_id_07
    filters: dict[str, Any] = site_filter(site_selector)
    if not history:
        filters["state"] = list(ACTIVE_STATES)
    if scheduler_id is not None:
        filters["scheduler_id"] = scheduler_id
    query = BatchJob.objects.filter(**filters)
    if num and not submitted_by_names:
        # The last N only (one request of N): `-h -n 5` read a long-lived site's whole history.
        # --submitted-by is applied here, after reading, so it still reads them all.
        query = query.order_by("-id")[:num]
    batch_jobs = sorted(query, key=lambda b: b.id)
    failures: list[Any] = []
    if not history and scheduler_id is None and not as_json:
        # One query; the server filters no status_info key, so recency is read here.
        failed = BatchJob.objects.filter(**{**filters, "state": ["submit_failed"]})
        failures = recent_submit_failures(list(failed), dt.datetime.now(dt.timezone.utc))
    if submitted_by_names:  # the server filters no status_info key: read from the one listing
        batch_jobs = [b for b in batch_jobs if submitted_by(b.status_info or {}) in submitted_by_names]
        failures = [b for b in failures if submitted_by(b.status_info or {}) in submitted_by_names]
    if num:
        batch_jobs = batch_jobs[-num:]
    if as_json:
        write_json_array(json_record(b) for b in batch_jobs)
        return
    if not batch_jobs:
        if submitted_by_names:
            which = "batch jobs" if history else "active batch jobs"
            # "-" selects the unmarked ones: "submitted by -." read as a program named "-".
            named = [name for name in dict.fromkeys(submitted_by_names) if name != NOT_MARKED]  # once each, in order
            parts = [f"submitted by {' or '.join(named)}"] if named else []
            if NOT_MARKED in submitted_by_names:
                parts.append("that no program marked (`--submitted-by -`)")
            click.echo(f"No {which} {', nor any '.join(parts)}.")
        elif scheduler_id is not None:
            # The filter named: "No active batch jobs" read as no batch job at all at the site.
            click.echo(f"No batch jobs with scheduler id {scheduler_id}." if history else
                       f"No active batch jobs with scheduler id {scheduler_id} (`--history` includes the ended ones).")
        elif history:
            click.echo("No batch jobs.")
        else:
            click.echo("No active batch jobs.  Use --history option to list completed batch jobs.")
        echo_submit_failures(failures)
        return
    if verbose:
        click.echo("---\n".join(dump_yaml(b.display_dict()) for b in batch_jobs), nl=False)
        echo_submit_failures(failures)
        return
    names = site_names(sorted({b.site_id for b in batch_jobs}))
    headers = ["id", "site", "scheduler_id", "state", "filter_tags", "project", "queue", "num_nodes",
               "wall_time_min", "job_mode"]
    rows = [
        [b.id, names.get(b.site_id, b.site_id), b.scheduler_id if b.scheduler_id is not None else "",
         b.state.value, " ".join(f"{k}={v}" for k, v in b.filter_tags.items()), b.project, b.queue, b.num_nodes,
         b.wall_time_min, b.job_mode.value]
        for b in batch_jobs
    ]
    # The 0.7 columns stay as they were (0.7 scripts parse them); the columns after them only when
    # there is something to show: submitted_by, then the reason (free text, last).
    origins = [submitted_by(b.status_info or {}) for b in batch_jobs]
    if any(origin != NOT_MARKED for origin in origins):
        headers.append("submitted_by")
        for row, origin in zip(rows, origins):
            row.append(submitted_by_cell(origin))
    reasons = [waiting_reason(b.state.value, b.status_info or {}) for b in batch_jobs]
    if any(reasons):
        headers.append("reason")
        for row, reason in zip(rows, reasons):
            row.append(reason)
    click.echo(format_table(headers, rows, right={0, 2, 7, 8}))
    echo_submit_failures(failures)


@queue.command("term")
@click.argument("scheduler_id", type=SCHEDULER_ID, required=False)
@click.option("--id", "batch_job_id", type=BATCH_JOB_ID, default=None, help="BatchJob id (instead of the scheduler id)")
@site_option_with("Sites to look for SCHEDULER_ID (or the --id) in: all, active, this, or comma-separated ids / "
                  "names / path fragments (default: every site)")
def term(scheduler_id: Optional[int], batch_job_id: Optional[int], site_selector: str) -> None:
    """Cancel a batch job (by scheduler id, or --id): the site agent deletes it from the queue."""
    from balsam.api import BatchJob

    if (scheduler_id is None) == (batch_job_id is None):
        raise click.UsageError("give a SCHEDULER_ID or --id BATCH_JOB_ID")
    if batch_job_id is not None:
        matches = list(BatchJob.objects.filter(id=batch_job_id))
        what = f"id {batch_job_id}"
        selected = site_filter(site_selector).get("site_id") if site_selector else None
        if matches and selected is not None and matches[0].site_id not in selected:
            # --site restricts --id as it does for jobs (it used to be ignored: another site's BatchJob was ended).
            site_id = matches[0].site_id
            raise click.ClickException(f"BatchJob {batch_job_id} is at site {site_names([site_id]).get(site_id, site_id)} "
                                       f"(id {site_id}), not at --site {site_selector}")
    else:
        matches = list(BatchJob.objects.filter(scheduler_id=scheduler_id, **site_filter(site_selector or "all")))
        what = f"scheduler id {scheduler_id}"
    if not matches:
        raise click.ClickException(f"no BatchJob with {what}")
    if len(matches) > 1:
        raise click.ClickException(f"{len(matches)} BatchJobs have {what} (at sites {sorted({b.site_id for b in matches})}); use --site")
    batch_job = matches[0]
    if batch_job.state.value not in ("pending_submission", "queued", "running"):
        click.echo(f"BatchJob is not queued or running (state {batch_job.state.value})")
        return
    # A pending_submission BatchJob has no scheduler id yet ("scheduler id None" said nothing).
    submitted = (f"scheduler id {batch_job.scheduler_id}" if batch_job.scheduler_id is not None
                 else "not submitted yet")
    batch_job.state = "pending_deletion"
    batch_job.save()
    # Scheduler ids of different clusters overlap: say which site's BatchJob it was.
    site_name = site_names([batch_job.site_id]).get(batch_job.site_id, batch_job.site_id)
    click.echo(f"Marked BatchJob {batch_job.id} ({submitted}) of site {site_name} for deletion")


commands = [queue]
