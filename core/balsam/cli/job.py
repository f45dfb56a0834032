"""``balsam job create|ls|modify|rm``."""

from __future__ import annotations

import array
import bisect
import collections
import itertools
import shlex
import sys
from typing import Any, Iterator, Optional

import click
import yaml

from ..models import MAX_TAG_FILTERS, workdir_problem
from . import APP_REF, JOB_ID, Interrupted, confirm_or_yes, newest_pages
from ._site_selector import (Progress, UpperChoice, dump_yaml, format_rows, format_table, is_active, json_option,
                             json_record, jsonable, parse_key_values, site_filter, site_option, table_widths,
                             watch_output, write_json_array)
from .transfer import job_transfer_summary

def _states() -> list[str]:
    from balsam.states import JobState

    return [s.value for s in JobState]


def _state_type() -> click.Choice:
    return UpperChoice(_states())


def _resolve_app(app_ref: str, site_selector: str) -> Any:
    from balsam.api import App

    if app_ref.isdecimal():
        try:
            return App.objects.get(id=int(app_ref))
        except App.DoesNotExist:
            raise click.UsageError(f"--app: no app with id {app_ref}") from None
    apps = list(App.objects.filter(name=app_ref, **site_filter(site_selector)))
    if not apps:
        raise click.UsageError(f"--app: no app named {app_ref!r} at the selected site(s) (see `balsam app ls --site=all`)")
    if len(apps) > 1:
        listing = ", ".join(f"id {a.id} (site {a.site_id})" for a in apps)
        raise click.UsageError(f"--app {app_ref!r} matches several apps: {listing}; use an id or --site")
    return apps[0]


def _state_filter(states: tuple[str, ...], excluded: tuple[str, ...]) -> dict[str, Any]:
    """The ``state`` / ``state__ne`` filter of ``-s STATE...`` and ``-ns STATE...``.

    The API takes a list of ``state`` values but one ``state__ne``: several excluded states are sent
    as the states left over, which is exact because the set of states is closed (JobState) and a
    job's state is never empty. A list left empty (``-s A -ns A``) matches no job."""
    wanted = list(dict.fromkeys(s.upper() for s in states))
    left_out = set(s.upper() for s in excluded)
    if wanted:
        return {"state": [s for s in wanted if s not in left_out]}
    if len(left_out) == 1:
        return {"state__ne": left_out.pop()}
    if left_out:
        return {"state": [s for s in _states() if s not in left_out]}
    return {}


def tag_filters(tags: tuple[str, ...], colon_hint: str = "select these jobs by --id") -> dict[str, str]:
    """The ``-t/--tag KEY=VALUE`` options as a ``tags`` filter, at most :data:`MAX_TAG_FILTERS` of
    them (the API's limit: all apply together, one clause each). Checked here, naming the option:
    the Python API's refusal named its own call (``Job.objects.filter(): at most 100 distinct tags
    filters``), which the user never wrote. ``colon_hint``: what the command offers instead of a
    tag key holding ':'."""
    pairs = parse_key_values(tags, "--tag")  # one value per key: its length counts distinct pairs
    for key, value in pairs.items():
        if ":" in key:
            # The API's filter is KEY:VALUE split at the first ':': `-t a:b=c` was sent as tag a =
            # "b:c", so `job rm -t a:b=c -y` deleted the jobs tagged a=b:c, not those tagged a:b=c.
            raise click.BadParameter(f"{key}={value}: a tag key holding ':' cannot be filtered on (the API reads "
                                     f"'{key}:{value}' as tag {key.partition(':')[0]!r} = "
                                     f"{key.partition(':')[2] + ':' + value!r}); {colon_hint}",
                                     param_hint="'-t' / '--tag'")
    if len(pairs) > MAX_TAG_FILTERS:
        raise click.BadParameter(f"{len(pairs)} tag filters (a KEY=VALUE given twice counted once): a query takes at "
                                 f"most {MAX_TAG_FILTERS}", param_hint="'-t' / '--tag'")
    return pairs


def _job_filters(ids: tuple[int, ...], tags: tuple[str, ...], states: tuple[str, ...], excluded: tuple[str, ...],
                 site_selector: str, workdir: Optional[str] = None, app_ref: Optional[str] = None) -> dict[str, Any]:
    filters: dict[str, Any] = {}
    tag_pairs = tag_filters(tags) if tags else None  # a usage error: before any request (the site's)
    # Jobs named by id need no default site restriction (an id is unique across sites), but an
    # explicit --site still narrows (and is checked) as it does without ids.
    if not ids or site_selector:
        filters.update(site_filter(site_selector))
    if ids:
        filters["id"] = list(ids)
    if tag_pairs is not None:
        filters["tags"] = tag_pairs
    filters.update(_state_filter(states, excluded))
    if workdir:
        filters["workdir__contains"] = workdir
    if app_ref:
        filters["app_id"] = _resolve_app(app_ref, site_selector).id
    return filters


@click.group("job")
def job() -> None:
    """Create, list, change and delete jobs."""


