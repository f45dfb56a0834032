"""``balsam site init|start|stop|status|sync|ls|rm|mv|rename`` (attached to the ``site`` group of cli/site.py)."""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import click

from . import confirm_or_yes
from ._site_selector import json_option, write_json_array

ACTIVE_WINDOW = dt.timedelta(minutes=2)


def _client() -> Any:
    from balsam.client import load_client

    return load_client()


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _site_path(path: Optional[str]) -> Path:
    from balsam.config import SiteConfig

    return Path(SiteConfig.resolve_site_path(path))


def _site_config(path: Optional[str]) -> Any:
    from balsam.config import SiteConfig

    return SiteConfig(path)


def _stderr_tty() -> bool:
    """Whether the progress lines go to a terminal (the one place that asks, so a test can say).
    With stderr closed (``2>&-``) sys.stderr is None: no terminal, and the stop goes on."""
    try:
        stream = sys.stderr
        return stream is not None and stream.isatty()
    except (ValueError, OSError):  # a closed or broken stream
        return False


def _terminal_columns() -> int:
    """The width for stderr's progress line, read as shutil.get_terminal_size reads stdout's: a
    positive COLUMNS first, then the terminal stderr is (``site stop | tee log`` leaves stdout none),
    and where that says 0 (a new pty, ``ssh -tt`` from a script: the line was cut to its last
    column, "s") the default's (stdout's terminal, 80)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isascii() and columns.isdecimal() and int(columns) > 0:
        return int(columns)
    try:
        width = os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, ValueError, OSError):  # no stderr, or a file, pipe or test capture
        width = 0
    return width or shutil.get_terminal_size().columns


#: A list of ids on a progress line: "(1, 2, 3)" or "(1, 2, 3 and 4 more)" (:func:`_some_ids`).
_ID_LIST = re.compile(r"\((\d+(?:, \d+)*)(?: and (\d+) more)?\)")
#: A progress line's counter, kept whole when the line is cut: " 12/65 s".
_COUNTER = re.compile(r" *\d+/\d+ s$")


def _fit(text: str, width: int) -> str:
    """``text`` in at most ``width`` columns: a line wider than the terminal wraps, and '\\r' goes
    back to its last row only, so each redraw added a row. Fewer ids first ("(ids 1, 2, ... 3
    more)"; a form only where it is shorter: "(1 ids)" is not, of "(7)"), then the words are cut
    before the counter; a cut that would fall inside the parentheses drops them whole."""
    if len(text) <= width:
        return text
    match = _ID_LIST.search(text)
    span = None
    if match:
        ids, more = match.group(1).split(", "), int(match.group(2) or 0)
        before, after = text[:match.start()], text[match.end():]
        for keep in range(len(ids) - 1, -1, -1):
            rest = len(ids) - keep + more
            inner = f"ids {', '.join(ids[:keep])}, ... {rest} more" if keep else f"{rest} ids"
            candidate = f"{before}({inner}){after}"
            if len(candidate) < len(text):
                text = candidate
                if len(text) <= width:
                    return text
        span = (len(before), len(text) - len(after))
    counter = _COUNTER.search(text)
    tail = counter.group(0) if counter else ""
    if len(tail) >= width:
        return text[-width:] if width > 0 else ""
    cut = width - len(tail)
    if span and span[0] < cut < span[1]:  # "(1, 2" or "(8 id" reads as an id list cut short
        cut = len(text[:span[0]].rstrip())
    return text[:cut] + tail


#: Off a terminal a wait's progress line whose words have not changed is printed again after this long.
PROGRESS_EVERY_SEC = 10.0


class _ProgressLine:
    """A wait's progress line on stderr. On a terminal it is redrawn in place ('\\r') each time;
    in a log or a pipe that made one line of 20-40 fragments, so there each line is printed on its
    own, when its words (``key``, all but the counter) change or after PROGRESS_EVERY_SEC."""

    def __init__(self) -> None:
        self.tty = _stderr_tty()
        self.drawn = ""  # the text the terminal shows, "" when no line is open
        self.key: object = None
        self.printed_at = 0.0

    def show(self, text: str, key: object, now: float) -> None:
        if self.tty:
            # One column short of the width: a full row leaves the cursor past its end on some terminals.
            width = max(1, _terminal_columns() - 1)
            text = _fit(text, width)
            click.echo("\r" + text.ljust(min(len(self.drawn), width)), nl=False, err=True)
            self.drawn = text
        elif key != self.key or now - self.printed_at >= PROGRESS_EVERY_SEC:
            click.echo(text, err=True)
            self.key, self.printed_at = key, now

    def end(self) -> None:
        """End the redrawn line (before the next message: an outcome, a warning, an error)."""
        if self.drawn:
            click.echo("", err=True)
            self.drawn = ""


def _name_refusal(exc: Exception, hint: str) -> Optional[click.ClickException]:
    """The server's refusal of a site name (HTTP 409: taken; 422 on ``name``), as its reason and
    ``hint``, without the transport's ``POST unix:///... failed with HTTP 422:`` prefix; else None."""
    from balsam.client.rest import APIError

    if not isinstance(exc, APIError) or exc.status_code not in (409, 422):
        return None
    reason = str(exc).partition(f" failed with HTTP {exc.status_code}: ")[2] or str(exc.detail)
    if exc.status_code == 422:
        if not reason.startswith("name: "):
            return None
        reason = "site name refused: " + reason[len("name: "):]
    elif "name" not in reason:
        return None
    return click.ClickException(f"{reason}. {hint}")


