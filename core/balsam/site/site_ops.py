"""Site life cycle used by ``balsam site ...``: create (with roll-back), push settings, start/stop the agent.

Kept apart from the click commands so the demo and tests call the same code.
"""

from __future__ import annotations

import copy
import datetime as dt
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional

from .agent import (
    START_TIME_TOLERANCE_SEC, STOP_WAIT_ENV, agent_running, agent_stop_timeout, pid_alive,
    pid_file_of_another_directory, pid_file_path, read_pid_file, read_pid_record, recorded_agent_alive,
)
from ..scheduler import UNREPORTED_MAX_QUEUED_JOBS
from ..util import plain_decimal_text, process_start_time, same_process, terminate_processes
from .job_template import default_template_for

SITE_ID_FILE = ".balsam-site"


class SiteError(RuntimeError):
    """A site operation that cannot be done (one line for the user)."""


class AgentStopTimeout(SiteError):
    """The agent, signalled to stop, did not exit within the stop's timeout (it goes on stopping)."""


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _to_plain(value: Any) -> Any:
    import attrs

    if attrs.has(type(value)):
        return {k: _to_plain(v) for k, v in attrs.asdict(value, recurse=False).items()}
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def available_platforms() -> dict[str, str]:
    """Platform plugin name -> one-line description (for the ``site init`` picker)."""
    from ..plugins.manager import get_plugin_manager

    pm = get_plugin_manager()
    found = {}
    for name, record in sorted(pm.list_drivers("platform").items()):
        description = getattr(record, "description", "") or ""
        if not description:
            try:
                description = getattr(pm.load_driver("platform", name), "description", "") or ""
            except Exception as exc:
                description = f"(unavailable: {exc})"
        found[name] = description
    return found


def scheduler_site_defaults(scheduler_cls: Any) -> dict[str, Any]:
    """What a scheduler driver contributes to a new settings.yml (``Scheduler.site_defaults()``, in
    settings.yml shape: the queues and projects it discovers on this machine...), without its name
    (``site init`` sets the scheduler's name itself)."""
    site_defaults = getattr(scheduler_cls, "site_defaults", None)  # drivers written before the method
    if site_defaults is None:
        return {}
    scheduler = scheduler_cls()
    # None: a limit the scheduler does not report stays unknown until merged with the platform's
    # (init_site fills what neither gives), so a guess never undercuts a documented limit. A driver
    # whose own site_defaults() takes no such argument writes what it writes.
    if "unreported_max_queued_jobs" in inspect.signature(scheduler.site_defaults).parameters:
        values = scheduler.site_defaults(unreported_max_queued_jobs=None)
    else:
        values = scheduler.site_defaults()
    values = copy.deepcopy(dict(values or {}))
    if isinstance(values.get("scheduler"), dict):
        values["scheduler"].pop("name", None)
    return values


#: The queue limits where the scheduler's word and a platform's hard-coded defaults are both taken
#: at their stricter value.
QUEUE_LIMITS = ("max_nodes", "max_walltime", "max_queued_jobs")


def _node_range(limits: dict[str, Any]) -> str:
    """``min..max`` nodes of a queue's limits (``1`` where no minimum is stated, ``?`` no maximum)."""
    least = limits.get("min_nodes") if isinstance(limits.get("min_nodes"), int) else 1
    most = limits.get("max_nodes") if isinstance(limits.get("max_nodes"), int) else "?"
    return f"{least}..{most}"


def stricter_queue_limits(discovered: dict[str, Any], platform_queues: dict[str, Any],
                          warn: Optional[Callable[[str], None]] = None,
                          scheduler_name: str = "scheduler", platform_name: str = "platform") -> dict[str, Any]:
    """A platform's ``allowed_queues`` where, for each queue the scheduler also reported, every
    limit both give is the smaller one: the live server knows today's limits (a debug queue cut to
    one queued job), the platform what the machine's documentation says, and a site set above either
    has BatchJobs refused. A limit the scheduler does not report (None: unknown) leaves the
    platform's. A queue only the platform names stays (discovery may be partial).

    ``min_nodes`` is stricter the larger it is (a BatchJob below the scheduler's minimum is refused
    by qsub/sbatch); a platform that states none allows 1. A discovered ``min_nodes`` the platform
    does not state is kept by the merge itself (init_site's deep_merge), and so must fit here.
    When the two node ranges have no size in common (the server's minimum above the platform's
    maximum, or its maximum below the platform's minimum), no merged range is usable: the
    platform's own ``min_nodes`` (written as 1 when it states none, so that the discovered one is
    not merged back in) and ``max_nodes`` stay, and ``warn`` is told in one line naming the queue
    and both ranges. A platform that states no ``max_nodes`` gets the discovered one from the merge,
    so that is its maximum here; when its ``min_nodes`` is above it, the platform has no range to
    write (settings.yml needs a maximum, and none is made up): the scheduler's range is written,
    and ``warn`` says so."""
    merged = copy.deepcopy(dict(platform_queues))
    for name, limits in merged.items():
        seen = discovered.get(name)
        if not isinstance(limits, dict) or not isinstance(seen, dict):
            continue
        stated = dict(limits)  # the platform's own, before the merge
        for key in QUEUE_LIMITS:
            if isinstance(limits.get(key), int) and isinstance(seen.get(key), int):
                limits[key] = min(limits[key], seen[key])
        platform_min = stated["min_nodes"] if isinstance(stated.get("min_nodes"), int) else 1
        seen_min = seen["min_nodes"] if isinstance(seen.get("min_nodes"), int) else 1
        least = max(platform_min, seen_min)
        # The maximum written: the platform's (made stricter above), else the discovered one, which
        # the merge (init_site's deep_merge) brings in.
        most = limits.get("max_nodes") if isinstance(limits.get("max_nodes"), int) else seen.get("max_nodes")
        if not isinstance(most, int) or least <= most:
            if "min_nodes" in stated:
                limits["min_nodes"] = least
            continue
        if isinstance(stated.get("max_nodes"), int):
            # No size fits both: the platform's range, which is consistent on its own.
            limits["min_nodes"], limits["max_nodes"] = platform_min, stated["max_nodes"]
            written = f"the platform's {_node_range(limits)}"
        else:
            # The platform states no maximum: its range cannot be written; the scheduler's can.
            limits["min_nodes"], limits["max_nodes"] = seen_min, most
            written = f"the scheduler's {_node_range(limits)} (the platform states no max_nodes)"
        if warn is not None:
            warn(f"queue {name}: the {scheduler_name} scheduler reports {_node_range(seen)} nodes, the {platform_name} "
                 f"platform {_node_range(stated)}; no size fits both, so {written} is written (check settings.yml)")
    return merged