@job.command("create")
@click.option("-w", "--workdir", required=True, help="Working directory, relative to the site's data/")
@click.option("-a", "--app", "app_ref", required=True, type=APP_REF, help="App id or name")
@click.option("-tag", "--tag", "tags", multiple=True, help="KEY=VALUE tag (repeatable)")
@click.option("-p", "--param", "params", multiple=True, help="NAME=VALUE app parameter (repeatable)")
@click.option("-n", "--num-nodes", default=1, show_default=True, type=click.IntRange(min=1), help="Nodes the job runs on")
@click.option("-rpn", "--ranks-per-node", default=1, show_default=True, type=click.IntRange(min=1), help="MPI ranks per node")
@click.option("-tpr", "--threads-per-rank", default=1, show_default=True, type=click.IntRange(min=1), help="Threads (cores) per rank")
@click.option("-tpc", "--threads-per-core", default=1, show_default=True, type=click.IntRange(min=1), help="Hardware threads per core")
@click.option("-g", "--gpus-per-rank", default=0.0, show_default=True, type=click.FloatRange(min=0), help="GPUs per rank (may be fractional)")
@click.option("-npc", "--node-packing-count", default=1, show_default=True, type=click.IntRange(min=1), help="How many such jobs may share one node")
@click.option("-lp", "--launch-param", "launch_params", multiple=True, help="NAME=VALUE for the MPI launcher (repeatable)")
@click.option("-t", "--wall-time-min", default=1, show_default=True, type=click.IntRange(min=0), help="Expected run time in minutes (a launcher with less time left does not start it)")
@click.option("-pid", "--parent-id", "parent_ids", multiple=True, type=JOB_ID, help="Parent job id (repeatable)")
@click.option("-s", "--stage-data", "stage_data", multiple=True, help="SLOT=ALIAS:/abs/path transfer (repeatable)")
@click.option("-y", "--yes", is_flag=True, help="Create without asking for confirmation")
@site_option
def create(workdir: str, app_ref: str, tags: tuple, params: tuple, num_nodes: int, ranks_per_node: int,
           threads_per_rank: int, threads_per_core: int, gpus_per_rank: float, node_packing_count: int,
           launch_params: tuple, wall_time_min: int, parent_ids: tuple, stage_data: tuple, yes: bool,
           site_selector: str) -> None:
    """Create one job."""
    from balsam.api import Job

    problem = workdir_problem(workdir)
    if problem is not None:
        # The server's own rule: it refuses the same workdirs, but as an error of the request
        # (status 1, and '' read as '.'), where it is this option's value.
        raise click.UsageError(f"--workdir {problem}")
    app = _resolve_app(app_ref, site_selector)
    parameters = parse_key_values(params, "--param")
    missing = sorted(k for k, p in app.parameters.items() if p.required and k not in parameters)
    extra = sorted(set(parameters) - set(app.parameters))
    if missing:
        raise click.UsageError(f"app {app.name} needs parameter(s) {', '.join(missing)} (-p NAME=VALUE)")
    if extra:
        raise click.UsageError(f"app {app.name} has no parameter(s) {', '.join(extra)} (parameters: {', '.join(sorted(app.parameters)) or 'none'})")
    transfers = parse_key_values(stage_data, "--stage-data")
    t_missing = sorted(k for k, t in app.transfers.items() if t.required and k not in transfers)
    t_extra = sorted(set(transfers) - set(app.transfers))
    if t_missing:
        raise click.UsageError(f"app {app.name} needs transfer slot(s) {', '.join(t_missing)} (-s SLOT=ALIAS:/path)")
    if t_extra:
        # The option and the app's slots named, as for -p: "has no transfer slot(s) in" read as unfinished.
        raise click.UsageError(f"--stage-data: app {app.name} has no transfer slot(s) {', '.join(t_extra)} "
                               f"(transfer slots: {', '.join(sorted(app.transfers)) or 'none'})")
    if parent_ids:
        found = {j.id for j in Job.objects.filter(id=list(parent_ids))}
        absent = sorted(set(parent_ids) - found)
        if absent:
            raise click.UsageError(f"parent job(s) {', '.join(map(str, absent))} do not exist")
    new_job = Job(
        workdir=workdir, app_id=app.id, tags=parse_key_values(tags, "--tag"), parameters=parameters,
        num_nodes=num_nodes, ranks_per_node=ranks_per_node, threads_per_rank=threads_per_rank,
        threads_per_core=threads_per_core, gpus_per_rank=gpus_per_rank, node_packing_count=node_packing_count,
        launch_params=parse_key_values(launch_params, "--launch-param"), wall_time_min=wall_time_min,
        parent_ids=set(parent_ids), transfers=transfers or None,
    )
    if not yes:
        shown = new_job.display_dict()
        shown.pop("serialized_parameters", None)
        shown["parameters"] = parameters
        click.echo(dump_yaml({k: v for k, v in shown.items() if v not in (None, "")}))
        if not confirm_or_yes("Do you want to create this Job?"):
            click.echo("Not created.")
            return
    new_job.save()
    click.echo(f"Added Job id={new_job.id} ({new_job.state})")


@job.command("ls")
@click.option("-t", "--tag", "tags", multiple=True, help="KEY=VALUE tag filter (repeatable)")
@click.option("-s", "--state", "states", multiple=True, type=_state_type(),
              help="Only jobs in this state (repeatable: in any of them)")
@click.option("-ns", "--exclude-state", "excluded", multiple=True, type=_state_type(),
              help="Leave out jobs in this state (repeatable)")
@click.option("--id", "ids", multiple=True, type=JOB_ID, help="Job id (repeatable)")
@click.option("--by-state", is_flag=True, help="Count jobs per state")
@click.option("-w", "--workdir", default=None, help="Only workdirs containing this text")
@click.option("-a", "--app", "app_ref", default=None, type=APP_REF, help="App id or name")
@click.option("-n", "--num", "limit", default=None, type=click.IntRange(min=1), help="Show only the newest N jobs (listed oldest to newest)")
@site_option
@click.option("-v", "--verbose", is_flag=True, help="Every field of each job (YAML)")
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds until Ctrl-C (with --by-state or -n, "
              "else the newest 20 jobs)")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds between redraws (--watch)")