@click.command("init")
@click.argument("site_path", type=click.Path(file_okay=False, dir_okay=True, writable=True))
@click.option("-n", "--name", help="Site name (unique among your sites; default: the directory name)")
@click.option("--platform", "platform_name", help="Platform plugin (see `balsam plugins ls`); asked when omitted in a terminal")
@click.option("--scheduler", "scheduler_name", help="Scheduler plugin, when not the platform's own (e.g. slurm with the default platform)")
@click.option("-A", "--project", "projects", multiple=True,
              help="Project (allocation) BatchJobs may charge; repeat for several (default: the machine's or the scheduler's list)")
def init(site_path: str, name: Optional[str], platform_name: Optional[str], scheduler_name: Optional[str],
         projects: tuple[str, ...]) -> None:
    """Create a new site directory and register it with the API.

    Without --platform, every installed platform plugin is offered (the one that recognises this
    host first); outside a terminal the recognised one, else 'default', is taken.
    """
    from balsam.site.site_ops import available_platforms, detect_platform, init_site, platform_projects

    path = Path(site_path).expanduser().absolute()
    interactive = _interactive()
    # `-A ""` (an empty variable in a script) stored allowed_projects [''], a project no BatchJob can name.
    projects = tuple(p.strip() for p in projects if p.strip())
    if platform_name is None:
        platforms = available_platforms()
        detected = detect_platform()
        fallback = detected or ("default" if "default" in platforms or not platforms else next(iter(platforms)))
        if interactive and len(platforms) > 1:
            names = list(platforms)
            click.echo("Select the platform of this machine:")
            digits = len(str(len(names)))  # right-aligned: from 10) on the names kept their column
            for index, pname in enumerate(names, 1):
                mark = "  (this host)" if pname == detected else ""
                click.echo(f"  {index:>{digits}}) {pname:<20} {platforms[pname]}{mark}")
            default_index = names.index(fallback) + 1 if fallback in names else 1
            choice = click.prompt("Platform", type=click.IntRange(1, len(names)), default=default_index)
            platform_name = names[choice - 1]
        else:
            platform_name = fallback
    if name is None:
        name = click.prompt("Site name", default=path.name) if interactive else path.name
    if not projects and interactive:
        suggested = ",".join(platform_projects(platform_name))
        answer = click.prompt("Projects (allocations) BatchJobs may charge, comma separated"
                              + ("" if suggested else " (empty: ask the scheduler)"), default=suggested)
        projects = tuple(p.strip() for p in answer.split(",") if p.strip())
    try:
        site_id = init_site(path, name, platform_name, _client(), echo=click.echo, scheduler_name=scheduler_name,
                            projects=list(projects) or None)
    except Exception as exc:
        refusal = _name_refusal(exc, "Choose another name with -n NAME (the default is the directory's name)")
        if refusal is None:
            raise
        raise refusal from None
    click.echo(f"New Balsam site {name!r} (id {site_id}, platform {platform_name}) set up at {path}")
    click.echo(f"Next: cd {shlex.quote(str(path))} && balsam site start")  # a path with a space must paste as one


@click.command("start")
@click.argument("site_path", required=False)
@click.option("--force", is_flag=True,
              help="Drop a pid file naming another host whose agent looks dead (the site not refreshed for a few sync periods)")
def start(site_path: Optional[str], force: bool) -> None:
    """Start the site agent in the background (run inside a site, or give its path)."""
    from balsam.site.site_ops import check_site_on_server, start_agent

    path = _site_path(site_path)
    client = _client()
    try:
        check_site_on_server(client, path)  # an agent for a deleted record would log HTTP 404 forever
    except ConnectionError as exc:  # ServerUnavailable: the agent rides out an outage, let it start
        click.echo(f"Warning: could not check the site with the server ({exc}); starting the agent anyway", err=True)
    pid = start_agent(path, force=force, client=client, echo=click.echo)
    click.echo(f"Started Balsam site agent [pid {pid}] on {socket.gethostname()} (logs in {path / 'log'})")


def _after_line(line: _ProgressLine, message: str) -> None:
    """Print ``message`` on its own line, after ending the progress line open on the terminal."""
    line.end()
    click.echo(message)


def _stop(path: Path, timeout: float, force: bool, outcome: Optional[dict] = None) -> Optional[int]:
    """Stop the agent; ``outcome["killed"]`` says whether --force had to kill it (SIGKILL after the timeout)."""
    from balsam.site.site_ops import stop_agent

    shown = {"last": -1}
    line = _ProgressLine()
    outcome = outcome if outcome is not None else {}
    outcome["killed"] = False

    def progress(elapsed: float, total: float) -> None:
        # stop_agent kills the agent right after reporting a wait past the timeout (with --force).
        if force and elapsed > total:
            outcome["killed"] = True
        second = int(elapsed)
        if second >= 1 and second != shown["last"]:
            shown["last"] = second
            line.show(f"Waiting for the site agent to stop... {second:>2d}/{int(total)} s", "stop", second)

    try:
        # stop_agent's messages ("Ended N processes...") come before the finally's end: end the open line first
        return stop_agent(path, timeout=timeout, force=force, progress=progress,
                          echo=lambda msg: _after_line(line, msg))
    finally:
        line.end()  # also before the error of a stop that timed out


