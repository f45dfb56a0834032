"""``balsam launcher``: start a pilot-job launcher inside a batch allocation (the job template runs it)."""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import sys
from typing import Optional
from urllib.parse import urlsplit

import click

#: Where docs/server.md says what a cluster's compute nodes need instead of the embedded server.
SHARED_SERVER_DOCS = "docs/server.md#shared-deployment-on-postgresql"


def reachable_from_this_host_only(api_root: str) -> bool:
    """Whether ``api_root`` names a server that only processes on its own host can reach: the
    embedded server's unix:// socket, or a loopback address (an SSH tunnel's localhost)."""
    from balsam.client.transport import is_loopback_host, is_unix

    if is_unix(api_root):
        return True
    try:
        return is_loopback_host(urlsplit(api_root).hostname or "")
    except ValueError:
        return False


def _api_root() -> Optional[str]:
    """The api root of the login this launcher uses ($BALSAM_CLIENT_PATH: its BatchJob's credential
    where the agent wrote one), None if unreadable."""
    from balsam.client import ClientSettings
    from balsam.client.rest import shown_address

    try:
        return shown_address(ClientSettings.load().api_root)  # no password in a log or on stderr
    except Exception:
        return None


def _backoff() -> tuple[float, float]:
    """The client's backoff base and cap (seconds)."""
    from balsam.client import RESTClient

    defaults = RESTClient.__init__.__kwdefaults__ or {}
    return float(defaults.get("backoff_base", 0.5)), float(defaults.get("backoff_max", 30.0))


#: The client's connect wait variable (balsam.client.rest.CONNECT_WAIT_ENV: not imported at start).
CONNECT_WAIT_ENV = "BALSAM_CLIENT_CONNECT_WAIT_SEC"


def _span(seconds: float) -> str:
    """Up to a time, rounded up: "40 s", "5 min"."""
    return f"{math.ceil(seconds)} s" if seconds < 90 else f"{math.ceil(seconds / 60)} min"


def _connect_wait_notice() -> Optional[str]:
    """The line a launcher logs at its start when ``$BALSAM_CLIENT_CONNECT_WAIT_SEC`` is set (a batch
    job inherits it from a shell profile): its client then gives up on an outage after that wait, not
    after the retries that ride out a server restart. None when unset (a bad value: ClientSettingsError)."""
    raw = os.environ.get(CONNECT_WAIT_ENV, "").strip()
    if not raw:
        return None
    from balsam.client.rest import parse_connect_wait  # only now: the client is imported after the start time

    wait = parse_connect_wait(raw)
    if math.isinf(wait):
        return None
    return (f"${CONNECT_WAIT_ENV}={raw}: server outages longer than {_span(wait)} end this launcher "
            "(unset it in the batch job's environment to ride them out)")


class _RetryNotice(logging.Filter):
    """The client logs one WARNING per retry of a request the server did not answer: a launcher
    that cannot reach its server printed ten lines over minutes, none saying for how long it would
    go on. The first failure of a call (the client's ``attempt`` 1 on the record, else its shortest
    backoff) now logs one WARNING naming the server and the retry budget; the later retries of that
    call are logged at INFO (the log file). Not by the delay alone: a first retry that waits for the
    server's Retry-After (429, 503) is longer than the first backoff, and no WARNING was printed."""

    def _budget(self, call_retries: Optional[int] = None) -> tuple[str, int, float]:
        """The server, the call's retries and their longest time. ``call_retries`` is what the client
        put on the record: the call's own budget (a session's close retries 3 times, not the
        client's 10), else the client's setting."""
        from balsam.client import ClientSettings
        from balsam.client.rest import shown_address

        try:
            settings = ClientSettings.load()
            api_root, retries, timeout = shown_address(settings.api_root), settings.retry_count, settings.connect_timeout
        except Exception:
            api_root, retries, timeout = "?", 10, 6.2
        if isinstance(call_retries, int) and call_retries >= 0:
            retries = call_retries
        # Backoffs (with their jitter of up to a quarter) plus one connect timeout per attempt.
        base, cap = _backoff()
        waits = sum(min(cap, base * 2**i) * 1.25 for i in range(retries))
        return api_root, retries, waits + (retries + 1) * timeout

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if "retrying in" not in str(record.msg) or len(args) != 4 or not isinstance(args[-1], (int, float)):
            return True
        attempt = getattr(record, "attempt", None)  # the client's number of the failed attempt (1: first)
        if isinstance(attempt, int):
            later = attempt > 1
        else:  # a record without it: by its delay (a Retry-After longer than the first backoff misreads)
            later = args[-1] > _backoff()[0] * 1.25
        if later:  # a later attempt of a call already announced
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            return True
        said = (str(record.msg) % args).split("; retrying in", 1)[0]  # "POST /sessions/: LocalTransportError"
        api_root, retries, seconds = self._budget(getattr(record, "retries", None))
        connect_wait = getattr(record, "connect_wait", math.inf)  # what the client put on the record
        if isinstance(connect_wait, (int, float)) and connect_wait < seconds:
            # The client gives up on a server it cannot connect to sooner than its retries would.
            record.msg = ("%s from the Balsam server at %s; retrying for up to %s before giving up ($%s; further "
                          "retries are logged at INFO)")
            record.args = (said, api_root, _span(connect_wait), CONNECT_WAIT_ENV)
            return True
        waits = getattr(record, "retry_after_waits", None)
        if isinstance(waits, int) and waits > retries:  # a Retry-After is retried more often, in the same time
            retries = waits
        record.msg = ("%s from the Balsam server at %s; retrying up to %d %s over up to about %s before "
                      "giving up (further retries are logged at INFO)")
        record.args = (said, api_root, retries, "time" if retries == 1 else "times", _span(seconds))
        return True