def fill_unreported_queue_limits(settings: dict[str, Any]) -> None:
    """Give each queue in ``settings`` (settings.yml shape) whose ``max_queued_jobs`` neither the
    scheduler reported nor a platform or the user set (None) the placeholder
    ``UNREPORTED_MAX_QUEUED_JOBS``: settings.yml needs a number."""
    queues = (settings.get("scheduler") or {}).get("allowed_queues") or {}
    for limits in queues.values():
        if isinstance(limits, dict) and "max_queued_jobs" in limits and limits["max_queued_jobs"] is None:
            limits["max_queued_jobs"] = UNREPORTED_MAX_QUEUED_JOBS


def platform_projects(platform_name: str) -> list[str]:
    """The projects a platform proposes for a new site (its ``settings_defaults()``), or none."""
    from ..plugins.manager import get_plugin_manager

    try:
        defaults = get_plugin_manager().load_driver("platform", platform_name)().settings_defaults() or {}
    except Exception:  # an unknown platform is reported by init_site itself
        return []
    return list((defaults.get("scheduler") or {}).get("allowed_projects") or [])


def detect_platform(hostname: Optional[str] = None, env: Optional[dict[str, str]] = None) -> Optional[str]:
    """The installed platform that recognises this host (``Platform.recognizes``), if exactly one does."""
    from ..plugins.manager import get_plugin_manager

    pm = get_plugin_manager()
    host = hostname if hostname is not None else socket.getfqdn()
    environ = dict(os.environ) if env is None else env
    found = []
    for name in sorted(pm.list_drivers("platform")):
        try:
            if pm.load_driver("platform", name).recognizes(host, environ):
                found.append(name)
        except Exception:  # a broken plugin is reported by `balsam plugins ls`, not here
            continue
    return found[0] if len(found) == 1 else None


def site_record_fields(settings: Any) -> dict[str, Any]:
    """The Site fields that mirror settings.yml (what ``balsam site sync`` pushes)."""
    scheduler = getattr(settings, "scheduler", None)
    transfers = getattr(settings, "transfers", None)
    record: dict[str, Any] = {}
    if scheduler is not None:
        record["allowed_projects"] = list(scheduler.allowed_projects or [])
        record["allowed_queues"] = _to_plain(scheduler.allowed_queues or {})
        record["optional_batch_job_params"] = dict(scheduler.optional_batch_job_params or {})
    if transfers is not None:
        record["transfer_locations"] = dict(getattr(transfers, "transfer_locations", None) or {})
        record["globus_endpoint_id"] = getattr(transfers, "globus_endpoint_id", None)
    return record


def push_site_settings(client: Any, site_config: Any) -> dict:
    """Copy the site's settings.yml limits (queues, projects, params, transfer locations) to its API record."""
    return client.put(f"/sites/{int(site_config.site_id)}", json=site_record_fields(site_config.settings))


def write_site_id(site_path: Path, site_id: int) -> None:
    path = Path(site_path) / SITE_ID_FILE
    path.write_text(f"{site_id}\n")
    os.chmod(path, 0o440)


def read_site_id(site_path: Path) -> int:
    path = Path(site_path) / SITE_ID_FILE
    try:
        return int(path.read_text().split()[0])
    except (OSError, IndexError, ValueError):
        raise SiteError(f"{site_path} is not a Balsam site (no readable {SITE_ID_FILE})") from None


def site_label(site_dir: Path) -> str:
    """``DIR (site id N)`` for a directory holding ``.balsam-site`` (just DIR when the id is unreadable)."""
    try:
        return f"{site_dir} (site id {read_site_id(site_dir)})"
    except SiteError:
        return str(site_dir)