#: `balsam site stop`'s wait for the BatchJobs `balsam queue term` marked (pending_deletion): the
#: agent deletes their scheduler jobs at its next scheduler poll and records them finished at the
#: one after, so it waits at most this many scheduler.sync_period (one with --force: the deletions
#: are made by then, the launchers end, only their record waits for the next agent) and a margin
#: (the cycle itself, a launcher's exit). It waited up to its whole timeout (45 s), also for
#: BatchJobs the agent could not end.
TERM_WAIT_SYNC_PERIODS = 2
TERM_WAIT_MARGIN_SEC = 5.0
#: Each read of the marked BatchJobs gives up after this long: a server that accepts and never
#: answers held every `site stop` for its read timeout (120 s), with nothing marked.
TERM_WAIT_READ_SEC = 3.0
#: The marked BatchJobs read per poll (the count says how many more) and named on the wait's line.
TERM_WAIT_READ_LIMIT = 100
TERM_WAIT_SHOWN_IDS = 5


def _some_ids(ids: list[int], count: int) -> str:
    """The first few ids and how many more (300 ids, redrawn each second, wrapped the line)."""
    shown = ", ".join(map(str, ids[:TERM_WAIT_SHOWN_IDS]))
    more = count - min(len(ids), TERM_WAIT_SHOWN_IDS)
    return f"{shown} and {more} more" if more > 0 else shown


#: How the agent names its log (:func:`balsam.site.agent.setup_logging`): its local time then.
AGENT_LOG_NAME_FORMAT = "agent_%Y-%m-%d_%H%M%S.log"


def _log_name_instants(log: Path) -> list[float]:
    """The instants the local time in an agent log's name can stand for: two in the hour daylight
    saving's fall-back repeats (fold 0 and 1), one otherwise; none for a name not in that form."""
    try:
        local = dt.datetime.strptime(log.name, AGENT_LOG_NAME_FORMAT)
    except ValueError:
        return []
    return sorted({local.replace(fold=fold).timestamp() for fold in (0, 1)})


def _running_agent_log(log_dir: Path, started: Optional[float]) -> Optional[Path]:
    """The running agent's log: the first log named at or after its process start (``started``,
    from the pid record; 1 s for the name's whole seconds). Not the log written last: an idle agent
    writes rarely (its alive line every 10 minutes), and an old log touched meanwhile (an editor,
    `touch`, logrotate's copytruncate) was named instead; not the last name either: in the hour the
    fall-back repeats an agent started then names its log before the previous agent's; and not a
    later log: a `site start` refused (the agent runs) leaves a log of its own. The log written
    last without a start time (a pid file of an older version) or when no name is at or after it
    (`site status` run with another ``TZ`` than the agent's, its log removed); None: no log."""
    logs = list(log_dir.glob("agent_*.log"))
    if started is not None:
        named = [(when, log.name, log) for log in logs for when in _log_name_instants(log) if when >= started - 1]
        if named:
            return min(named)[2]
    stamped = []
    for log in logs:
        try:
            stamped.append((log.stat().st_mtime, log.name, log))
        except OSError:  # removed since the listing
            continue
    return max(stamped)[2] if stamped else None


def _agent_cannot_end(row: dict, since: dt.datetime) -> Optional[str]:
    """Why the agent cannot end this marked BatchJob now, from the error its scheduler module
    records in status_info (None: nothing says so): its status poll failing (that error stays
    until the scheduler answers again), or an error recorded since ``since`` (aware), when the wait
    began: a delete that failed, the lookup of a submission never recorded that failed."""
    from balsam.site.modules.scheduler import _STATUS_UNAVAILABLE, SCHEDULER_STATUS_ERROR

    info = row.get("status_info") or {}
    if info.get(SCHEDULER_STATUS_ERROR):  # the poll's outage (an agent before this key wrote it as `error`)
        return str(info[SCHEDULER_STATUS_ERROR])
    error = str(info.get("error") or "")
    if not error:
        return None
    if error.startswith(_STATUS_UNAVAILABLE):
        return error
    try:
        when = dt.datetime.fromisoformat(str(info.get("error_time") or ""))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return error if when >= since else None