@click.option("--rounds", default=None, type=click.IntRange(min=1), hidden=True, help="Stop --watch after N redraws (tests)")
@json_option
def ls(tags: tuple, states: tuple, excluded: tuple, ids: tuple, by_state: bool,
       workdir: Optional[str], app_ref: Optional[str], limit: Optional[int], site_selector: str, verbose: bool,
       watch: bool, interval: float, rounds: Optional[int], as_json: bool) -> None:
    """List jobs."""
    if by_state and limit is not None:
        raise click.UsageError("--by-state and -n/--num do not go together: the counts per state have no row limit")
    if watch and as_json:
        raise click.UsageError("--watch and --json do not go together")
    filters = _job_filters(ids, tags, states, excluded, site_selector, workdir, app_ref)
    if not watch:
        _list_jobs(filters, by_state, limit, verbose, as_json)
        return
    if verbose:
        raise click.UsageError("--watch and -v do not go together")
    watch_output(lambda: _list_jobs(filters, by_state, limit or (None if by_state else 20), False),
                 interval, title="balsam job ls", iterations=rounds)


def _list_jobs(filters: dict[str, Any], by_state: bool, limit: Optional[int], verbose: bool,
               as_json: bool = False) -> None:
    from balsam.api import Job

    query = Job.objects.filter(**filters)
    if by_state:
        # one count request per state (limit=0): cheap even with millions of jobs
        wanted = filters.get("state", _states())
        counts = {}
        for s in wanted:
            if s == filters.get("state__ne"):
                continue
            if s in ("CREATED", "STAGED_OUT"):
                continue  # never stored
            counts[s] = Job.objects.filter(**{**filters, "state": s}).count()
        rows = [[s, counts.get(s, 0)] for s in _states() if verbose or counts.get(s)]
        if as_json:
            write_json_array({"state": state, "count": count} for state, count in rows)
            return
        click.echo(format_table(["State", "Count"], rows, right={1}))
        click.echo(f"Total: {sum(counts.values())}")
        return
    if limit and isinstance(filters.get("id"), list):
        # -n N of --id: the newest N (one request of N), listed oldest to newest
        newest = sorted(query.order_by("-id")[:limit], key=lambda j: j.id)
        pages: Iterator[tuple[list[Any], bool]] = iter([(newest, False)])
    elif limit:
        # The newest N, listed oldest to newest: one request up to a page; more in pages from the
        # N-th newest id, printed as they come (one request of N held them all: -n 100000 took
        # 340 MB, the whole listing 75 MB).
        pages = newest_pages(query, limit, LIST_PAGE_SIZE)
    else:
        pages = _job_pages(filters)
    if as_json:
        # The pages of the table (one request per 5,000 jobs), each written as it arrives.
        write_json_array(_job_json(j) for page, _ in pages for j in page)
        return
    first, more = next(pages, ([], False))
    if not first:
        # On stderr: stdout stays empty, as Balsam 0.7 left it (`[ -z "$(balsam job ls -s FAILED)" ]`
        # and `| wc -l` in scripts read the note as a job).
        click.echo("No matching jobs.", err=True)
        return
    if verbose:
        # YAML documents separated by "---", each written as soon as it is made (a page of them
        # takes seconds to make).
        jobs = itertools.chain(first, itertools.chain.from_iterable(page for page, _ in pages))
        for n, j in enumerate(jobs):
            click.echo(("---\n" if n else "") + _job_yaml(j), nl=False)
        return
    _print_job_table(first, more, (page for page, _ in pages), filters)


#: Jobs per request of ``job ls`` without ``-n``: each page is printed as it arrives (the first
#: line comes after one page, not after every job was read, and memory holds one page). Each page
#: comes with a count: at 100,000 jobs (SQLite, offset pages), pages of 1,000 took 2.5x the time
#: of one request (3.5x with a filter the counters cannot answer), pages of 5,000 1.1x (1.3x), the
#: first line after 0.3 s instead of 3 s, and a fifth of the memory.
LIST_PAGE_SIZE = 5000


def _job_pages(filters: dict[str, Any]) -> Iterator[tuple[list[Any], bool]]:
    """Every job matching ``filters``, in id order, a page (``LIST_PAGE_SIZE`` jobs, one request) at
    a time, each with whether more pages may follow.

    The pages after the first are read by id (``id__gt``, as any id-ordered query of the Python
    API): jobs that leave the filter while it lists (deleted, or a state change under
    ``--state RUNNING`` on a live campaign) move no other job, so none that still matches is
    missed or listed twice. A server without ``id__gt`` is read by offset."""
    from balsam.api import Job

    size = LIST_PAGE_SIZE
    ids = filters.get("id")
    if isinstance(ids, list):
        # --id: pages of the sorted ids themselves (never a list filter split over requests and
        # read whole for every slice).
        wanted = sorted(set(ids))
        size = min(size, Job.objects.all().filter_chunk_size)
        for start in range(0, len(wanted), size):
            chunk = wanted[start:start + size]
            page = list(Job.objects.filter(**{**filters, "id": chunk}).order_by("id")[:len(chunk)])
            if page:
                yield page, start + size < len(wanted)
        return
    for page, more in Job.objects.filter(**filters).order_by("id").pages(size):
        if page:  # an offset page of jobs listed already (an older server) adds nothing
            yield page, more


def _job_yaml(j: Any) -> str:
    data = j.display_dict()
    try:
        data["parameters"] = j.get_parameters()
    except Exception as exc:  # noqa: BLE001 - a broken payload must not stop the listing
        data["parameters"] = f"<cannot deserialize: {exc}>"
    try:
        return dump_yaml(data, default_flow_style=None)
    except yaml.YAMLError:
        # A parameter YAML cannot represent (a Path, a numpy number): it ended the whole listing
        # with "Error: cannot represent an object". Written as --json writes it instead.
        data["parameters"] = jsonable(data["parameters"])
        return dump_yaml(data, default_flow_style=None)