def _holds_site_marker(directory: Path) -> bool:
    try:
        return (directory / SITE_ID_FILE).is_file()
    except OSError:  # an unreadable parent: nothing we can see there
        return False


def enclosing_site(path: "Path | str") -> Optional[Path]:
    """The nearest directory above ``path`` (``path`` itself excluded) that is a Balsam site, else None."""
    for parent in Path(path).parents:
        if _holds_site_marker(parent):
            return parent
    return None


def site_below(path: "Path | str", max_dirs: Optional[int] = None) -> Optional[Path]:
    """A Balsam site inside the tree of ``path`` (``path`` itself excluded; the shallowest first),
    else None. Symbolic links are not followed (``shutil.rmtree`` does not follow them either) and
    unreadable directories are skipped; with ``max_dirs``, only that many directories are read."""
    return search_below(path, max_dirs)[0]


def search_below(path: "Path | str", max_dirs: Optional[int] = None) -> tuple[Optional[Path], bool]:
    """:func:`site_below` and whether the search saw the whole tree (False: ``max_dirs`` directories
    were read and some were left unread)."""
    root = Path(path)
    pending: deque[Path] = deque([root])
    read = 0
    while pending and (max_dirs is None or read < max_dirs):
        current = pending.popleft()
        read += 1
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.name == SITE_ID_FILE and current != root:
                        return current, True
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(Path(entry.path))
                    except OSError:
                        continue
        except OSError:
            continue
    return None, not pending


#: Directories ``site init`` reads to name a site inside the (non-empty, refused anyway) directory
#: it was given: enough for a project directory, without reading all of a home directory first.
INIT_SEARCH_DIRS = 1000


def check_not_nested(path: "Path | str", max_dirs: Optional[int] = INIT_SEARCH_DIRS) -> None:
    """SiteError (one line naming the other site) when ``path`` is inside a Balsam site or holds one
    (among its first ``max_dirs`` directories).

    A site inside another's tree is deleted with it by ``balsam site rm`` (its agent left running,
    which ``balsam site stop`` can no longer find), and the site lookup from a working directory
    (the nearest ``.balsam-site`` above it) picks whichever is nearer."""
    path = Path(path)
    outer = enclosing_site(path)
    if outer is not None:
        raise SiteError(f"{path} is inside the Balsam site {site_label(outer)}: choose a directory outside any site")
    if path.is_dir():
        inner = site_below(path, max_dirs)
        if inner is not None:
            raise SiteError(f"{path} holds the Balsam site {site_label(inner)}: choose a directory holding no site")