def _await_terminations(path: Path, until: float, *, sync_periods: int = TERM_WAIT_SYNC_PERIODS) -> None:
    """Wait until the running agent has ended this site's BatchJobs that `balsam queue term` marked
    (pending_deletion), at the latest until ``until`` (time.monotonic()) or ``sync_periods`` scheduler
    sync periods and a margin: stopped first, the agent left their launchers running until their
    idle timeout or wall time, although the README's `balsam queue term --id ID; balsam site stop`
    is the way to end everything. Not at all when the server does not answer the first read within
    TERM_WAIT_READ_SEC (the agent is stopped at once), nor for BatchJobs the agent says it cannot
    end now (:func:`_agent_cannot_end`); Ctrl-C ends the wait, and the agent is stopped."""
    from balsam.cli import error_line
    from balsam.site.agent import agent_running, settings_section

    running = agent_running(path)
    if running is None or running[0] != socket.gethostname():
        return
    try:
        config = _site_config(str(path))
        site_id = config.site_id
        client = _client()
        client.retry_count = 0  # a server that does not answer: stop the agent without delay
    except Exception:
        return
    enabled = True
    period = 10.0  # the default sync_period, where settings.yml does not load now
    try:
        section = settings_section(config.settings, "scheduler")
        enabled = section is not None
        period = float(getattr(section, "sync_period", period))
    except Exception:  # broken since the agent started, which runs with what it read then
        pass
    began = time.monotonic()
    since = dt.datetime.now(dt.timezone.utc)
    until = min(until, began + sync_periods * period + TERM_WAIT_MARGIN_SEC)

    def read() -> tuple[int, list[dict]]:
        payload = client.get("/batch-jobs/", params={"site_id": site_id, "state": "pending_deletion",
                                                     "limit": TERM_WAIT_READ_LIMIT},
                             deadline=min(until, time.monotonic() + TERM_WAIT_READ_SEC))
        rows = sorted(payload.get("results") or [], key=lambda row: int(row["id"]))
        return int(payload.get("count", len(rows))), rows

    try:
        count, rows = read()
    except Exception as exc:
        click.echo(f"Warning: cannot read the site's BatchJobs ({error_line(exc)}): not waiting for those `balsam "
                   "queue term` marked", err=True)
        return
    if not count:
        return
    if not enabled:
        click.echo(f"Warning: BatchJob(s) {_some_ids([int(r['id']) for r in rows], count)} await deletion, but the "
                   "site's scheduler module is off (`scheduler:` in settings.yml): nothing ends them", err=True)
        return
    line = _ProgressLine()
    stuck: dict[int, str] = {}
    try:
        while True:
            stuck = {int(row["id"]): why for row in rows if (why := _agent_cannot_end(row, since))}
            waiting = [int(row["id"]) for row in rows if int(row["id"]) not in stuck]
            left = count - len(stuck)
            now = time.monotonic()
            if left <= 0 or now >= until:
                break
            if now - began >= 1:  # counted as the agent's stop counts: from its first second
                words = (f"Waiting for the site agent to end {left} BatchJob(s) marked by `balsam queue term` "
                         f"({_some_ids(waiting, left)})...")
                line.show(f"{words} {int(now - began):>2d}/{int(until - began)} s", words, now - began)
            time.sleep(max(0.0, min(1.0, until - now)))
            if time.monotonic() >= until:
                break  # no read past the wait's end (it would be refused unsent): the last one tells
            try:
                count, rows = read()
            except Exception as exc:
                line.end()
                click.echo(f"Warning: cannot read the site's BatchJobs any longer ({error_line(exc)}): stopping the "
                           "site agent", err=True)
                return
    except KeyboardInterrupt:
        line.end()
        click.echo("Interrupted: no longer waiting for the BatchJobs `balsam queue term` marked; stopping the site "
                   "agent (Ctrl-C again to abort)", err=True)
        return
    line.end()
    if stuck:
        first = next(iter(stuck.values()))
        click.echo(f"Warning: the site agent cannot end BatchJob(s) {_some_ids(sorted(stuck), len(stuck))} now "
                   f"({first}): not waiting for them; `balsam site start` tries again", err=True)
    still = [row for row in rows if int(row["id"]) not in stuck]
    if count - len(stuck) > 0:
        submitted = [row for row in still if row.get("scheduler_id") is not None]
        runs_on = ("; their launchers run on until idle (launcher.idle_ttl_sec) or their wall time"
                   if submitted or count > len(rows) else "")
        click.echo(f"Warning: BatchJob(s) {_some_ids([int(r['id']) for r in still], count - len(stuck))} still await "
                   f"deletion after {time.monotonic() - began:.0f} s{runs_on}; `balsam site start` has them ended",
                   err=True)


@click.command("stop")
@click.argument("site_path", required=False)
@click.option("-t", "--timeout", type=float, default=None,
              help="Seconds the whole command waits: for the BatchJobs `balsam queue term` marked (at most half), "
              "then for a clean stop [default: up to 2 scheduler sync periods + 5 s, then the agent's stop wait "
              "($BALSAM_AGENT_STOP_WAIT_SEC at its start, 15 s unset) + 30 s, at least 45 s]")
@click.option("--force", is_flag=True, help="Kill the agent if it has not stopped within the timeout (and wait for "
              "the marked BatchJobs one sync period at most); drop a pid file naming another host whose agent looks "
              "dead (the site not refreshed for a few sync periods)")