def _job_json(j: Any) -> dict[str, Any]:
    """One job as ``job ls --json`` writes it: the fields of ``-v``, its parameters decoded (here, as
    ``-v`` does) into JSON values, or ``null`` and ``parameters_error`` where they cannot be."""
    data = json_record(j)
    try:
        params = j.get_parameters()
    except Exception as exc:  # noqa: BLE001 - a broken payload must not stop the listing
        data["parameters"] = None
        data["parameters_error"] = f"cannot deserialize: {exc}"
        return data
    data["parameters"] = jsonable(params)  # each value as it can be: never null for one of them
    return data


def _print_job_table(first: list[Any], more: bool, pages: Iterator[list[Any]], filters: dict[str, Any]) -> None:
    """The table of ``first`` (header, widths) then of each later page as it arrives, in the columns
    of the first (a longer value overflows its column). Apps, site names and transfer progress are
    looked up per page, in bulk; an app or site seen on an earlier page is not asked for again."""
    from balsam.api import App, Site

    apps: dict[int, Any] = {}
    names: dict[int, str] = {}
    silent_sites: dict[int, Any] = {}  # id -> the record of a listed site whose agent is silent
    asked_apps: set[int] = set()
    asked_sites: set[int] = set()

    def transfers_of(page: list[Any], whole: bool = False) -> dict[int, str]:
        new_apps = sorted({j.app_id for j in page} - asked_apps)
        if new_apps:
            asked_apps.update(new_apps)
            apps.update((a.id, a) for a in App.objects.filter(id=new_apps))
        new_sites = sorted({a.site_id for a in apps.values()} - asked_sites)
        if new_sites:
            asked_sites.update(new_sites)
            # The records, not just their names: the note on jobs left for a silent agent reads
            # their last_refresh (the same one request).
            for site in Site.objects.filter(id=new_sites):
                names[site.id] = site.name
                if not is_active(site):
                    silent_sites[site.id] = site
        # Transfer progress ("in 1/1 out 0/1"), only for apps that declare transfer slots. A listing
        # of one page may read the items of its sites in one listing (job_transfer_summary, for
        # many jobs); a page of a longer one reads its own jobs' items only.
        with_slots = [j.id for j in page if getattr(apps.get(j.app_id), "transfers", None)]
        if not with_slots:
            return {}
        slot_sites = sorted({apps[j.app_id].site_id for j in page if getattr(apps.get(j.app_id), "transfers", None)})
        return job_transfer_summary(with_slots, slot_sites if whole else None)

    waiting: list[tuple[int, list[int]]] = []
    listed = _ListedStates()
    agent_left: collections.Counter = collections.Counter()  # (site id, state) -> jobs a silent agent must move

    def rows_of(page: list[Any], transfers: dict[int, str]) -> list[list[Any]]:
        rows = []
        for j in page:
            state = _state_name(j.state)
            listed.add(j.id, state)
            if state == "AWAITING_PARENTS":
                waiting.append((j.id, list(j.parent_ids or ())))
            a = apps.get(j.app_id)
            if a is not None and a.site_id in silent_sites and state in AGENT_MOVES:
                agent_left[(a.site_id, state)] += 1
            tag_text = " ".join(f"{k}={v}" for k, v in sorted(j.tags.items()))
            row = [j.id, names.get(a.site_id, a.site_id) if a else "?", a.name if a else j.app_id, j.workdir,
                   j.state.value if j.state else ""]
            rows.append(row + ([transfers.get(j.id, "")] if with_transfers else []) + [tag_text])
        return rows

    transfers = transfers_of(first, whole=not more)
    with_transfers = bool(transfers)
    if more and not with_transfers:
        # More pages follow, whose jobs may have transfer slots where the first page's have none:
        # then the column is there from the start (the layout does not change after the first page).
        with_transfers = _transfer_apps_in_scope(filters)
    rows = rows_of(first, transfers)
    headers = ["ID", "Site", "App", "Workdir", "State"] + (["Transfers"] if with_transfers else []) + ["Tags"]
    widths = table_widths(headers, rows)
    click.echo(format_table(headers, rows, right={0}, widths=widths))
    for page in pages:
        click.echo(format_rows(rows_of(page, transfers_of(page)), widths, right={0}))
    if waiting:
        _say_why_they_wait(waiting, listed)
    if agent_left:
        _say_agent_is_silent(agent_left, silent_sites)


#: Job states that only the site's agent moves on (stage-in and stage-out: ``transfers``; the
#: preprocess and postprocess hooks: ``processing``). Jobs in them at a site whose agent is not
#: running wait for it, with no other sign: their transfer items stay ``pending`` without a reason.
AGENT_MOVES = frozenset({"READY", "STAGED_IN", "RUN_DONE", "RUN_ERROR", "RUN_TIMEOUT", "POSTPROCESSED"})


def _say_agent_is_silent(agent_left: "collections.Counter", silent_sites: dict[int, Any]) -> None:
    """Under the table, on stderr, one line per site whose agent has not refreshed its record for
    ``ACTIVE_WINDOW`` (2 minutes; `balsam site ls` says "Active: No") and whose listed jobs wait for
    it: a user driving several sites saw READY jobs with stage-in ``in 0/1`` for ever, and nothing
    said that the agent of that site (stopped, its login node rebooted) was what they waited for."""
    for site_id in sorted({site_id for site_id, _state in agent_left}):
        site = silent_sites[site_id]
        counts = sorted((state, n) for (sid, state), n in agent_left.items() if sid == site_id)
        total = sum(n for _state, n in counts)
        states = ", ".join(f"{n} {state}" for state, n in counts)
        seen = f"since {site.last_refresh:%Y-%m-%d %H:%M}" if site.last_refresh else "ever"
        start = f"balsam site start {shlex.quote(str(site.path))}"
        click.echo(f"{total} of these jobs ({states}) {'waits' if total == 1 else 'wait'} for the agent of site "
                   f"{site.name}, which has not reported {seen}: start it (`{start}`); "
                   "`balsam site status` there says why it stopped.", err=True)