def unreachable_server_line(exc: BaseException) -> str:
    """One line for a launcher that gave up on its server: where it runs, the server, why, and for
    an address only the server's own host can reach, what compute nodes need instead."""
    from balsam.client.transport import is_unix, unix_socket_path

    api_root = _api_root() or "?"
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # The client's message starts with the request ("POST unix:///.../sessions/: ...") and ends
    # with a hint for a server on this machine ("is it running? `balsam server status`"), which
    # misleads on a compute node.
    cause = re.sub(r"^[A-Z]+ \S+: ", "", cause)
    cause = re.sub(r"\s*\(is it running\? `balsam server status`[^)]*\)$", "", cause)
    if is_unix(api_root) and not unix_socket_path(api_root).parent.exists():
        cause = f"{unix_socket_path(api_root).parent} does not exist on this host"
    line = f"the launcher on {socket.gethostname()} cannot reach the Balsam server at {api_root}: {cause}"
    if api_root != "?" and reachable_from_this_host_only(api_root):
        line += (" (a unix:// socket or loopback address is reachable only on the server's own host; compute "
                 f"nodes need a server they can reach: see {SHARED_SERVER_DOCS})")
    return line


@click.command("launcher")
@click.option("-j", "--job-mode", required=True, help="Job mode plugin: mpi or serial (or a third-party mode).")
@click.option("-t", "--wall-time-min", required=True, type=float, help="Minutes the launcher may run (allocation wall time).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Only run jobs with this tag (repeatable).")
@click.option("-p", "--part", "parts", multiple=True, metavar="MODE:NODES[:KEY=VALUE]", help="A partition of the nodes (repeatable).")
@click.option("--site", "site_path", default=None, type=click.Path(file_okay=False), help="Site directory (default: $BALSAM_SITE_PATH or the cwd's site).")
@click.option("--partition-index", default=0, type=int, hidden=True)
def launcher_command(job_mode: str, wall_time_min: float, tags: tuple, parts: tuple, site_path: str, partition_index: int) -> None:
    """Run the site's runnable jobs on this allocation's nodes until wall time or idle timeout."""
    from balsam.launcher.entry import HeldRecords, LauncherError, run_launcher

    rest_logger = logging.getLogger("balsam.client.rest")
    if not any(isinstance(f, _RetryNotice) for f in rest_logger.filters):  # once per process
        rest_logger.addFilter(_RetryNotice())
    # The notice is held with the start-up's records: on stderr at once, and in the launcher's log
    # file once it opens (run_launcher replays them there).
    held = HeldRecords(echo=True).__enter__()
    try:
        notice = _connect_wait_notice()
        if notice:
            logging.getLogger("balsam.launcher").warning("%s", notice)
        code = run_launcher(job_mode, wall_time_min, tags, parts, site_path=site_path, partition_index=partition_index,
                            held=held)
    except LauncherError as exc:
        if os.environ.get("BALSAM_CLI_TRACEBACK") == "1":
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:
        # Imported only now: run_launcher imports the client after taking the start time.
        from balsam.client import APIError, ClientSettingsError, ServerUnavailable, TransportRefused

        if os.environ.get("BALSAM_CLI_TRACEBACK") == "1":
            raise
        if isinstance(exc, ClientSettingsError):  # its login or $BALSAM_CLIENT_CONNECT_WAIT_SEC: one line
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        # The retries are spent (a server restart is ridden out): one line, not a traceback.
        if isinstance(exc, APIError) and (exc.status_code == 429 or exc.status_code >= 500):
            # The server answered but could not serve (its database unreachable: 503) for the whole
            # retry budget: one line naming it, as for a server that cannot be reached at all.
            click.echo(f"Error: the launcher on {socket.gethostname()} gave up on the Balsam server at "
                       f"{_api_root() or '?'}: {exc}", err=True)
            sys.exit(1)
        if not isinstance(exc, (ServerUnavailable, TransportRefused)):
            raise
        click.echo(f"Error: {unreachable_server_line(exc)}", err=True)
        sys.exit(1)
    finally:
        held.__exit__()  # run_launcher replayed and ended it, unless it failed before it began
    sys.exit(code)


commands = [launcher_command]