def stop(site_path: Optional[str], timeout: Optional[float], force: bool) -> None:
    """Stop the site agent cleanly (SIGTERM, then wait); first let it end the BatchJobs `balsam queue
    term` marked."""
    from balsam.site.agent import agent_stop_timeout

    path = _site_path(site_path)
    began = time.monotonic()
    periods = 1 if force else TERM_WAIT_SYNC_PERIODS
    if timeout is None:
        _await_terminations(path, float("inf"), sync_periods=periods)
        # What the agent's own stop may take: its stop wait, recorded in its pid file at its start.
        stop_timeout = agent_stop_timeout(path)
    else:
        # -t is the whole command's: the wait for the marked BatchJobs takes at most half of it (it
        # doubled it), the agent's stop what remains; --force kills it at -t.
        _await_terminations(path, began + timeout / 2, sync_periods=periods)
        stop_timeout = max(0.0, began + timeout - time.monotonic())
    outcome: dict = {}
    pid = _stop(path, stop_timeout, force, outcome)
    if pid is None:
        click.echo("The site agent is not running.")
    elif outcome.get("killed"):
        # Not "shutdown OK": the agent skipped its clean stop (modules' close(), log buffer, session).
        total = stop_timeout if timeout is None else timeout
        click.echo(f"Site agent [pid {pid}] did not stop within {total:.0f} s: killed (SIGKILL; no clean shutdown)")
    else:
        click.echo(f"Site agent [pid {pid}] shutdown OK")


@click.command("status")
@click.argument("site_path", required=False)
def status(site_path: Optional[str]) -> None:
    """Say whether the site agent runs (pid, since when, log); exit status 0 running, 1 not, 2 unknown."""
    from balsam.config import SiteNotFoundError
    from balsam.site.agent import (
        pid_file_of_another_directory, pid_file_path, read_pid_record, recorded_agent_alive,
        settings_changed_since_start,
    )

    try:
        path = _site_path(site_path)
    except SiteNotFoundError as exc:
        # Not "not running" (1): a script restarting the agent on 1 would start one somewhere wrong.
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    pid_file = pid_file_path(path)
    record = read_pid_record(path)
    if record is None:
        try:
            pid_file.read_text()
        except FileNotFoundError:
            click.echo("The site agent is not running.")
            sys.exit(1)
        except OSError as exc:
            click.echo(f"Cannot read the pid file {pid_file} ({exc.strerror or exc}): whether the site agent runs "
                       "is unknown", err=True)
            sys.exit(2)
        if pid_file_of_another_directory(path):
            click.echo(f"The site agent is not running in {path} (its pid file {pid_file} names the agent of another "
                       "directory, copied with this one; `balsam site start` replaces it).")
            sys.exit(1)
        # There, readable, but not hostname/pid/start time: not an agent's (they write it whole).
        click.echo(f"The pid file {pid_file} is not one a site agent wrote (not host, pid, start time): whether "
                   "the site agent runs is unknown", err=True)
        sys.exit(2)
    host, pid, started = record
    if host != socket.gethostname():
        # Its processes cannot be looked at from here; the server's last refresh tells (site ls).
        click.echo(f"The pid file {pid_file} names a site agent on {host} [pid {pid}]: it cannot be checked "
                   f"from {socket.gethostname()} (`balsam site ls` says whether the site is Active)")
        sys.exit(2)
    if not recorded_agent_alive(record):
        click.echo(f"The site agent is not running (the pid file of pid {pid}, left by an agent that did not stop "
                   "cleanly, is replaced at the next `balsam site start`).")
        sys.exit(1)
    log = _running_agent_log(path / "log", started)
    since = ""
    if started is not None:
        up = dt.timedelta(seconds=int(dt.datetime.now().timestamp() - started))
        # With its zone: an agent started before a daylight saving change reads an hour off otherwise.
        since = f" since {dt.datetime.fromtimestamp(started).astimezone():%Y-%m-%d %H:%M:%S %Z} (up {up})"
    click.echo(f"Site agent running on {host} [pid {pid}]{since}; log {log or path / 'log'}")
    # The agent's own test (its content, not its mtime: a `touch` or an edit undone is no change).
    changed = settings_changed_since_start(path, path / "settings.yml")
    if changed is None and started is not None:
        # A pid file with no digest of the text (an agent started by an older version): the mtime
        # is all there is to go by.
        try:
            changed = (path / "settings.yml").stat().st_mtime > started
        except OSError:
            changed = False
    if changed:
        click.echo("settings.yml was changed since the agent started: it keeps the settings it started with until "
                   "`balsam site sync` (or a restart)")