class _ListedStates:
    """The state of each job a table listed, by id, for the AWAITING_PARENTS note: a parent listed
    already (a whole campaign, `job ls --site S`) is not asked for again. 9 bytes a job (a dict
    takes about 70): a listing of a million jobs otherwise holds one page. The listing is in id
    order, so the ids arrive ascending and are found by bisection."""

    def __init__(self) -> None:
        self._ids = array.array("q")
        self._states = bytearray()
        self._names = _states()
        self._index = {name: i for i, name in enumerate(self._names)}

    def add(self, job_id: int, state: str) -> None:
        if self._ids and job_id <= self._ids[-1]:
            return  # an offset page (an older server) repeats jobs listed already
        self._ids.append(job_id)
        self._states.append(self._index.get(state, 255))

    def get(self, job_id: int) -> Optional[str]:
        """The state listed for ``job_id``, or None if it was not listed."""
        i = bisect.bisect_left(self._ids, job_id)
        if i == len(self._ids) or self._ids[i] != job_id:
            return None
        code = self._states[i]
        return self._names[code] if code < len(self._names) else ""


#: Parents outside the table that the AWAITING_PARENTS note reads at most (one request per 500):
#: the note is a hint under a listing, not a second listing. Beyond that it counts the jobs whose
#: parents it did not read.
NOTE_MAX_UNLISTED_PARENTS = 2000


def _say_why_they_wait(waiting: list[tuple[int, list[int]]], listed: _ListedStates) -> None:
    """Under a table that lists jobs in AWAITING_PARENTS (``waiting``: id, parent ids), what they
    wait for, in one line on stderr (the table on stdout stays one row per job for scripts): how
    many wait for a FAILED parent, which keeps them waiting until it is re-run, how many for
    nothing any more, how many for parents not finished yet. The rule is ``job show``'s
    (:func:`balsam.dependencies.parent_wait`: a JOB_FINISHED or deleted parent is not waited for).

    A parent in the table (``listed``) is taken from it; the others, up to
    NOTE_MAX_UNLISTED_PARENTS, are read in one query (the unfinished ones only, one request per
    filter_chunk_size (500) parents) tried once: the listing is complete whatever happens to the
    hint, so a server gone since (a restart) costs one line, not the client's retries and an exit
    status of 1. 10,000 parents and their 10,000 children (`job ls --site S`, SQLite) were listed
    with 20 requests for the note besides the listing's 9 (1.30 s instead of 0.86 s); now with none."""
    from balsam.api import Job
    from balsam.client import APIError, ServerUnavailable

    unlisted = sorted({p for _, parents in waiting for p in parents if listed.get(p) is None})
    unfinished: dict[int, str] = {}
    not_read = ""
    if len(unlisted) > NOTE_MAX_UNLISTED_PARENTS:
        not_read = f"more than {NOTE_MAX_UNLISTED_PARENTS:,} of them: not read"
    elif unlisted:
        client = Job._get_client()
        saved = client.retry_count
        client.retry_count = 0
        try:
            unfinished = {p.id: _state_name(p.state)
                          for p in Job.objects.filter(id=unlisted, state__ne="JOB_FINISHED")}
        except (ServerUnavailable, APIError) as exc:
            not_read = f"could not read their parents: {(str(exc).splitlines() or [type(exc).__name__])[0]}"
        finally:
            client.retry_count = saved

    failed_parents: set[int] = set()
    blocked = unread = 0
    free: list[int] = []
    for job_id, parents in waiting:
        states: list[tuple[int, str]] = []
        unknown = False
        for p in parents:
            state = listed.get(p)
            if state is None:
                if not_read:
                    unknown = True
                    continue
                state = unfinished.get(p)  # None: JOB_FINISHED or deleted
            if state is not None and state != "JOB_FINISHED":
                states.append((p, state))
        if any(state == "FAILED" for _, state in states):
            blocked += 1
            failed_parents.update(p for p, state in states if state == "FAILED")
        elif unknown:
            unread += 1
        elif not states:
            free.append(job_id)

    def ids(values: list[int]) -> str:
        return " ".join(f"-i {v}" for v in values[:5]) + (" ..." if len(values) > 5 else "")

    parts = []
    if blocked:
        parts.append(f"{blocked} for a FAILED parent, which keeps them waiting until it is re-run "
                     f"(`balsam job modify {ids(sorted(failed_parents))} -s RESTART_READY`)")
    if free:
        parts.append(f"{len(free)} for nothing any more (every parent that still exists is JOB_FINISHED: move them on "
                     f"with `balsam job modify {ids(free)} -s READY`)")
    if len(waiting) - blocked - len(free) - unread:
        parts.append(f"{len(waiting) - blocked - len(free) - unread} for parents not finished yet")
    if unread:
        parts.append(f"{unread} for parents outside this listing ({not_read})")
    click.echo(f"{len(waiting)} of these jobs {'waits' if len(waiting) == 1 else 'wait'} for their parents "
               f"(AWAITING_PARENTS): {'; '.join(parts)}. "
               "`balsam job show ID` lists a job's parents.", err=True)


def _transfer_apps_in_scope(filters: dict[str, Any]) -> bool:
    """Whether an app the listed jobs may belong to declares transfer slots (one request)."""
    from balsam.api import App

    if "app_id" in filters:
        scope = App.objects.filter(id=[filters["app_id"]])
    elif "site_id" in filters:
        scope = App.objects.filter(site_id=filters["site_id"])
    else:
        scope = App.objects.all()
    return any(getattr(a, "transfers", None) for a in scope)