def init_site(
    site_path: "Path | str",
    name: str,
    platform_name: str,
    client: Any,
    *,
    echo: Callable[[str], None] = lambda _msg: None,
    settings_overrides: Optional[dict] = None,
    scheduler_name: Optional[str] = None,
    projects: Optional[list[str]] = None,
) -> int:
    """Create a site directory and its API record; undo everything if any step fails. Returns the site id.

    settings.yml gets, in this order (later wins): the generic defaults, the scheduler driver's
    ``site_defaults()`` (its queues, projects, optional params), the platform's
    ``settings_defaults()`` (the machine's queues, launcher settings...), ``projects``, then
    ``settings_overrides``. ``scheduler_name`` overrides the platform's scheduler (e.g. the default
    platform on a Slurm cluster); the platform's queues and template are then left out.
    """
    from ..config import load_settings, render_settings_yaml
    from ..plugins.manager import get_plugin_manager

    path = Path(site_path).expanduser().resolve()
    check_not_nested(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SiteError(f"{path} already exists: choose a new directory for the site")
    pm = get_plugin_manager()
    platform_options = ((settings_overrides or {}).get("launcher") or {}).get("platform_options")
    platform = pm.load_driver("platform", platform_name)(options=platform_options)
    platform_defaults = dict(platform.settings_defaults() or {})
    platform_scheduler = (platform_defaults.get("scheduler") or {}).get("name") or platform.default_scheduler or "local"
    if scheduler_name and scheduler_name != platform_scheduler:
        # The platform's queue defaults belong to its own scheduler; keep only the generic ones.
        platform_defaults.get("scheduler", {}).pop("allowed_queues", None)
    scheduler_name = scheduler_name or platform_scheduler
    platform_defaults.setdefault("scheduler", {})["name"] = scheduler_name
    scheduler_cls = pm.load_driver("scheduler", scheduler_name)
    overrides = deep_merge(
        {"launcher": {"platform": platform_name}, "scheduler": {"name": scheduler_name}},
        scheduler_site_defaults(scheduler_cls),
    )
    # A platform's projects are a placeholder (ALCF's "datascience"): the projects the scheduler
    # says this user has win over it, and it is used only when they cannot be listed. (It used to
    # win, so a Theta user of another project had every BatchJob refused by the agent.)
    placeholder = list(platform_defaults.get("scheduler", {}).pop("allowed_projects", None) or [])
    platform_queues = (platform_defaults.get("scheduler") or {}).get("allowed_queues")
    if platform_queues:
        platform_defaults["scheduler"]["allowed_queues"] = stricter_queue_limits(
            (overrides.get("scheduler") or {}).get("allowed_queues") or {}, platform_queues,
            warn=lambda message: echo(f"Warning: {message}"), scheduler_name=scheduler_name,
            platform_name=platform_name)
    overrides = deep_merge(overrides, platform_defaults)
    if projects:
        overrides = deep_merge(overrides, {"scheduler": {"allowed_projects": list(projects)}})
    if not (overrides.get("scheduler") or {}).get("allowed_projects"):
        try:
            projects = list(scheduler_cls(options=(overrides.get("scheduler") or {}).get("options")).discover_projects() or [])
        except Exception as exc:
            echo(f"Could not list your projects with the {scheduler_name} scheduler ({exc}); edit allowed_projects later.")
            projects = []
        if projects or placeholder:
            overrides = deep_merge(overrides, {"scheduler": {"allowed_projects": projects or placeholder}})
    overrides = deep_merge(overrides, settings_overrides or {})
    fill_unreported_queue_limits(overrides)

    created_dir = not path.exists()
    site_id: Optional[int] = None
    try:
        path.mkdir(parents=True, exist_ok=True)
        settings_path = path / "settings.yml"
        settings_path.write_text(render_settings_yaml(overrides))
        os.chmod(settings_path, 0o600)
        settings = load_settings(settings_path)
        for sub in ("data", "log", "qsubmit"):
            (path / sub).mkdir(mode=0o700, exist_ok=True)
        template_path = path / "job-template.sh"
        template_path.write_text(default_template_for(platform, scheduler_cls, platform_scheduler == scheduler_name))
        os.chmod(template_path, 0o700)
        created = client.post("/sites/", json={"name": name, "path": str(path), **site_record_fields(settings)})
        site_id = int(created["id"])
        write_site_id(path, site_id)
        pm.hook.balsam_site_initialized(site_path=path, settings=settings, site_id=site_id)
    except BaseException:
        if site_id is not None:
            try:
                client.delete(f"/sites/{site_id}")
            except Exception as cleanup_exc:  # keep the original error; say what is left behind
                echo(f"Warning: could not delete the API site {site_id} while rolling back: {cleanup_exc}")
        if created_dir:
            shutil.rmtree(path, ignore_errors=True)
        else:
            for child in path.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        raise
    return site_id


# -- agent daemon ---------------------------------------------------------------------------------


def check_site_on_server(client: Any, site_path: Path) -> int:
    """The site id of ``site_path`` once the server has its record; SiteError (one line) when the
    server answers 404. An agent started for a deleted record (``site rm --force``, a reset server
    database, another server or account logged in) only logs HTTP 404 every cycle, forever."""
    site_id = read_site_id(site_path)
    try:
        client.get(f"/sites/{site_id}")
    except Exception as exc:
        if getattr(exc, "status_code", None) != 404:
            raise
        who = f" for user {client.username}" if getattr(client, "username", None) else ""
        # `site sync` cannot help: it updates the record (PUT), which is just as missing.
        raise SiteError(
            f"site {site_id} ({Path(site_path).absolute()}) is not on the server {client.api_root}{who}: deleted, "
            "or the server's database was reset? Create a new site with `balsam site init NEW_DIR`"
            " (or `balsam login` to the server that has it)"
        ) from None
    return site_id


def claim_site_path(client: Any, site_path: Path, force: bool = False) -> Optional[str]:
    """At an agent's start, once it holds its directory's lock, before it writes its pid file: the
    site record's ``path`` made this directory's, unless another directory holding this same site
    (a copy: ``cp -r``, an rsync to another file system) has a live agent, which refuses the start
    (SiteError, one line: :func:`check_copy_agent`). Returns a note (logged) when the path changed,
    else None; an API that does not answer is no refusal (the agent's cycles retry it).

    The flock and pid file keep a second agent out of the same directory only: a copy's agent
    ran beside the first one, each staging files, running hooks and starting launchers in its own
    ``data/`` (a job's inputs staged in one, its run in the other), and the site record kept the
    path of ``site init`` after a plain ``mv`` (what ``balsam site ls`` and ``--site`` read)."""
    site_path = Path(site_path).absolute()
    try:
        site_id = read_site_id(site_path)
        site_record = client.get(f"/sites/{site_id}")
    except Exception:
        return None
    other = recorded_elsewhere(site_path, site_record)
    if other is None:
        return None
    other_id = site_id_in(other)
    taken_from = ""
    if other_id == site_id:
        taken_from = _check_agent_of(other, site_id, site_record, site_path, command="start", force=force)
    try:
        client.put(f"/sites/{site_id}", json={"path": str(site_path)})
    except Exception as exc:
        return f"the site record's path is {other}, not {site_path}, and could not be updated: {exc}"
    where = "another copy of the site" if other_id == site_id else "gone or not this site's"
    return f"the site record's path was {other} ({where}{taken_from}); it is now {site_path}"


def recorded_elsewhere(site_path: Path, site_record: dict) -> Optional[Path]:
    """The directory the site record names when it is not ``site_path`` (by any name: a symbolic
    link, another mount point of the same directory is ``site_path``); None when it is, or names none."""
    recorded = str(site_record.get("path") or "")
    site_path = Path(site_path).absolute()
    if not recorded or Path(recorded) == site_path:
        return None
    other = Path(recorded)
    try:
        same = other.exists() and os.path.samefile(other, site_path)
    except OSError:
        same = False
    return None if same else other


def site_id_in(directory: Path) -> Optional[int]:
    """The id of the site in ``directory``; None when it holds none (or it cannot be read)."""
    try:
        return read_site_id(directory) if (directory / SITE_ID_FILE).is_file() else None
    except Exception:
        return None


#: What a command run in one directory of a site would do to the site whose agent runs in another
#: (:func:`check_copy_agent`), and what to do instead.
_COPY_HARM = {
    "start": ("two directories of one site (a copy?) would each run an agent, staging files and running jobs in "
              "their own data/", "or give this directory a site of its own (`balsam site init NEW_DIR`)"),
    "rm": ("`balsam site rm` here would delete the site record that agent works on, with all its jobs",
           "or, to delete this copy only, remove the directory itself (`rm -r`)"),
    "mv": ("`balsam site mv` here would point the site record at this copy, under that agent",
           "or move this copy with a plain `mv` (the site record keeps naming the directory whose agent runs)"),
    "sync": ("`balsam site sync` here would push this directory's settings.yml to the site record that agent works "
             "with", "or edit settings.yml in that directory and run `balsam site sync` there"),
}


def check_copy_agent(client: Any, site_path: Path, *, command: str) -> dict:
    """Refuse `balsam site COMMAND` in ``site_path`` (SiteError, one line) while the site record
    names another directory of the same site (``site_path`` is a copy: ``cp -a``, ``rsync -a``)
    whose agent lives, judged as at an agent's start (:func:`claim_site_path`). The copy's own pid
    file, copied with it, names no agent of the copy: `site rm COPY` deleted the record of the
    site that agent ran, with all its jobs, and `site mv COPY NEW` pointed the record at NEW,
    where `site start` then ran a second agent of the site. Returns the site record."""
    site_path = Path(site_path).absolute()
    site_id = read_site_id(site_path)
    site_record = client.get(f"/sites/{site_id}")
    other = recorded_elsewhere(site_path, site_record)
    if other is not None and site_id_in(other) == site_id:
        _check_agent_of(other, site_id, site_record, site_path, command=command, force=False)
    return site_record


def _check_agent_of(other: Path, site_id: int, site_record: dict, site_path: Path, *, command: str,
                    force: bool) -> str:
    """SiteError when ``other``, another directory of site ``site_id``, has a live agent. A pid file
    there naming another host is judged as every command judges one (:func:`check_other_host_agent`):
    by the site record's last refresh. Refreshed recently: a refusal, even with ``force``; silent for
    longer than :func:`agent_silence_limit` (a login node gone): a refusal that points at `balsam
    site start --force` (``command`` start: with ``force`` it goes on) or at `balsam site stop
    --force OTHER`, which drops that pid file. Returns a note for the record's new path ("" when no
    agent was there)."""
    running = agent_running(other)
    if running is None:
        return ""
    host, pid = running
    harm, instead = _COPY_HARM[command]
    both = f"site {site_id} is also in {other}, where its agent runs on {host} [pid {pid}]: {harm}"
    elsewhere = f" on {host}" if host != socket.gethostname() else ""
    silent = _silent_for(site_record, site_path) if elsewhere else None
    if silent is None:
        raise SiteError(f"{both}; stop that agent first (`balsam site stop {other}`{elsewhere}), {instead}")
    seconds, limit, last = silent
    if seconds <= limit:
        raise SiteError(f"{both} (the site was refreshed {seconds:.0f} s ago); stop that agent first (`balsam "
                        f"site stop {other}`{elsewhere}), {instead}")
    if not force:
        way = f"`balsam site start --force {site_path}` runs the site here" if command == "start" else \
            f"`balsam site stop --force {other}` drops its pid file"
        raise SiteError(
            f"site {site_id} is also in {other}, whose pid file names an agent on {host} [pid {pid}], but the "
            f"site has not been refreshed since {_local_time(last)}: that agent looks dead; {way}, {instead}")
    return f", whose agent on {host} [pid {pid}] looked dead (silent since {_local_time(last)})"


def _silent_for(site_record: dict, site_path: Path) -> Optional[tuple[float, float, dt.datetime]]:
    """(seconds since the site record's last refresh, :func:`agent_silence_limit`, the refresh);
    None when the record has no readable refresh time."""
    from ..serialization import parse_datetime

    try:
        last = parse_datetime(site_record["last_refresh"])
    except Exception:
        return None
    if last.tzinfo is None:
        last = last.replace(tzinfo=dt.timezone.utc)
    return (dt.datetime.now(dt.timezone.utc) - last).total_seconds(), agent_silence_limit(site_path), last


#: A pid file naming another host is taken for a dead agent's once the site record has not been
#: refreshed for max(STALE_REFRESH_PERIODS x the refresh period, STALE_MIN_SEC) seconds. A running
#: agent refreshes it every scheduler ``sync_period`` (the scheduler module's site update) and at
#: least every ``SITE_CHECK_SEC`` (its site check); `balsam site sync/mv/rename` refresh it too.
STALE_REFRESH_PERIODS = 3
STALE_MIN_SEC = 120.0


def agent_silence_limit(site_path: Path) -> float:
    """Seconds without a site refresh after which an agent on another host is taken for dead."""
    from .agent import SITE_CHECK_SEC

    period = float(SITE_CHECK_SEC)
    try:
        from ..config import SiteConfig

        scheduler = getattr(SiteConfig(site_path).settings, "scheduler", None)
        if scheduler is not None:
            period = min(period, float(scheduler.sync_period))
    except Exception:  # a bad settings.yml: the agent's own site check still refreshes
        pass
    return max(STALE_REFRESH_PERIODS * period, STALE_MIN_SEC)


def _local_time(when: dt.datetime) -> str:
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def check_other_host_agent(site_path: Path, client: Any, *, force: bool, command: str) -> Optional[str]:
    """Deal with a pid file that names another host (a login node retired or renamed, a site on a
    shared file system), whose processes cannot be checked from here.

    The site record's ``last_refresh`` says whether that agent still lives. Silent for longer than
    :func:`agent_silence_limit`: SiteError pointing at ``balsam site {command} --force``, or, with
    ``force``, the pid file is removed and a note returned. Refreshed recently: SiteError naming the
    host and file, even with ``force`` (an agent that still talks to the server is never
    overridden). None when the pid file is absent or names this host.
    """
    record = read_pid_record(site_path)
    if record is None or record[0] == socket.gethostname():
        return None
    from ..serialization import parse_datetime

    host, pid, _start = record
    path = pid_file_path(site_path)
    site_id = read_site_id(site_path)
    try:
        site_record = client.get(f"/sites/{site_id}")
        parse_datetime(site_record["last_refresh"])  # readable, or said below (_silent_for gives None)
    except Exception as exc:
        raise SiteError(f"the pid file {path} names a site agent on {host} [pid {pid}] and whether it still runs "
                        f"cannot be checked (site {site_id} on the server: {exc}); `balsam site {command}` it on {host}")
    silent, limit, last = _silent_for(site_record, site_path)
    if silent <= limit:
        hint = f"; --force drops it only once the site has been silent for over {limit:.0f} s" if force else ""
        raise SiteError(f"the site agent runs on {host} [pid {pid}] (pid file {path}; the site was refreshed "
                        f"{silent:.0f} s ago): `balsam site stop` it on {host}{hint}")
    if not force:
        raise SiteError(f"the pid file {path} names a site agent on {host} [pid {pid}], but the site has not been "
                        f"refreshed since {_local_time(last)}: that agent looks dead; `balsam site {command} --force` "
                        "drops the pid file")
    path.unlink(missing_ok=True)
    return (f"Removed the pid file {path} of the site agent on {host} [pid {pid}]: the site had not been "
            f"refreshed since {_local_time(last)}")


def _default_client(client: Any) -> Any:
    if client is not None:
        return client
    from ..client import load_client

    return load_client()


def start_agent(site_path: Path, *, wait_sec: float = 20.0, force: bool = False, client: Any = None,
                echo: Callable[[str], None] = lambda _msg: None, stop_wait_sec: Optional[float] = None) -> int:
    """Start ``python -m balsam.site`` in the background for ``site_path``; return its pid once it runs.

    A pid file naming another host is checked against the site record (:func:`check_other_host_agent`);
    ``force`` drops it when that agent looks dead, and lets the agent take the site from another
    directory of it whose pid file names such an agent (:func:`claim_site_path`). ``stop_wait_sec``:
    the agent's stop wait where this environment sets none ($BALSAM_AGENT_STOP_WAIT_SEC): `balsam site sync` restarts an agent
    with the wait it had."""
    site_path = Path(site_path).absolute()
    record = read_pid_record(site_path)
    if record is not None and record[0] != socket.gethostname():
        note = check_other_host_agent(site_path, _default_client(client), force=force, command="start")
        if note:
            echo(note)
    running = agent_running(site_path)
    if running is not None:
        host, pid = running
        raise SiteError(f"the site agent is already running on {host} [pid {pid}]; `balsam site stop` first")
    log_dir = site_path / "log"
    log_dir.mkdir(exist_ok=True)
    console = log_dir / "agent-console.out"
    env = {**os.environ, "BALSAM_SITE_PATH": str(site_path)}
    if stop_wait_sec is not None and not env.get(STOP_WAIT_ENV, "").strip():
        env[STOP_WAIT_ENV] = plain_decimal_text(stop_wait_sec)  # repr(): 1e-05, which the agent refuses
    with open(console, "ab") as out:
        offset = out.tell()
        proc = subprocess.Popen(
            [sys.executable, "-m", "balsam.site", str(site_path)] + (["--force"] if force else []),
            cwd=site_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + wait_sec
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(console, "rb") as fh:
                fh.seek(offset)
                said = fh.read().decode(errors="replace").strip().splitlines()
            detail = said[-1] if said else f"exit code {proc.returncode}"
            if not said:
                # A full or over-quota site directory: the agent's error could not be written to
                # its console either (it said only "exit code 1"). Imported here: an error path.
                from ..launcher.runner import disk_full_note

                note = disk_full_note(site_path)
                if note:
                    detail = f"{detail}; {note}"
            if detail.startswith("Error: "):
                detail = detail[len("Error: "):]
            raise SiteError(f"the site agent exited at start-up: {detail} (see {console})")
        if read_pid_file(site_path) == (socket.gethostname(), proc.pid):
            return proc.pid
        time.sleep(0.1)
    raise SiteError(f"the site agent [pid {proc.pid}] did not start within {wait_sec:.0f} s (see {console})")


def stop_agent(
    site_path: Path,
    *,
    timeout: Optional[float] = None,
    force: bool = False,
    progress: Optional[Callable[[float, float], None]] = None,
    client: Any = None,
    echo: Callable[[str], None] = lambda _msg: None,
) -> Optional[int]:
    """SIGTERM the site's agent and wait for it to exit. Returns its pid, or None if it was not running.

    Only the process the pid file names *and* dates is signalled (a pid reused by another process
    since is left alone). Processes the agent left behind in its process group (it is the group
    leader) and in the groups of its scheduler commands (:func:`agent_command_groups`, read as it is
    signalled and again before a kill) are ended too; with ``force`` the agent is SIGKILLed after
    ``timeout`` first (None: as long as the agent's recorded stop wait needs,
    :func:`~balsam.site.agent.agent_stop_timeout`, at least 45 s). A pid file
    of another host is checked against the site record (:func:`check_other_host_agent`); with
    ``force`` it is removed when that agent looks dead. Whatever the agent's state, once no agent
    of this host runs, the rsyncs that dead agents of this host left running are ended
    (:func:`end_orphan_rsyncs`).
    """
    site_path = Path(site_path).absolute()
    try:
        return _stop_recorded_agent(site_path, timeout=timeout, force=force, progress=progress, client=client,
                                    echo=echo)
    finally:
        # Also when the agent did not stop in time: the records of a live agent's own rsyncs are
        # skipped (RunningRsyncs.end_orphans checks each record's owner), only dead agents' end.
        end_orphan_rsyncs(site_path, echo)


def _stop_recorded_agent(site_path: Path, *, timeout: Optional[float], force: bool,
                         progress: Optional[Callable[[float, float], None]], client: Any,
                         echo: Callable[[str], None]) -> Optional[int]:
    """:func:`stop_agent` but for the orphan rsyncs."""
    record = read_pid_record(site_path)
    if record is None:
        if pid_file_of_another_directory(site_path):
            # Copied with this directory: its agent serves the original, and is never signalled here.
            pid_file_path(site_path).unlink(missing_ok=True)
        return None
    host, pid, start_time = record
    if host != socket.gethostname():
        note = check_other_host_agent(site_path, _default_client(client), force=force, command="stop")
        if note:
            echo(note)
        return None
    # A pid file of an older balsam has no start time: the process's own, read *before* the check
    # that it runs the agent, dates the process checked (the one signalled below, never a later one).
    started = start_time if start_time is not None else process_start_time(pid, running=True)
    if started is None or not recorded_agent_alive(record) or not same_process(pid, started):
        pid_file_path(site_path).unlink(missing_ok=True)
        return None
    # Read while the agent runs: once it is gone, its scheduler commands are no one's descendants.
    # Its own shutdown ends these groups (Agent.shutdown); this is for an agent that exits without
    # doing so (killed meanwhile, its shutdown failed). Read again before a --force kill.
    commands = agent_command_groups(pid)
    if timeout is None:
        timeout = agent_stop_timeout(site_path)  # read before the SIGTERM: the agent removes its pid file
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass  # exited since the check: its leftovers are still ended below
    begin = time.monotonic()
    while pid_alive(pid, started):
        elapsed = time.monotonic() - begin
        if progress is not None:
            progress(elapsed, timeout)
        if elapsed > timeout:
            if not force:
                raise AgentStopTimeout(f"the site agent [pid {pid}] did not stop within {timeout:.0f} s (use --force to "
                                       "kill it)")
            commands = _merge_command_groups(commands, agent_command_groups(pid))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            time.sleep(0.5)
            pid_file_path(site_path).unlink(missing_ok=True)
            break
        time.sleep(0.2)
    end_group_leftovers(pid, started, commands=commands)
    return pid


def end_orphan_rsyncs(site_path: Path, echo: Callable[[str], None] = lambda _msg: None) -> list[int]:
    """End the rsyncs (with their ssh) recorded in ``<site>/.rsync-running/`` by agents of this host
    that no longer run: what the next agent's rsync backend does when it is built
    (:meth:`balsam.builtin.rsync_transfer.RunningRsyncs.end_orphans`, the same rule: only the
    recorded processes, never a pid now held by another process, nor another user's), so that
    they do not run on until an agent starts again on this host. Returns the pids ended."""
    from ..builtin.rsync_transfer import RunningRsyncs

    running = RunningRsyncs(str(site_path))
    try:
        ended = running.end_orphans()
    except OSError as exc:
        echo(f"Warning: cannot look for the rsyncs a dead agent left running in {running.directory}: {exc}")
        return []
    if ended:
        echo(f"Ended {len(ended)} processes (rsync and its ssh) that a dead site agent left running "
             f"(pids {', '.join(map(str, ended))})")
    return ended


def agent_command_groups(agent_pid: int) -> Optional[tuple[int, set[int]]]:
    """The live agent's session id and the process groups, other than its own, of its descendants
    in that session: the scheduler commands it runs, each the leader of a group of its own so that
    a Ctrl-C or SIGHUP at its terminal does not cut them (``balsam.scheduler.subprocess_runner``),
    with what they started. Read before the agent is killed: then they are no one's descendants.
    A batch job of the local scheduler, in a session of its own, is not counted, not even while
    the submit command that starts it is still its parent: a batch job outlives the agent. None
    when the agent cannot be read (gone)."""
    import psutil

    try:
        session, own_group = os.getsid(agent_pid), os.getpgid(agent_pid)
        descendants = psutil.Process(agent_pid).children(recursive=True)
    except (OSError, psutil.Error):
        return None
    groups = set()
    for proc in descendants:
        try:
            if os.getsid(proc.pid) == session and os.getpgid(proc.pid) != own_group:
                groups.add(os.getpgid(proc.pid))
        except OSError:  # exited meanwhile
            continue
    return session, groups


def _merge_command_groups(first: Optional[tuple[int, set[int]]],
                          second: Optional[tuple[int, set[int]]]) -> Optional[tuple[int, set[int]]]:
    if first is None or second is None:
        return first or second
    return first[0], first[1] | second[1]  # one agent, one session


def end_group_leftovers(leader_pid: int, leader_start: Optional[float], grace_sec: float = 3.0,
                        commands: Optional[tuple[int, set[int]]] = None) -> list[int]:
    """End processes still in the process group of the exited agent ``leader_pid`` (e.g. a scheduler
    command that hung when the agent was killed), and in the groups of its scheduler commands
    (``commands``: :func:`agent_command_groups`, read just before the agent was killed; only the
    processes still in its session). Only processes started after the agent are touched: while
    such a process lives, the kernel cannot give the group's id to anyone else. Once the agent is
    gone its pid may be given again: a process that holds ``leader_pid`` now and is not the agent
    (another start time, :func:`balsam.util.same_process`) may lead a group of that id, which is
    not the agent's: nothing is touched then."""
    import psutil

    if leader_start is None:
        return []
    if not same_process(leader_pid, leader_start, running=False) and process_start_time(leader_pid) is not None:
        return []  # the pid was given to another process since: a group of that id is not the agent's
    return _sweep(lambda: _group_members(leader_pid, leader_start, commands), grace_sec)


#: How many times a sweep of leftover processes lists them again: a process that its SIGTERM
#: reaches may start another as it ends (a wrapper whose TERM trap starts a cleanup helper in the
#: background), one the listing before did not have, in the same group. A round whose processes
#: ignore SIGTERM takes twice the grace (SIGTERM, SIGKILL): a sweep takes up to 3 x 2 x grace.
SWEEP_ROUNDS = 3


def _sweep(members: Callable[[], list[Any]], grace_sec: float) -> list[int]:
    """:func:`terminate_processes` for what ``members`` lists, listed again after each round
    until it lists nothing not yet signalled (at most :data:`SWEEP_ROUNDS` rounds)."""
    ended: list[int] = []
    for _round in range(SWEEP_ROUNDS):
        signalled = set(ended)  # also a zombie of the round before, still listed until reaped
        procs = [proc for proc in members() if proc.pid not in signalled]
        if not procs:
            break
        ended += terminate_processes(procs, grace_sec)
    return ended


def _group_members(leader_pid: int, leader_start: float, commands: Optional[tuple[int, set[int]]],
                   leader_group: bool = True) -> list[Any]:
    """The processes, other than ``leader_pid``, started after ``leader_start`` that are in the group
    ``leader_pid`` (unless not ``leader_group``) or in one of the ``commands`` groups
    (:func:`agent_command_groups`) and still in that session."""
    import psutil

    session, command_groups = commands if commands is not None else (None, set())
    members = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if proc.pid == leader_pid or proc.info["create_time"] < leader_start - START_TIME_TOLERANCE_SEC:
                continue
            group = os.getpgid(proc.pid)
            if (leader_group and group == leader_pid) or (group in command_groups and os.getsid(proc.pid) == session):
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def end_own_command_groups(commands: Optional[tuple[int, set[int]]], grace_sec: float = 3.0) -> list[int]:
    """In the agent's own shutdown: end what is left in the groups of its scheduler commands
    (``commands``: :func:`agent_command_groups` of this process, read before its descendants were
    ended). A hung command's child that left it (reparented: no descendant of the agent any more)
    stays in the command's group, holding its output pipe; while the command ran in the agent's
    group, the agent's stop ended it with the group. Only processes of this session started after
    the agent are touched (the rule of :func:`end_group_leftovers`). Returns the pids ended."""
    if not commands or not commands[1]:
        return []
    started = process_start_time(os.getpid())
    if started is None:
        return []
    # Not the agent's own group: a live agent shares it with what is not its own (`| tee` at a
    # terminal); its descendants there were ended by kill_descendants.
    return _sweep(lambda: _group_members(os.getpid(), started, commands, leader_group=False), grace_sec)