@click.command("sync")
@click.argument("site_path", required=False)
def sync(site_path: Optional[str]) -> None:
    """Push settings.yml (queues, projects, params, transfer locations) to the API; restart a running agent."""
    from balsam.config import SettingsError
    from balsam.site.agent import AgentError, agent_running, recorded_stop_wait, stop_timeout, stop_wait_sec
    from balsam.site.site_ops import AgentStopTimeout, SiteError, check_copy_agent, push_site_settings, start_agent

    config = _site_config(site_path)
    try:
        config.settings  # checked before anything is pushed or restarted
    except SettingsError as exc:
        for problem in exc.errors[:-1]:
            click.echo(f"Error: {problem}", err=True)
        # Say what the refusal leaves in place: an agent already running goes on as it was.
        running = agent_running(Path(config.site_path))
        if running is None:
            kept = "nothing was pushed; no site agent is running"
        else:
            where = "" if running[0] == socket.gethostname() else f" on {running[0]}"
            kept = f"nothing was pushed; the running site agent [pid {running[1]}{where}] keeps its current settings"
        last = exc.errors[-1] if exc.errors else str(exc)
        raise click.ClickException(f"{last} ({kept})") from None
    path = Path(config.site_path)
    running = agent_running(path)
    restart = running is not None and running[0] == socket.gethostname()
    # The restarted agent keeps the stop wait the running one recorded at its start (this
    # environment's $BALSAM_AGENT_STOP_WAIT_SEC, when set, replaces it): read before it stops, which
    # removes its pid file. A value here the agent would refuse stops nothing.
    stop_wait = recorded_stop_wait(path) if restart else None
    if restart:
        try:
            stop_wait_sec()
        except AgentError as exc:
            raise click.ClickException(f"{exc} (nothing was pushed; the running site agent [pid {running[1]}] "
                                       "keeps its current settings)") from None
    client = _client()
    if running is None:
        # A directory with no agent of its own may be a copy of a site whose agent runs elsewhere
        # (an agent here claimed the site record's path at its start).
        try:
            check_copy_agent(client, path, command="sync")
        except SiteError as exc:
            raise click.ClickException(str(exc)) from None
    push_site_settings(client, config)
    click.echo(f"Updated site {config.site_id} from {config.settings_path}.")
    if restart:
        click.echo(f"Restarting the site agent [pid {running[1]}] ...")
        timeout = stop_timeout(stop_wait)
        try:
            _stop(path, timeout, False)
        except AgentStopTimeout:
            # The SIGTERM went: the agent goes on stopping, and nothing restarts it.
            raise click.ClickException(
                f"the site agent [pid {running[1]}] did not stop within {timeout:.0f} s and was not restarted: it "
                f"goes on stopping (cycles in progress, hooks, its modules' close); once `balsam site status` says "
                f"it is not running, `balsam site start {shlex.quote(str(path))}` starts it with the new settings") from None
        pid = start_agent(path, stop_wait_sec=stop_wait)
        click.echo(f"Started Balsam site agent [pid {pid}] on {socket.gethostname()}")
    elif running is not None:
        # Its processes cannot be signalled from here: say so, or the user expects the new settings applied.
        click.echo(f"The site agent runs on {running[0]} [pid {running[1]}] and was not restarted: agent settings "
                   f"apply at its start; on {running[0]} run `balsam site stop {config.site_path}` then "
                   f"`balsam site start {config.site_path}`.")


def _is_active(site: dict) -> bool:
    from balsam.serialization import parse_datetime

    stamp = site.get("last_refresh")
    if not stamp:
        return False
    try:
        return dt.datetime.now(dt.timezone.utc) - parse_datetime(stamp) < ACTIVE_WINDOW
    except ValueError:
        return False