@job.command("show")
@click.argument("job_ids", nargs=-1, required=True, type=JOB_ID, metavar="ID...")
@click.option("--lines", default=40, show_default=True, type=click.IntRange(min=1), help="Lines of the error tail to show")
def show(job_ids: tuple[int, ...], lines: int) -> None:
    """One job in full: fields, state history with times, the error of a failure, where job.out is."""
    from balsam.api import App, EventLog, Job, Site
    from balsam.util import tail_file

    found = {j.id: j for j in Job.objects.filter(id=list(job_ids))}
    missing = [str(i) for i in job_ids if i not in found]
    if missing:
        raise click.ClickException(f"no job with id {', '.join(missing)} (among your sites; see `balsam job ls --site=all`)")
    events_by_job: dict[int, list[Any]] = {}
    for event in EventLog.objects.filter(job_id=list(job_ids)).order_by("timestamp"):
        events_by_job.setdefault(event.job_id, []).append(event)
    apps = {a.id: a for a in App.objects.filter(id=sorted({j.app_id for j in found.values()}))}
    sites = {s.id: s for s in Site.objects.filter(id=sorted({a.site_id for a in apps.values()}))}
    children: dict[int, list[Any]] = {}
    for child in Job.objects.filter(parent_id=list(job_ids)):
        for parent in child.parent_ids:
            children.setdefault(parent, []).append(child)
    # The parents of every job shown, in one request (chunked only past 500 ids), not one per
    # parent; a parent that is itself shown is not asked for again. A missing one was deleted.
    parents: dict[int, Any] = {pid: found[pid] for j in found.values() for pid in (j.parent_ids or ()) if pid in found}
    wanted = sorted({pid for j in found.values() for pid in (j.parent_ids or ())} - set(found))
    if wanted:
        parents.update((p.id, p) for p in Job.objects.filter(id=wanted))
    for n, job_id in enumerate(job_ids):
        if n:
            click.echo("")
        _show_one(found[job_id], apps, sites, events_by_job.get(job_id, []), children.get(job_id, []), lines, tail_file,
                  parents)


#: Widest field value that ``job show`` prints whole: a job's parameters or data may hold
#: hundreds of kilobytes (the API allows 512,000 characters of parameters), printed on one line
#: that buried the state history and the error, what ``show`` is read for.
SHOW_VALUE_CHARS = 500


def _show_one(j: Any, apps: dict, sites: dict, events: list, children: list, lines: int, tail_file: Any,
              parents: "dict[int, Any] | None" = None) -> None:
    from pathlib import Path

    app = apps.get(j.app_id)
    site = sites.get(app.site_id) if app else None
    state = j.state.value if j.state else ""
    click.echo(click.style(f"Job {j.id}", bold=True) + f"  {state}")
    job_out = Path(site.path) / "data" / str(j.workdir) / "job.out" if site else None
    head = [
        ("app", f"{app.name} (id {app.id})" if app else j.app_id),
        ("site", f"{site.name} (id {site.id})" if site else "?"),
        ("workdir", str(j.workdir)),
        ("job.out", f"{job_out}" + ("" if job_out is None or job_out.exists() else "  (not on this machine or not written yet)")),
    ]
    data = j.display_dict()
    for key in ("id", "app_id", "workdir", "state", "serialized_parameters", "serialized_return_value",
                "serialized_exception", "parent_ids"):
        data.pop(key, None)
    try:
        head.append(("parameters", str(j.get_parameters())))
    except Exception as exc:  # noqa: BLE001 - a broken payload must not hide the rest
        head.append(("parameters", f"<cannot deserialize: {exc}>"))
    for key, value in data.items():
        if value in (None, {}, [], ""):
            continue
        head.append((key, str(value)))
    width = max(len(k) for k, _ in head)
    for key, value in head:
        if len(value) > SHOW_VALUE_CHARS:
            value = (f"{value[:SHOW_VALUE_CHARS]}... ({len(value):,} characters; `balsam job ls --id {j.id} -v` "
                     "shows all)")
        click.echo(f"  {key.ljust(width)}  {value}")
    if j.parent_ids:
        for key, value in _parent_lines(j, parents or {}):
            click.echo(f"  {key.ljust(width)}  {value}")
    if children:
        shown = ", ".join(f"{c.id} ({c.state.value if c.state else ''})" for c in sorted(children, key=lambda c: c.id)[:20])
        more = f" (+{len(children) - 20} more)" if len(children) > 20 else ""
        click.echo(f"  {'children'.ljust(width)}  {shown}{more}")
    click.echo("State history:")
    if not events:
        click.echo("  (no events)")
    for e in events:
        when = e.timestamp.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if e.timestamp else "?"
        extra = {k: v for k, v in (e.data or {}).items() if k != "error"}
        note = "  " + " ".join(f"{k}={v}" for k, v in extra.items()) if extra else ""
        if len(note) > SHOW_VALUE_CHARS:
            note = f"{note[:SHOW_VALUE_CHARS]}... ({len(note) - 2:,} characters)"
        click.echo(f"  {when}  {_state_name(e.from_state)} -> {_state_name(e.to_state)}{note}")
    failure = next((e for e in reversed(events) if (e.data or {}).get("error")), None)
    if failure is not None:
        tail = str(failure.data["error"]).rstrip("\n").splitlines()[-lines:]
        click.echo(click.style(f"Error ({_state_name(failure.to_state)} at {failure.timestamp:%Y-%m-%d %H:%M:%S}):", fg="red"))
        for line in tail:
            click.echo(f"  | {line}")
    elif state in ("RUN_ERROR", "FAILED") and job_out is not None and job_out.exists():
        click.echo(click.style(f"Error (tail of {job_out}):", fg="red"))
        for line in tail_file(job_out, lines).splitlines():
            click.echo(f"  | {line}")
    if j.serialized_exception:
        from balsam._api import codec

        try:
            exc = codec.deserialize_exception(j.serialized_exception)
            click.echo(click.style("Exception raised by run():", fg="red") + f" {type(exc).__name__}: {exc}")
        except Exception as problem:  # noqa: BLE001 - an unreadable payload is reported, not fatal
            click.echo(f"  exception: <cannot deserialize: {problem}>")