@click.command("ls")
@click.option("-v", "--verbose", is_flag=True, help="Show every field of each site as YAML")
@json_option
def ls(verbose: bool, as_json: bool) -> None:
    """List your sites (Active = the site record was refreshed within the last 2 minutes: by its agent, or by
    `balsam site init/sync/mv/rename`)."""
    from balsam.site.service_client import list_all

    from ._site_selector import dump_yaml

    sites = sorted(list_all(_client(), "/sites/"), key=lambda s: s["id"])
    if as_json:
        _print_sites_json(sites)
        return
    if not sites:
        click.echo("No sites yet: create one with `balsam site init PATH`.")
        return
    if verbose:
        click.echo("\n---\n".join(dump_yaml(s).rstrip() for s in sites))
        return
    rows = [("ID", "Name", "Path", "Active")]
    for site in sites:
        path = str(site["path"])
        if len(path) > 40:
            path = "..." + path[-37:]
        rows.append((str(site["id"]), site["name"], path, "Yes" if _is_active(site) else "No"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _print_sites_json(sites: list[dict]) -> None:
    """``site ls --json``: each site's record as the server sent it (what ``-v`` shows), datetimes
    with their UTC offset (ISO 8601, as the other ``--json`` listings), and ``active`` (the table's
    column)."""
    from balsam.api import Site
    from balsam.serialization import parse_datetime

    def records() -> Iterator[dict]:
        for site in sites:
            record = dict(site)
            for key, fld in Site._fields.items():
                if fld.is_datetime and record.get(key):
                    try:
                        record[key] = parse_datetime(record[key]).astimezone().isoformat()
                    except ValueError:
                        pass  # kept as the server wrote it
            record["active"] = _is_active(site)
            yield record

    write_json_array(records())


def _find_site_by_path(client: Any, path: Path) -> dict:
    from balsam.site.service_client import list_all

    matches = [s for s in list_all(client, "/sites/", {"path": str(path)}) if Path(s["path"]) == path]
    if not matches:
        raise click.ClickException(f"no site of yours has the path {path}")
    return matches[0]


#: BatchJobs in the scheduler's queue (or about to be removed from it by the site agent).
ACTIVE_BATCH_JOB_STATES = ["queued", "running", "pending_deletion"]


def _active_batch_jobs(client: Any, site_id: int) -> int:
    from balsam.site.service_client import count

    return count(client, "/batch-jobs/", {"site_id": site_id, "state": ACTIVE_BATCH_JOB_STATES})


def _batch_jobs_refusal(site: dict, active: int) -> str:
    """Why ``site rm``/``site mv`` refuse while ``active`` BatchJobs of ``site`` are in the scheduler's queue."""
    return (f"site {site['name']} has {active} BatchJob(s) queued or running: cancel them first with "
            f"`balsam queue term SCHEDULER_ID --site {site['id']}` (see `balsam queue ls --site {site['id']}`) and "
            "let the site agent remove them from the scheduler")


def _children_elsewhere(client: Any, site_id: int) -> dict[str, int]:
    """Per site name, the jobs of the user's *other* sites waiting (AWAITING_PARENTS) for an
    unfinished job of site ``site_id``. Deleting the site deletes those parents, and a deleted parent
    is not waited for (docs/api.md): the children are released as if it had finished, to stage in
    and run without its results. Requests: the user's waiting jobs (paged), this site's apps, and
    one per 500 of their parents (the unfinished ones of this site); nothing per job."""
    from balsam.site.service_client import chunks, count, list_all

    # One count first: a site with no unfinished job (often the case at rm) has no parent to wait
    # for, and the user's whole DAG elsewhere is not read (105 requests at 5x10^4 waiting jobs).
    if not count(client, "/jobs/", {"site_id": site_id, "state__ne": "JOB_FINISHED"}):
        return {}
    own_apps = {row["id"] for row in list_all(client, "/apps/", {"site_id": site_id})}
    waiting = [row for row in list_all(client, "/jobs/", {"state": "AWAITING_PARENTS"})
               if row["app_id"] not in own_apps]
    parents = sorted({p for row in waiting for p in row.get("parent_ids") or ()})
    here: set[int] = set()
    for chunk in chunks(parents, 500):
        here.update(row["id"] for row in list_all(
            client, "/jobs/", {"id": list(chunk), "site_id": site_id, "state__ne": "JOB_FINISHED"}))
    children = [row for row in waiting if here.intersection(row.get("parent_ids") or ())]
    if not children:
        return {}
    app_sites = {row["id"]: row["site_id"] for row in list_all(
        client, "/apps/", {"id": sorted({row["app_id"] for row in children})})}
    site_name = {row["id"]: row["name"] for row in list_all(client, "/sites/", {"id": sorted(set(app_sites.values()))})}
    per_site: dict[str, int] = {}
    for row in children:
        name = site_name.get(app_sites.get(row["app_id"], -1), "?")
        per_site[name] = per_site.get(name, 0) + 1
    return per_site


def _jobs_of_other_sites(per_site: dict[str, int]) -> str:
    total = sum(per_site.values())
    return f"{total} job{'' if total == 1 else 's'} of other sites"


#: Directories ``site rm`` reads looking for another site inside the one it deletes.
RM_SEARCH_DIRS = 100_000


@click.command("rm")
@click.argument("site_path")
@click.option("-f", "--force", is_flag=True,
              help="Delete the API record even if the directory is gone or BatchJobs are queued (keeps files)")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation")
def rm(site_path: str, force: bool, yes: bool) -> None:
    """Delete a site: its API record (with all its apps, jobs and BatchJobs) and its directory."""
    from balsam.site.agent import agent_running
    from balsam.site.service_client import count
    from balsam.site.site_ops import (
        SiteError, check_copy_agent, check_other_host_agent, read_site_id, search_below, site_label,
    )

    client = _client()
    path = Path(site_path).expanduser().absolute()
    if force:
        site = _find_site_by_path(client, path)
        active = _active_batch_jobs(client, site["id"])
        elsewhere = _children_elsewhere(client, site["id"])
        client.delete(f"/sites/{site['id']}")
        click.echo(f"Deleted site {site['name']} (id {site['id']}) from the API; {path} was left as it is.")
        if elsewhere:
            shown = ", ".join(f"{n} at {name}" for name, n in sorted(elsewhere.items()))
            click.echo(f"Note: {_jobs_of_other_sites(elsewhere)} ({shown}) waited for its unfinished "
                       "jobs: they are released as if those parents had finished, to stage in and run without "
                       "their results", err=True)
        if active:
            click.echo(f"Note: {active} of its BatchJobs were still queued or running: cancel them with the "
                       "scheduler's own command (qdel, scancel, ...); no agent will do it now.")
        return
    if not path.is_dir():
        raise click.ClickException(f"{path} does not exist (use --force to delete the API record by path)")
    site_id = read_site_id(path)
    check_other_host_agent(path, client, force=False, command="stop")  # a pid file of another host
    running = agent_running(path)
    if running is not None:
        raise click.ClickException(f"the site agent is running on {running[0]} [pid {running[1]}]: `balsam site stop` first")
    try:
        site = check_copy_agent(client, path, command="rm")  # a copy of a site whose agent runs elsewhere
    except SiteError as exc:
        raise click.ClickException(str(exc)) from None
    active = _active_batch_jobs(client, site_id)
    if active:
        # Deleting the record deletes its BatchJobs: nothing would then cancel them in the scheduler.
        raise click.ClickException(
            _batch_jobs_refusal(site, active) + ", or use --force (deletes the API record only)")
    # After the cheap refusals, and bounded: each directory costs a read (~24 us here, far more on
    # a parallel file system: a site of a million workdirs took 10-20 minutes on Lustre).
    inner, whole_tree = search_below(path, RM_SEARCH_DIRS)
    if inner is not None:
        # rmtree would delete that site's directory under its record (and under its running agent).
        raise click.ClickException(
            f"{path} holds another Balsam site, {site_label(inner)}: move it out "
            f"(`balsam site mv {shlex.quote(str(inner))} NEW_PATH`) or delete it (`balsam site rm`) first")
    if not whole_tree:
        # Going on: `site init` and `site mv` refuse a site inside another's tree, so only one
        # nested by hand (or by an older Balsam) can be past the first directories.
        click.echo(f"Note: looked for other Balsam sites in the first {RM_SEARCH_DIRS:,} directories of {path} "
                   "only (none there); the rest is deleted unsearched")
    num_jobs = count(client, "/jobs/", {"site_id": site_id})
    elsewhere = _children_elsewhere(client, site_id)
    if elsewhere:
        # Said before the question (and with -y): the delete releases them to run without their
        # parents' results, and nothing else would tell (their events read "All remaining parents
        # finished (deleted: N)" only once it is done).
        shown = ", ".join(f"{n} at {name}" for name, n in sorted(elsewhere.items()))
        click.echo(f"Warning: {_jobs_of_other_sites(elsewhere)} ({shown}) wait for unfinished jobs of "
                   f"{site['name']}: deleting it releases them as if those parents had finished, to stage in and "
                   "run without their results (`balsam job ls --state AWAITING_PARENTS --site all` lists them; "
                   "`balsam job rm` or fail them first if they cannot run without)", err=True)
    # End of input (a script without -y) says to pass -y (click's answer was a bare "Aborted!").
    if not yes and not confirm_or_yes(
            f"Do you really want to destroy {site['name']}? This will wipe out {num_jobs} jobs inside!"):
        raise click.Abort()  # "n": nothing deleted, status 1 as before
    client.delete(f"/sites/{site_id}")
    shutil.rmtree(path)
    click.echo(f"Deleted site {site['name']} (id {site_id}) and {path}")


@click.command("mv")
@click.argument("src")
@click.argument("dest")
def mv(src: str, dest: str) -> None:
    """Move a site directory and update its path in the API."""
    from balsam.site.agent import agent_running
    from balsam.site.site_ops import (
        SiteError, check_copy_agent, check_other_host_agent, enclosing_site, read_site_id, site_label,
    )

    src_path = Path(src).expanduser().absolute()
    dest_path = Path(dest).expanduser().absolute()
    site_id = read_site_id(src_path)
    client = _client()
    check_other_host_agent(src_path, client, force=False, command="stop")  # a pid file of another host
    if agent_running(src_path) is not None:
        raise click.ClickException("the site agent is running: `balsam site stop` first")
    if dest_path.exists():
        if not dest_path.is_dir():
            raise click.ClickException(f"{dest_path} exists and is not a directory")
        dest_path = dest_path / src_path.name
        if dest_path.exists():
            raise click.ClickException(f"{dest_path} already exists")
    outer = enclosing_site(dest_path.resolve())  # through symbolic links, as the directory will be found
    if outer is not None:
        # `site rm` of the outer site would delete this one with it.
        raise click.ClickException(f"{dest_path} is inside the Balsam site {site_label(outer)}: "
                                   "choose a directory outside any site")
    try:
        # Fails early if the record is not ours; refuses a copy of a site whose agent runs elsewhere.
        site = check_copy_agent(client, src_path, command="mv")
    except SiteError as exc:
        raise click.ClickException(str(exc)) from None
    active = _active_batch_jobs(client, site_id)
    if active:
        # Their launchers (and the scripts still waiting in the scheduler's queue) use the old path:
        # credentials and spool there, jobs failed for a missing login file.
        raise click.ClickException(_batch_jobs_refusal(site, active))
    shutil.move(str(src_path), str(dest_path))
    try:
        client.put(f"/sites/{site_id}", json={"path": str(dest_path)})
    except Exception:
        shutil.move(str(dest_path), str(src_path))
        raise
    click.echo(f"Moved site {site_id} to {dest_path}")


@click.command("rename")
@click.argument("site_path")
@click.argument("name")
def rename(site_path: str, name: str) -> None:
    """Give a site a new name."""
    from balsam.site.site_ops import read_site_id

    site_id = read_site_id(Path(site_path).expanduser().absolute())
    try:
        _client().put(f"/sites/{site_id}", json={"name": name})
    except Exception as exc:
        refusal = _name_refusal(exc, "Choose another name")
        if refusal is None:
            raise
        raise refusal from None
    click.echo(f"Renamed site {site_id} to {name!r}")


SITE_COMMANDS = [init, start, stop, status, sync, ls, rm, mv, rename]


def attach(group: click.Group) -> None:
    for command in SITE_COMMANDS:
        if command.name not in group.commands:
            group.add_command(command)