def _parent_lines(j: Any, parents: dict[int, Any]) -> list[tuple[str, str]]:
    """``parents`` with each parent's state (a deleted one: "deleted") and, for a job in
    AWAITING_PARENTS, ``waiting for`` and what to do: the rule and its words are
    :func:`balsam.dependencies.parent_wait`'s, shared with the dashboard's job page."""
    from balsam.dependencies import DELETED, parent_wait

    wait = parent_wait(j.id, j.state, j.parent_ids, {p: parents[p].state for p in j.parent_ids or () if p in parents})
    out = [("parents", ", ".join(f"{p} ({state or DELETED})" for p, state in wait.parents))]
    if wait.waiting:
        out.append(("waiting for", wait.waits_for_text))
        out.extend(("", line) for line in wait.advice)
    return out


def _state_name(value: Any) -> str:
    return getattr(value, "value", value) or ""


def _stdin_is_terminal() -> bool:
    """Whether standard input is a terminal (a person who can answer a question); a closed or
    missing one is not."""
    stream = sys.stdin
    try:
        return stream is not None and stream.isatty()
    except ValueError:  # closed
        return False


def _confirm_unless_input_ended(question: str) -> bool:
    """``job modify``'s confirmation: asked at a terminal only. Without one it goes ahead, as with
    -y and as Balsam 0.7's modify did (it never asked): standard input is not read, since in a
    script it holds what follows (a ``while read`` loop's next lines, a script fed by ``bash -s``:
    a read took them for answers, and stopped the loop or the script; a closed stdin failed)."""
    if _stdin_is_terminal():
        return confirm_or_yes(question)
    return True


@job.command("modify")
@click.option("-i", "--id", "ids", multiple=True, type=JOB_ID, help="Job id (repeatable)")
@click.option("-t", "--tag", "tags", multiple=True, help="KEY=VALUE tag filter (repeatable)")
@click.option("-s", "--state", required=True, type=_state_type(), help="New state (e.g. RESTART_READY to re-run)")
@click.option("-f", "--from-state", "from_states", multiple=True, type=_state_type(),
              help="Only jobs now in this state (e.g. FAILED: re-run the failed ones; repeatable: in any of them)")
@site_option
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation")
def modify(ids: tuple, tags: tuple, state: str, from_states: tuple, site_selector: str, yes: bool) -> None:
    """Change the state of jobs: RESTART_READY re-runs them, FAILED gives up on them."""
    from balsam.api import Job
    from balsam.states import InvalidTransition, JobState, is_valid_transition

    if not ids and not tags:
        raise click.UsageError("select jobs with --id and/or --tag")
    filters = _job_filters(ids, tags, from_states, (), site_selector)
    query = Job.objects.filter(**filters)
    matched = list(query)
    jobs = [j for j in matched if j.state is None or j.state.value != state.upper()]
    waiting = []
    if state.upper() == "RESTART_READY" and not ids and "AWAITING_PARENTS" not in {s.upper() for s in from_states}:
        # A tag selects a workflow's children too: re-running them would run them before their
        # parents (a failed parent keeps them waiting). Named by --id or --from-state, they move.
        waiting = [j for j in jobs if _state_name(j.state) == "AWAITING_PARENTS"]
        jobs = [j for j in jobs if _state_name(j.state) != "AWAITING_PARENTS"]
    if waiting:
        click.echo(f"Left {len(waiting)} job(s) waiting for their parents (--from-state AWAITING_PARENTS, or "
                   "--id, moves them anyway)")
    # The server refuses a whole request (a 5,000-job chunk) for one move it does not allow, after
    # the chunks before it were applied: check each move with its rule before sending anything.
    # (Refused as a whole, nothing would have changed: that stays an error.)
    refused = [j for j in jobs if j.state is None or not is_valid_transition(j.state, state.upper())]
    if refused:
        jobs = [j for j in jobs if j.state is not None and is_valid_transition(j.state, state.upper())]
        by_state = collections.Counter(_state_name(j.state) or "?" for j in refused)
        shown = ", ".join(f"{n} {name}" for name, n in sorted(by_state.items()))
        if not jobs and not waiting:
            first = refused[0]
            why = InvalidTransition(first.state, JobState.parse(state.upper())) if first.state is not None else "no state"
            raise click.ClickException(f"none of the {len(refused)} selected job(s) can move to {state.upper()} "
                                       f"({shown}): job {first.id}: {why}")
        click.echo(f"Left {len(refused)} job(s) that cannot move to {state.upper()} ({shown})")
    if not jobs:
        # Say why: an id typed wrong (or at another --site) read as "already done".
        already = len(matched) - len(waiting) - len(refused)
        why = ""
        if not matched:
            why = " No matching jobs."
        elif already == 1:
            why = f" The selected job is already {state.upper()}."
        elif already:
            why = f" All {already} selected jobs are already {state.upper()}."
        click.echo("No job needs changing." + why)
        return
    if not yes and len(jobs) > 1 and not _confirm_unless_input_ended(f"Set {len(jobs)} jobs to {state.upper()}?"):
        click.echo("Nothing changed.")
        return
    for j in jobs:
        j.state = state.upper()
    progress = Progress("Updating jobs", len(jobs), enabled=len(jobs) > Job.objects.bulk_chunk_size)
    try:
        with progress:
            n = Job.objects.bulk_update(jobs, progress=progress)
    except KeyboardInterrupt:
        # One request per 5,000 jobs, each applied whole: say how far it got (running the command
        # again changes the rest: the jobs already in the new state are left out). The count is
        # of the answered requests; the one in flight is carried out by the server once it has
        # it (5,000 set where 10,000 were, Ctrl-C during the second of three): say by how many. A
        # manager without bulk PATCH sends one PUT per job: one job in flight at most.
        done = progress.done
        per_request = Job.objects.bulk_chunk_size if Job.objects.has_bulk_patch else 1
        in_flight = min(per_request, len(jobs) - done)
        more = (f", and up to {in_flight} more by the request in flight (the server carries out a request it "
                f"has received): {done} to {done + in_flight} in all") if in_flight else ""
        raise Interrupted(f"Interrupted: {done} of {len(jobs)} job(s) were set to {state.upper()}{more}; run the "
                          "command again to change the rest.") from None
    click.echo(f"Set {n} job(s) to {state.upper()}")
    if state.upper() == "RESTART_READY":
        # The server holds back a re-run whose parent has not finished (AWAITING_PARENTS until it
        # does): say so, or "Set N to RESTART_READY" reads as N runs about to start.
        _say_held_reruns([j.id for j in jobs])


def _say_held_reruns(updated: list[int]) -> None:
    """How many of the jobs just set to RESTART_READY (``updated``) the server sent back to
    AWAITING_PARENTS, and what they wait for. Only those ids are read (the query splits a long id
    list into requests of its filter_chunk_size): the selection's other waiting jobs, left out by
    --from-state or by the tag rule above, were counted as "of them" before. Then their
    unfinished parents' states, in one more read: a FAILED parent ends no wait by itself."""
    from balsam.api import Job

    held = list(Job.objects.filter(id=sorted(updated), state="AWAITING_PARENTS"))
    if not held:
        return
    wanted = sorted({p for j in held for p in (j.parent_ids or ())})
    failed_ids = {p.id for p in Job.objects.filter(id=wanted, state="FAILED")} if wanted else set()
    failed = sorted(failed_ids)
    # One set, built once: it was built again for every held job (10^4 x 10^4 for a large re-run).
    blocked = sum(1 for j in held if not failed_ids.isdisjoint(j.parent_ids or ()))
    what = "they run once those finish"
    if blocked:
        rerun = " ".join(f"-i {p}" for p in failed[:10]) + (" ..." if len(failed) > 10 else "")
        what = (f"{'all' if blocked == len(held) else blocked} wait for a FAILED parent, which must be re-run first "
                f"(`balsam job modify {rerun} -s RESTART_READY`; or move them on without it, -s READY)")
        if blocked < len(held):
            what += f", the other {len(held) - blocked} run once their parents finish"
    click.echo(f"{len(held)} of them wait for their parents first (AWAITING_PARENTS: a parent has not finished); "
               f"{what} (`balsam job show ID` lists them)")


@job.command("rm")
@click.option("-i", "--id", "ids", multiple=True, type=JOB_ID, help="Job id (repeatable)")
@click.option("-t", "--tag", "tags", multiple=True, help="KEY=VALUE tag filter (repeatable)")
@click.option("-s", "--state", "states", multiple=True, type=_state_type(),
              help="Only jobs in this state (repeatable: in any of them)")
@click.option("-ns", "--exclude-state", "excluded", multiple=True, type=_state_type(),
              help="Leave out jobs in this state (repeatable)")
@click.option("--all", "delete_all", is_flag=True,
              help="Delete every job of the selected sites (no --site: the site you are in, elsewhere the active sites)")
@site_option
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation")
def rm(ids: tuple, tags: tuple, states: tuple, excluded: tuple, delete_all: bool,
       site_selector: str, yes: bool) -> None:
    """Delete jobs. Those RUNNING in a launcher are left (named in a warning): delete them after
    they end (or from Python, job.delete(), which ends the run)."""
    from balsam.api import Job
    from balsam.client.rest import skipped_running_message

    if not (ids or tags or states or excluded or delete_all or site_selector):
        raise click.UsageError("select jobs with --id, --tag, --state/--exclude-state, --site or --all")
    # --all alone takes the usual default selection (this site, else the active sites), as every job
    # command does: it used to mean every site, against this help and docs/cli.md.
    filters = _job_filters(ids, tags, states, excluded, site_selector)
    query = Job.objects.filter(**filters)
    n = query.count()
    if n == 0:
        click.echo("No matching jobs.")
        return
    if not yes:
        if delete_all and not confirm_or_yes("THIS WILL DELETE ALL JOBS! CAUTION! Continue?"):
            click.echo("Nothing deleted.")
            return
        if not confirm_or_yes(f"Really delete {n} job{'' if n == 1 else 's'}?"):
            click.echo("Nothing deleted.")
            return
    try:
        deleted = query.delete(warn=False)  # the skipped ones are printed here, once
    except KeyboardInterrupt:
        # A request already sent is carried out by the server (one bulk delete, several past 500
        # --id): "Interrupted." alone read as "nothing was deleted".
        raise Interrupted(f"Interrupted while deleting {n} job(s): the server may have deleted some or all of them "
                          "(a request already sent is carried out); `balsam job ls` with the same options shows "
                          "what is left.") from None
    click.echo(f"Deleted {deleted if deleted is not None else n} job(s)")
    if query.skipped_running:
        # `rm -i` is a query delete too: it leaves them as well. Only a delete of the job itself
        # (Python's job.delete()) takes a running job, and ends its run.
        advice = "delete them after they end, or from Python with Job.objects.get(id=N).delete(), which ends the run"
        click.echo("Warning: " + skipped_running_message(*query.skipped_running, advice=advice), err=True)


commands = [job]
