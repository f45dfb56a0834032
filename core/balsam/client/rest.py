"""HTTP client for the Balsam REST service (the standard library's http.client for a server on this
machine, httpx for a remote one: see :mod:`balsam.client.transport`).

Retry policy (a fault of the original was retrying every 4xx for half an hour):

- connection errors, timeouts, 5xx and 429 are retried with capped exponential backoff
  (``retry_count`` times); a ``Retry-After`` is waited for instead (plus up to a tenth, so that
  clients do not all come back at once) and, for a ``retry_count`` of 10 or more, retried for the
  same total time as the backoff's waits (151.5 s for 10 retries; the attempts' own time counted,
  the jitter not), not ``retry_count`` times (see :meth:`RESTClient._retries_allowed`);
- every POST, PUT, PATCH and DELETE carries an ``Idempotency-Key`` made once per call and resent
  unchanged on each retry, so a create, an acquire, an update or a delete whose answer was lost
  (dropped connection, read timeout, a proxy's 502/504 after the server committed) is answered
  from the server's record instead of being applied twice: no second job, and no 409 for a state
  change or 404 for a delete that the first attempt applied (see :func:`idempotency_headers`; the
  server side is ``balsam.server.idempotency``);
- 401 re-reads the stored login once (another process may have run ``balsam login``), else
  exchanges the refresh credential for a new access token, and retries; a credential the server
  refuses even then raises :class:`AuthenticationError` with ``credential_refused`` set and calls the
  :func:`on_credential_refused` listeners (a launcher stops acquiring work);
- with a refresh credential, an access token about to expire is renewed before the request;
- any other 4xx raises :class:`APIError` at once, carrying the status and the server's detail;
- a client made for interactive use (the CLI's short commands: :func:`cap_retries_for_interactive_use`)
  retries less, says on stderr when a call has waited 10 s, 20 s, 40 s ... ("still waiting for <URL>
  after 10 s (Ctrl-C to stop)") and gives up after 120 s in all; launchers and agents only log.
- the first retry of a call says what it cannot reach (the server's address: its URL or Unix socket)
  and what to check (``balsam server status`` / ``balsam server start`` for the embedded server);
  the later ones only the attempt and the time left before the call gives up;
- a server the client cannot connect to at all is retried for ``connect_wait`` seconds at most
  (``$BALSAM_CLIENT_CONNECT_WAIT_SEC``; by default 30 s at an interactive Python prompt, IPython or
  Jupyter, else the retries alone: launchers and agents ride out a server restart, see
  :func:`default_connect_wait`).

After ``fork()`` the child gets a fresh connection pool on its first request.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import datetime as dt
import itertools
import json
import logging
import math
import numbers
import os
import random
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Union
from urllib.parse import urlsplit, urlunsplit

import orjson

from balsam.util import number_problem, paused_gc, plain_decimal

from .local_http import LocalHTTPPool, LocalTransportError
from .settings import (NOT_LOGGED_IN, ClientSettings, ClientSettingsError, NotLoggedIn,
                       store_refreshed_token)
from .transport import UNIX_SCHEME, httpx_client_args, is_loopback_host, is_unix, local_pool_args

if TYPE_CHECKING:  # pragma: no cover
    import httpx

    from balsam._api import models

    from .local_http import LocalResponse

    Response = Union[httpx.Response, LocalResponse]

logger = logging.getLogger(__name__)


def _httpx_retry_errors() -> tuple[type[BaseException], ...]:
    import httpx

    return (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def _tls_failed(exc: BaseException) -> bool:
    """A connection whose TLS handshake failed (httpx raises ConnectError for it): the server's host
    answered, so it is neither "cannot connect" (no connect wait) nor a network problem: a
    certificate, or a proxy or plain-http server on an https URL."""
    # ssl is looked up, not imported: importing balsam.api leaves the TLS stack to first use
    # (tests/api/test_local_http.py), and an SSLError cannot exist before ssl was imported.
    ssl = sys.modules.get("ssl")
    if ssl is None:
        return False
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ssl.SSLError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _connect_timed_out(exc: BaseException) -> bool:
    """No connection within the connect timeout (a firewall dropping SYNs, a host off the VPN, a full
    listen queue): nothing reached the server, as for a refused connection."""
    if isinstance(exc, LocalTransportError):
        return exc.connect_failed and exc.timed_out
    httpx = sys.modules.get("httpx")
    return httpx is not None and isinstance(exc, httpx.ConnectTimeout)


def _is_connect_error(exc: BaseException) -> bool:
    """Nothing reached the server (refused, no socket, no connection in time): worth the hint that it
    may be down, and bounded by ``connect_wait``. Not a failed TLS handshake (:func:`_tls_failed`)."""
    if isinstance(exc, LocalTransportError):
        return exc.connect_failed
    httpx = sys.modules.get("httpx")
    return (httpx is not None and isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
            and not _tls_failed(exc))


def shown_address(api_root: str) -> str:
    """``api_root`` as messages show it: without a user name and password (``https://user:pass@host``)
    or a query string, which must not reach logs and terminals."""
    parts = urlsplit(api_root)
    if not parts.netloc or ("@" not in parts.netloc and not parts.query):
        return api_root
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


#: The embedded server's TCP port unless ``balsam server start --port`` chose another (see
#: :func:`_embedded_server_urls`).
EMBEDDED_DEFAULT_PORT = 8765
#: The hint for the embedded server that does not answer (``balsam.cli.launcher`` removes it from a
#: launcher's line, where it misleads on a compute node: keep the two alike).
EMBEDDED_SERVER_HINT = " (is it running? `balsam server status`)"


def _answer_timed_out(exc: BaseException) -> bool:
    """The request was sent and its answer did not come in time (a read timeout): the server got it
    and may be carrying it out still, unlike a connection that failed."""
    if isinstance(exc, LocalTransportError):
        return exc.timed_out and not exc.connect_failed
    httpx = sys.modules.get("httpx")
    return httpx is not None and isinstance(exc, httpx.ReadTimeout)


#: What to look at when a write's answer did not come: the CLI listing of what the route changes.
_CHECK_COMMANDS = (("/batch-jobs", "balsam queue ls"), ("/jobs", "balsam job ls"), ("/sites", "balsam site ls"),
                   ("/apps", "balsam app ls"))


def _no_answer_message(method: str, where: str, path: str, attempts: int, waited: float) -> str:
    """The error of a write (it carries an Idempotency-Key) whose answer did not come: it reached
    the server, which may still carry it out (a slow query delete commits after the client gave
    up); "server unreachable" said the opposite."""
    check = next((command for prefix, command in _CHECK_COMMANDS if path.startswith(prefix)), None)
    how = f"check with `{check}`" if check else "check"
    return (f"{method} {where}: no answer within {waited:.0f} s ({attempts} attempt{'' if attempts == 1 else 's'}): "
            f"the request reached the server, which may still be carrying it out; {how} whether it took effect "
            "before running the command again")


def _embedded_server_urls() -> "set[str]":
    """The http addresses of the embedded server of this ``$BALSAM_HOME`` (what ``balsam server
    start`` wrote in ``server/server.json``; the default port when it wrote nothing)."""
    from urllib.parse import urlparse

    from .settings import balsam_home

    ports = {EMBEDDED_DEFAULT_PORT}
    try:
        info = json.loads((balsam_home() / "server" / "server.json").read_text())
        port = urlparse(str(info.get("url") or "")).port if isinstance(info, dict) else None
        if port:
            ports.add(port)
    except (OSError, ValueError):
        pass
    return {f"{host}:{port}" for port in ports for host in ("127.0.0.1", "localhost", "[::1]")}


def unreachable_hint(api_root: str, exc: BaseException) -> str:
    """What to check when a request to ``api_root`` failed with ``exc`` (" (...)", or "" when the
    request reached the server). ``balsam server status`` sees only the embedded server of this
    machine: it is the hint for that server's addresses (its Unix socket, its TCP port), not for a
    remote server (an unknown host name, a network down), where it sent users to the wrong place."""
    from urllib.parse import urlparse

    if _tls_failed(exc):
        return TLS_HINT
    if not _is_connect_error(exc):
        return ""
    if is_unix(api_root):
        return EMBEDDED_SERVER_HINT
    parsed = urlparse(shown_address(api_root))  # its netloc is shown
    if parsed.scheme == "http" and is_loopback_host(parsed.hostname or ""):
        if parsed.netloc in _embedded_server_urls():
            return EMBEDDED_SERVER_HINT
        return (" (is it running? `balsam server status` checks the embedded server; for an SSH tunnel or "
                f"another server at {parsed.netloc}, check that it is up)")
    return " (check the server URL and this machine's network: DNS, proxy, VPN; another server: `balsam login -u URL`)"


#: The hint for a TLS handshake that failed: the host answered; the network is not the problem.
TLS_HINT = (" (TLS handshake failed: check the server's certificate (a new one: `balsam login -f`) and any "
            "proxy in between; an https URL to a plain-http server fails so too)")


def _retry_hint(api_root: str, exc: BaseException) -> str:
    """:func:`unreachable_hint` for the first retry line of a call: for the embedded server, also the
    command that starts it (the final error names only the check: ``balsam.cli.launcher`` edits it)."""
    hint = unreachable_hint(api_root, exc)
    if hint == EMBEDDED_SERVER_HINT:
        return " (is it running? `balsam server status` checks it, `balsam server start` starts it)"
    return hint


def _failure_reason(exc: BaseException) -> str:
    """Why an attempt got no answer, without the address the retry line names already (the local
    pool's "cannot connect to /path: [Errno 111] Connection refused" says it again: its cause is
    the OS's own reason)."""
    if _connect_timed_out(exc):
        return "connect timed out"
    cause = exc.__cause__ if isinstance(exc, LocalTransportError) and exc.connect_failed else None
    return str(cause or exc).strip() or type(exc).__name__


def _reach_failure(exc: BaseException) -> str:
    """What the first retry line says of the server: it "cannot be reached", its TLS handshake
    failed, or it "did not answer" (the request was sent)."""
    if _tls_failed(exc):
        return "TLS handshake failed"
    return "cannot be reached" if _is_connect_error(exc) else "did not answer"


def _span(seconds: float) -> str:
    """A wait for a person to read: "12 s", "2.5 min"."""
    if seconds < 90:  # rounded up: "about 0 s" read as already given up
        return f"{math.ceil(max(seconds, 0.0))} s"
    return f"{math.ceil(seconds / 6) / 10:.1f} min"


#: How long a call keeps retrying a server it cannot connect to at all (refused, no socket, no
#: route), in seconds; see :func:`default_connect_wait`.
CONNECT_WAIT_ENV = "BALSAM_CLIENT_CONNECT_WAIT_SEC"
#: Its default in an interactive Python session (see :func:`interactive_session`): a person at the
#: prompt whose server is down (not started, or stopped) learns it within half a minute instead of
#: after the retries of a launcher (10: about 2.5 min), and a server restart (seconds) is still
#: ridden out.
INTERACTIVE_SESSION_CONNECT_WAIT_S = 30.0


def interactive_session() -> bool:
    """True in a Python process a person types into: the REPL (``sys.ps1``), ``python -i``, IPython or
    a Jupyter kernel. Not a script, a launcher, an agent or a ``balsam`` command (which has its own
    interactive mode: :func:`cap_retries_for_interactive_use`), nor a script that IPython runs
    (``ipython script.py``, ``ipython -c``: IPython sets ``sys.ps1`` for those too)."""
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)  # only if IPython is loaded already
    try:
        shell = get_ipython() if get_ipython is not None else None
    except Exception:  # noqa: BLE001 - an odd IPython install: not worth failing a client for
        shell = None
    if shell is not None:
        if getattr(shell, "kernel", None) is not None:  # a Jupyter kernel: a notebook's cells
            return True
        # IPython's terminal app turns ``interact`` off for a file or -c without -i.
        if getattr(getattr(shell, "parent", None), "interact", True) is False:
            return False
        return _stdin_is_tty()
    return hasattr(sys, "ps1") or bool(sys.flags.interactive)


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (OSError, ValueError):  # closed or detached
        return False


def parse_connect_wait(raw: Any, where: str = f"environment variable {CONNECT_WAIT_ENV}") -> float:
    """``raw`` as a connect wait in seconds (from 0; ``inf``: the retries alone bound it), or a
    one-line :class:`ClientSettingsError` naming ``where``. Text (the environment, client.yml) is
    plain decimal digits (:func:`balsam.util.plain_decimal`: not ``1e3``, ``1_000``, ``nan``) or
    the word ``inf``; a number passed in by a program (any real number: int, float, numpy's,
    Decimal, Fraction) is taken as it is, if not NaN or negative."""
    if isinstance(raw, (str, bool)):  # True is no number of seconds (client.yml's yes or true, as a rule)
        if isinstance(raw, bool):
            value = None
        else:
            value = math.inf if raw.strip().lower() == "inf" else plain_decimal(raw, fraction=True)
        problem = number_problem(where, raw, fraction=True, minimum=0, also="inf for the client's retries alone")
    else:
        # Real numbers, and Decimal: a Number that is not Complex (registered so, unlike Real).
        real = isinstance(raw, numbers.Real) or (isinstance(raw, numbers.Number)
                                                 and not isinstance(raw, numbers.Complex))
        try:
            value = float(raw) if real else None
        except OverflowError:  # an int (or Decimal) past float's range: longer than any wait
            value = math.inf
        # Not number_problem's "digits ..." spelling: a program passed a value, it typed no text.
        problem = f"{where}={raw!r} is not a number from 0 (seconds, or math.inf for the client's retries alone)"
    if value is None or math.isnan(value) or value < 0:
        raise ClientSettingsError(f"{problem}: how long an API call retries a server it cannot connect to")
    return value


def default_connect_wait() -> float:
    """The connect wait of a client made now: ``$BALSAM_CLIENT_CONNECT_WAIT_SEC`` if set, else
    :data:`INTERACTIVE_SESSION_CONNECT_WAIT_S` in an interactive session, else ``inf`` (the client's
    ``retry_count`` alone: launchers, agents and scripts keep riding out a server restart)."""
    return _default_connect_wait()[0]


def _default_connect_wait() -> "tuple[float, str]":
    """:func:`default_connect_wait` and where it came from: "env", "interactive" or "default"."""
    raw = os.environ.get(CONNECT_WAIT_ENV, "").strip()
    if raw:
        return parse_connect_wait(raw), "env"
    if interactive_session():
        return INTERACTIVE_SESSION_CONNECT_WAIT_S, "interactive"
    return math.inf, "default"


#: A wait the server asks for (``Retry-After``) is made longer by up to this fraction of it, at
#: random, so that its clients do not all come back at the same instant.
RETRY_AFTER_SPREAD = 0.1

#: The least ``retry_count`` whose call retries a ``Retry-After`` more often than ``retry_count``
#: times, to the end of its retry budget (the default count: see RESTClient._retries_allowed). A
#: shorter count (a heartbeat's 2, a caller's own 4) is a number of retries, kept as it is.
RETRY_AFTER_STRETCH_MIN_RETRIES = 10

#: Interactive use (the CLI's short commands, see :func:`cap_retries_for_interactive_use`): a call
#: that has waited this long without an answer is reported on stderr, then at twice, four times ...
#: that wait.
WAIT_REPORT_FIRST_S = 10.0
#: Interactive use: the most a call waits, retries and their backoff included (at least the
#: client's read timeout: one full wait for a slow server, no second one after it timed out).
INTERACTIVE_MAX_WAIT_S = 120.0


class _WaitReporter:
    """Tells the user of an interactive command which call is still waiting ("still waiting for
    <URL> after 10 s (Ctrl-C to stop)"), at growing intervals, on stderr.

    One daemon thread per process, started by the first interactive call; a call costs a lock and
    a notify at its start and its end. Clients of launchers and agents never get here (they log
    their retries instead): :meth:`RESTClient._send` calls it only for a client with
    ``report_waits_after`` set. Calls of several threads to the same URL are reported once (the
    oldest).
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        #: key -> [url, started (monotonic), next report (monotonic)]
        self._waits: dict[int, list[Any]] = {}
        self._keys = itertools.count()
        self._thread: Optional[threading.Thread] = None

    def begin(self, url: str, first_after: float) -> int:
        now = time.monotonic()
        with self._cond:
            key = next(self._keys)
            self._waits[key] = [url, now, now + first_after]
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="balsam-wait-reporter", daemon=True)
                self._thread.start()
            self._cond.notify()
        return key

    def end(self, key: int) -> None:
        with self._cond:
            self._waits.pop(key, None)

    def _due_lines(self, now: float) -> list[str]:
        lines, said = [], set()
        for wait in sorted(self._waits.values(), key=lambda w: w[1]):  # the oldest call of a URL speaks
            url, started, due = wait
            if due > now:
                continue
            wait[2] = started + 2 * (due - started)
            if url not in said:
                said.add(url)
                lines.append(f"still waiting for {url} after {round(due - started, 1):g} s (Ctrl-C to stop)")
        return lines

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                lines = self._due_lines(now)
                if not lines:
                    nearest = min((w[2] for w in self._waits.values()), default=None)
                    self._cond.wait(None if nearest is None else max(nearest - now, 0.0))
                    continue
            stream = sys.stderr  # looked up now: the CLI's tests replace it
            try:
                for line in lines:
                    stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError, AttributeError):  # stderr closed or gone: nothing to tell
                pass


_wait_reporter = _WaitReporter()
if hasattr(os, "register_at_fork"):  # a forked child has no reporter thread, and maybe a held lock
    os.register_at_fork(after_in_child=_wait_reporter._reset)

IDEMPOTENCY_HEADER = "Idempotency-Key"


def new_idempotency_key() -> str:
    """A key for one logical request (unique: 122 random bits)."""
    return uuid.uuid4().hex


#: The methods whose requests carry a key (a GET is simply retried). A server that claims keys
#: only on POSTs ignores the header on the others.
KEYED_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def idempotency_headers(method: str, key: Optional[str]) -> dict[str, str]:
    """The ``Idempotency-Key`` header of a request: every POST, PUT, PATCH and DELETE gets one
    (``key`` or a new one), made before the first attempt and reused by every retry of the same call."""
    if method not in KEYED_METHODS:
        return {}
    return {IDEMPOTENCY_HEADER: key or new_idempotency_key()}


class APIError(Exception):
    """The server refused a request. ``status_code`` and ``detail`` come from the response;
    ``refused_ids``: the records of a bulk request that made the server refuse it as a whole (all
    of them, where ``detail`` shows the first few), or None when the server did not name them."""

    def __init__(self, method: str, url: str, status_code: int, detail: Any,
                 refused_ids: "frozenset[int] | None" = None, retry_after: Optional[float] = None) -> None:
        self.method = method
        self.url = url
        self.status_code = status_code
        self.detail = detail
        self.refused_ids = refused_ids
        #: The seconds the answer's ``Retry-After`` asked to wait (429, 503), None without one: read
        #: once here for callers that retry on their own (the status updater).
        self.retry_after = retry_after
        super().__init__(f"{method} {url} failed with HTTP {status_code}: {_detail_text(detail)}")


class AuthenticationError(APIError):
    """HTTP 401: the token is missing, invalid or expired. ``credential_refused``: the server
    refused the stored credential itself (revoked or expired, and no newer login on disk)."""

    credential_refused = False


#: Called with the AuthenticationError when the server refuses our credential for good.
_credential_refused_listeners: list[Callable[[AuthenticationError], None]] = []


def on_credential_refused(callback: Callable[[AuthenticationError], None]) -> Callable[[], None]:
    """Register ``callback(error)``, called (once per refusal) when a request's credential is refused
    and neither the stored login nor the refresh credential gives a working one. Returns a function
    that unregisters it."""
    _credential_refused_listeners.append(callback)

    def remove() -> None:
        if callback in _credential_refused_listeners:
            _credential_refused_listeners.remove(callback)

    return remove


#: Renew an access token this long before it expires.
REFRESH_MARGIN_SEC = 120.0


class ServerUnavailable(ConnectionError, TimeoutError):
    """The server could not be reached (or kept failing) after all retries. Also a TimeoutError:
    Balsam 0.7's client raised ``TimeoutError("Exceeded max retries: ...")`` when it gave up, and
    scripts written for it catch that."""


_MAX_DETAIL_ITEMS = 10  # a rejected bulk request can list thousands of errors: keep the message one short line


#: The last item of a 422 that lists only its first problems (balsam.server.errors.ValidationFailed):
#: "and 39900 more problems (...)", or "and more problems (...)" where the server stopped looking.
_COUNTS_OTHERS = re.compile(r"and (?:(\d+) )?more problems\b")


def _detail_text(detail: Any) -> str:
    if isinstance(detail, list):
        parts = []
        # The server's count of the problems it did not list: "(+39990 more)" of 40,000, not of the
        # 101 items the answer holds; "(+90 more, and others not checked)" where it did not count them.
        last = detail[-1] if detail else None
        counted = _COUNTS_OTHERS.match(str(last.get("msg", ""))) if isinstance(last, dict) else None
        if counted and len(detail) > _MAX_DETAIL_ITEMS:
            listed, unlisted = detail[:-1], int(counted.group(1) or 0)
        else:
            listed, unlisted, counted = detail, 0, None
        for item in listed[:_MAX_DETAIL_ITEMS]:
            if isinstance(item, dict):
                loc = ".".join(str(x) for x in item.get("loc", []) if x != "body")
                msg = item.get("msg") or item.get("message") or item
                parts.append(f"{loc}: {msg}" if loc else str(msg))
            else:
                parts.append(str(item))
        hidden = max(0, len(listed) - _MAX_DETAIL_ITEMS) + unlisted
        if counted and counted.group(1) is None:
            parts.append(f"(+{hidden:,} more, and others not checked)" if hidden else "(and others not checked)")
        elif hidden:
            parts.append(f"(+{hidden:,} more)")
        return "; ".join(parts)
    return str(detail)


def _response_detail(resp: "Response") -> Any:
    try:
        body = resp.json()
    except ValueError:
        text = resp.text.strip()
        return text[:1000] or resp.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "error", "message"):
            if key in body:
                return body[key]
    return body


def _refused_ids(resp: "Response") -> "frozenset[int] | None":
    """The ``refused_ids`` a refusal names beside its detail (see :class:`APIError`), if any."""
    try:
        body = resp.json()
    except ValueError:
        return None
    ids = body.get("refused_ids") if isinstance(body, dict) else None
    if isinstance(ids, list) and all(type(i) is int for i in ids):
        return frozenset(ids)
    return None


def retry_after_seconds(value: Optional[str], now: Optional[dt.datetime] = None) -> Optional[float]:
    """The wait a ``Retry-After`` header value asks for, in seconds (never negative): its
    delay-seconds or its HTTP-date (RFC 9110 10.2.3; a proxy or load balancer may send the date
    form), measured from ``now``. None when there is none, it cannot be read, or it is a date not
    in the future (see the end)."""
    raw = (value or "").strip()
    if not raw:
        return None
    if raw.replace(".", "", 1).isdecimal():
        return float(raw)
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" or an obsolete form: HTTP-dates are UTC
        when = when.replace(tzinfo=dt.timezone.utc)
    left = (when - (now or dt.datetime.now(dt.timezone.utc))).total_seconds()
    # A date already past says nothing of when to come back (the proxy's clock behind ours, or the
    # answer slow to arrive): read as a wait of 0 it made every retry immediate, a client's whole
    # budget (5 tries) spent in 0.2 s and the status updater's retries a tight loop. Unsaid instead:
    # the caller's own backoff.
    return left if left > 0 else None


def _retry_after(resp: "Response") -> float:
    return retry_after_seconds(resp.headers.get("Retry-After")) or 0.0


def _notify_credential_refused(error: AuthenticationError) -> None:
    error.credential_refused = True
    for callback in list(_credential_refused_listeners):
        try:
            callback(error)
        except Exception:  # noqa: BLE001 - a listener must not hide the error itself
            logger.exception("a credential-refused listener failed")


#: Bodies longer than this are parsed with the garbage collector paused (see :func:`paused_gc`).
LARGE_BODY_BYTES = 256 * 1024


#: The header of a query delete's answer that left out matching jobs RUNNING in a launcher,
#: ``count=N; ids=I,J,...`` (balsam.server.routes.jobs, which names it alike).
SKIPPED_RUNNING_HEADER = "Balsam-Skipped-Running"
#: The skipped jobs of the DELETEs sent under :func:`collect_skipped_running` (a query delete may
#: take several requests, and its manager returns counts only).
_skipped_running: "contextvars.ContextVar[Optional[list[tuple[int, list[int]]]]]" = contextvars.ContextVar(
    "balsam_skipped_running", default=None)


@contextlib.contextmanager
def collect_skipped_running() -> Iterator[list[tuple[int, list[int]]]]:
    """Collect, for each DELETE sent meanwhile (this thread or task) that left jobs out, ``(count,
    first ids)`` from its :data:`SKIPPED_RUNNING_HEADER`."""
    collected: list[tuple[int, list[int]]] = []
    token = _skipped_running.set(collected)
    try:
        yield collected
    finally:
        _skipped_running.reset(token)


def skipped_running_message(count: int, ids: list[int], advice: str = "delete them by id or after they end") -> str:
    """What a query delete that left out ``count`` jobs RUNNING in a launcher (``ids``: the first
    ones) tells its user, ending with ``advice``."""
    shown = ", ".join(str(i) for i in ids) + (", ..." if count > len(ids) else "")
    return (f"{count} matching job{'' if count == 1 else 's'} {'was' if count == 1 else 'were'} not deleted: "
            f"RUNNING in a launcher (ids {shown}); {advice}")


def _note_skipped_running(resp: "Response") -> None:
    collected = _skipped_running.get()
    value = resp.headers.get(SKIPPED_RUNNING_HEADER) if collected is not None else None
    if not value:
        return
    fields = dict(part.strip().partition("=")[::2] for part in value.split(";"))
    try:
        collected.append((int(fields.get("count", "0")), [int(i) for i in fields.get("ids", "").split(",") if i]))
    except ValueError:  # a malformed header must not fail a delete that happened: logged, not raised
        logger.warning("unreadable %s header: %r", SKIPPED_RUNNING_HEADER, value)


def _parse(resp: "Response") -> Any:
    if resp.status_code == 204 or not resp.content:
        return None
    try:
        if len(resp.content) > LARGE_BODY_BYTES:
            with paused_gc():
                return orjson.loads(resp.content)
        return orjson.loads(resp.content)  # several times faster than json on a 10,000-job page
    except orjson.JSONDecodeError:
        pass
    try:
        return resp.json()  # what orjson refuses (an integer beyond 64 bits, say)
    except ValueError:
        return resp.text


def _encode_json(body: Any) -> bytes:
    """The request body: orjson (a 5,000-job create in a few ms), the json module for what orjson
    refuses (integers beyond 64 bits, say)."""
    try:
        return orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return json.dumps(body).encode()


class RESTClient:
    """A logged-in connection to one Balsam server.

    ``get/post/put/patch/delete(path, params=..., json=...)`` return the parsed JSON body
    (``None`` for an empty body). ``client.Site``, ``client.Job``, ... are the API models bound
    to this client (``balsam.api`` models use the default client from the login file).
    """

    def __init__(
        self,
        api_root: str,
        token: Optional[str] = None,
        *,
        connect_timeout: float = 6.2,
        read_timeout: float = 120.0,
        retry_count: int = 10,
        settings_path: "Path | str | None" = None,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        username: Optional[str] = None,
        token_expiry: Any = None,
        refresh_token: Optional[str] = None,
        server_certificate: Optional[str] = None,
        allow_insecure_http: bool = False,
        connect_wait: Optional[float] = None,
    ) -> None:
        self.api_root = api_root.rstrip("/")
        self.token_expiry = token_expiry
        self.token = token
        self.refresh_token = refresh_token
        self.server_certificate = server_certificate
        self.allow_insecure_http = allow_insecure_http
        self._refresh_lock = threading.Lock()
        self.username = username
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self.retry_count = int(retry_count)
        self.settings_path = Path(settings_path) if settings_path is not None else None
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        #: Seconds a call retries a server it cannot connect to (``inf``: its retries alone bound it);
        #: None: :func:`default_connect_wait` (``$BALSAM_CLIENT_CONNECT_WAIT_SEC``, or 30 s in an
        #: interactive session). Read and checked here: a bad value is refused at once, not at an outage
        #: (setting the variable later changes no client made already: set this attribute instead).
        if connect_wait is None:
            self.connect_wait, origin = _default_connect_wait()
        else:
            self.connect_wait, origin = parse_connect_wait(connect_wait, "connect_wait"), "argument"
        #: Where ``connect_wait`` came from, with the value it gave (an assignment since: the client's own).
        self._connect_wait_origin: "tuple[str, float]" = (origin, self.connect_wait)
        self._lock = threading.Lock()
        self._pid: Optional[int] = None
        self._http_client: "httpx.Client | LocalHTTPPool | None" = None
        #: What the connection pool raises for a request that got no answer (retried).
        self._retry_errors: tuple[type[BaseException], ...] = (LocalTransportError,)
        self._bound_models: dict[str, type] = {}
        #: requests sent, by ``"METHOD /path"`` (retries included): for tests and benchmarks
        self.request_counts: collections.Counter[str] = collections.Counter()
        #: Set when the server turned out to lack the ``id__gt`` filter (an older release): later
        #: listings page by offset from their start, without a request to find out again (see
        #: balsam._api.query.read_pages).
        self.lacks_id_after = False
        #: Interactive use (a client made while :func:`cap_retries_for_interactive_use` is in force):
        #: a call that has waited this many seconds is reported on stderr (None: never, as in a
        #: launcher or an agent, which log their retries), and a call gives up after
        #: ``max_call_wait`` seconds in all, retries included (None: after its retries alone).
        self.report_waits_after: Optional[float] = None
        self.max_call_wait: Optional[float] = None
        if _interactive_retry_cap is not None:
            self.retry_count = min(self.retry_count, _interactive_retry_cap)
            self.report_waits_after = WAIT_REPORT_FIRST_S
            self.max_call_wait = max(INTERACTIVE_MAX_WAIT_S, self.read_timeout)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_settings(cls, settings: ClientSettings, settings_path: "Path | str | None" = None) -> "RESTClient":
        return cls(
            settings.api_root,
            settings.token,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            retry_count=settings.retry_count,
            settings_path=settings_path,
            username=settings.username,
            token_expiry=settings.token_expiry,
            refresh_token=settings.refresh_token,
            server_certificate=settings.server_certificate,
            allow_insecure_http=settings.allow_insecure_http,
        )

    def __repr__(self) -> str:
        return f"RESTClient({self.shown_root!r}, username={self.username!r})"

    @property
    def shown_root(self) -> str:
        """The api root as messages show it (:func:`shown_address`: no password, no query string)."""
        return shown_address(self.api_root)

    # ----------------------------------------------------------------- connection pool
    def _http(self) -> "httpx.Client | LocalHTTPPool":
        pid = os.getpid()
        if self._http_client is None or self._pid != pid:
            with self._lock:
                if self._http_client is None or self._pid != pid:
                    # After fork the parent's sockets must not be shared: start a new pool.
                    self._http_client = self._new_pool()
                    self._pid = pid
        return self._http_client

    def _new_pool(self) -> "httpx.Client | LocalHTTPPool":
        headers = {"Accept": "application/json", "User-Agent": "balsam-client"}
        local = local_pool_args(self.api_root)
        if local is not None:
            self._retry_errors = (LocalTransportError,)
            return LocalHTTPPool(**local, connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
                                 headers=headers)
        import httpx  # heavy: only a client of a remote server pays for it

        self._retry_errors = _httpx_retry_errors()
        return httpx.Client(
            timeout=httpx.Timeout(self.read_timeout, connect=self.connect_timeout), headers=headers,
            **httpx_client_args(self.api_root, server_certificate=self.server_certificate,
                                allow_insecure_http=self.allow_insecure_http),
        )

    def close(self) -> None:
        if self._http_client is not None and self._pid == os.getpid():
            self._http_client.close()
        self._http_client = None

    def _headers(self, authenticated: bool) -> dict[str, str]:
        if authenticated and self.token:
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    def _reload_token(self) -> bool:
        """Re-read the stored login; True if it holds a different token than ours."""
        path = self.settings_path
        try:
            settings = ClientSettings.load(path)
        except Exception:  # noqa: BLE001 - any unreadable file just means "no newer token"
            return False
        if settings.api_root.rstrip("/") != self.api_root:
            return False
        if (settings.token and settings.token != self.token) or (
                settings.refresh_token and settings.refresh_token != self.refresh_token):
            self.token = settings.token
            self.username = settings.username or self.username
            self.token_expiry = settings.token_expiry
            self.refresh_token = settings.refresh_token
            return True
        return False

    def _expires_within(self, seconds: float) -> bool:
        expiry = self.token_expiry
        if not isinstance(expiry, dt.datetime):
            return False
        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=dt.timezone.utc)
        return expiry <= dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)

    def refresh_access_token(self, deadline: Optional[float] = None) -> None:
        """Exchange the refresh credential for a new access token (and store it in the login file
        if that still holds this refresh credential, so other processes reuse it). ``deadline``:
        that of the call that renews it (:meth:`request`), which bounds the exchange too."""
        from balsam.serialization import parse_datetime

        if not self.refresh_token:
            raise AuthenticationError("POST", f"{self.shown_root}/auth/token", 401, "no refresh credential stored")
        result = self.request("POST", "/auth/token", data={"grant_type": "refresh_token",
                                                            "refresh_token": self.refresh_token},
                              authenticated=False, deadline=deadline)
        if not isinstance(result, dict) or "access_token" not in result:
            raise APIError("POST", f"{self.shown_root}/auth/token", 200, f"unexpected refresh response {result!r}")
        self.token = result["access_token"]
        self.token_expiry = parse_datetime(result["expiration"]) if result.get("expiration") else None
        refresh_expiry = parse_datetime(result["refresh_expiration"]) if result.get("refresh_expiration") else None
        store_refreshed_token(self.settings_path, self.refresh_token, self.token, self.token_expiry, refresh_expiry)

    def _refresh_locked(self, deadline: Optional[float]) -> None:
        """Take ``_refresh_lock``, waiting no longer than ``deadline`` (the caller's: a call with a
        deadline is not held past it by another thread's renewal either)."""
        if deadline is None:
            self._refresh_lock.acquire()
        elif not self._refresh_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise ServerUnavailable(f"{self.shown_root}/auth/token: no new access token within the call's deadline "
                                    f"(another call is renewing it)")

    def _ensure_fresh_token(self, deadline: Optional[float] = None) -> None:
        """With a refresh credential, renew an access token that is missing or about to expire
        (``deadline``: the caller's, which bounds the renewal: see :meth:`request`)."""
        if not self.refresh_token or (self.token and not self._expires_within(REFRESH_MARGIN_SEC)):
            return
        self._refresh_locked(deadline)
        try:
            if self.token and not self._expires_within(REFRESH_MARGIN_SEC):
                return
            self._reload_token()
            if self.token and not self._expires_within(REFRESH_MARGIN_SEC):
                return
            self.refresh_access_token(deadline)
        finally:
            self._refresh_lock.release()

    def _renew_after_401(self, deadline: Optional[float] = None) -> bool:
        """After a 401: a newer login on disk, else a new access token from the refresh credential.
        True if there is something new to retry with (``deadline``: as :meth:`_ensure_fresh_token`)."""
        self._refresh_locked(deadline)
        try:
            if self._reload_token():
                return True
            if not self.refresh_token:
                return False
            try:
                self.refresh_access_token(deadline)
            except AuthenticationError:
                return False
            return True
        finally:
            self._refresh_lock.release()

    def _expired(self) -> bool:
        expiry = self.token_expiry
        if not isinstance(expiry, dt.datetime):
            return False
        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=dt.timezone.utc)
        return expiry <= dt.datetime.now(dt.timezone.utc)

    def _send_interactive(self, method: str, path: str, deadline: Optional[float] = None, **kwargs: Any) -> "Response":
        """:meth:`_send` for interactive use: the user hears of a long wait (:class:`_WaitReporter`),
        and the call's whole wait is capped at ``max_call_wait`` (or the caller's earlier ``deadline``)."""
        capped = time.monotonic() + (self.max_call_wait if self.max_call_wait is not None else float("inf"))
        kwargs["own_deadline"] = deadline  # the caller's (None: the interactive cap alone, as before)
        deadline = capped if deadline is None else min(deadline, capped)
        key = None if self.report_waits_after is None else _wait_reporter.begin(
            f"{self.shown_root}{path if path.startswith('/') else '/' + path}", self.report_waits_after)
        try:
            return self._send_until(method, path, deadline=deadline, **kwargs)
        finally:
            if key is not None:
                _wait_reporter.end(key)

    def _attempt_timeout(self, pool: Any, left: float) -> Any:
        """The timeout argument of an attempt that may wait ``left`` seconds at most."""
        read = max(min(self.read_timeout, left), 0.001)
        if isinstance(pool, LocalHTTPPool):
            return read
        import httpx

        return httpx.Timeout(read, connect=min(self.connect_timeout, read))

    def _retry_progress(self, attempt: int, retries: int, delay: float, deadline: Optional[float],
                        connect_left: float = math.inf, budget_left: Optional[float] = None) -> str:
        """" (attempt 2 of up to 11, giving up in about 2.4 min)": where a call stands after its
        failed attempt ``attempt + 1`` and before a wait of ``delay``. The time left is that of the
        backoffs still to come (with their mean jitter, an eighth: see :meth:`_backoff`; without the
        attempts' own time), or ``budget_left`` (waits of the server's Retry-After to the end of the
        retry budget, with their mean jitter, a twentieth), or less where the call's deadline or
        ``connect_left`` (of ``connect_wait``) ends it sooner."""
        if budget_left is not None:
            left = max(budget_left, delay) * (1 + RETRY_AFTER_SPREAD / 2)
        else:
            left = delay + 1.125 * sum(self._backoff_step(k) for k in range(attempt + 1, min(retries, attempt + 65)))
            if retries > attempt + 65:  # every later step is at backoff_max (no loop over a huge retry_count)
                left += 1.125 * self.backoff_max * (retries - attempt - 65)
        left = min(left, connect_left)
        if deadline is not None:
            left = min(left, deadline - time.monotonic())
        return f" (attempt {attempt + 1} of up to {retries + 1}, giving up in about {_span(left)})"

    def unattended(self) -> "RESTClient":
        """This client for a launcher or an agent: no interactive session's connect wait (a process
        misread as one, such as a launcher started from IPython), so that a server restart is ridden
        out; ``$BALSAM_CLIENT_CONNECT_WAIT_SEC`` or an explicit ``connect_wait`` still applies."""
        if self._connect_wait_origin == ("interactive", self.connect_wait):
            self.connect_wait = math.inf
            self._connect_wait_origin = ("default", math.inf)
        return self

    def _connect_wait_source(self) -> str:
        """Where the client's ``connect_wait`` came from (as recorded when it was made: the
        environment may have changed since), for the error that it ended a call."""
        wait = f"{self.connect_wait:g} s"
        origin, value = self._connect_wait_origin
        if value == self.connect_wait and origin == "env":
            return f"the connect wait of {wait} set by ${CONNECT_WAIT_ENV}"
        if value == self.connect_wait and origin == "interactive":
            return (f"the connect wait of an interactive session, {wait}: ${CONNECT_WAIT_ENV} (set before the first "
                    "call) or the client's connect_wait sets another")
        return f"the client's connect_wait of {wait}"

    def _backoff(self, attempt: int, resp: "Optional[Response]" = None) -> float:
        if resp is not None:
            retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
            if retry_after:  # 0 asks for no wait: our own backoff, not a tight loop
                # Plus up to a tenth: every client of a server that answered 503 (its database
                # restarting) came back at the same instant, Retry-After after Retry-After.
                wait = min(retry_after, self.backoff_max)
                return wait + random.uniform(0, wait * RETRY_AFTER_SPREAD)
        delay = self._backoff_step(attempt)
        return delay + random.uniform(0, delay / 4)

    def _retry_budget(self, retries: int) -> float:
        """The waits a call's ``retries`` make by the backoff schedule, without jitter (151.5 s for
        the default 10): what a call retrying the server's ``Retry-After`` may wait too (see
        :meth:`_retries_allowed`)."""
        return sum(self._backoff_step(k) for k in range(min(retries, 65))) + self.backoff_max * max(retries - 65, 0)

    def _wait_counted(self, attempt: int, resp: "Optional[Response]" = None) -> float:
        """What the wait after failed attempt ``attempt`` (0: the first) counts against the retry
        budget: the server's ``Retry-After`` (at least 1 s), else the backoff step, jitter left out."""
        retry_after = _retry_after(resp) if resp is not None else 0.0
        if retry_after:
            return max(min(retry_after, self.backoff_max), 1.0)
        return self._backoff_step(attempt)

    def _retries_allowed(self, attempt: int, retries: int, asked: float, resp: "Response",
                         elapsed: float = 0.0) -> int:
        """How many retries a call may make in all, after an answer to retry (429, 5xx) to its
        attempt ``attempt`` (0: the first): ``retries``, or, where the server asks for a wait with
        ``Retry-After`` and ``retries`` is at least :data:`RETRY_AFTER_STRETCH_MIN_RETRIES`, as
        many more as fit the retry budget (:meth:`_retry_budget`) with the waits counted so far
        (``asked``, this one's not included: :meth:`_wait_counted`) and with the call's time so far
        (``elapsed``: its attempts' own time and its waits, their jitter left out). A database outage is answered 503 with
        ``Retry-After: 5``: obeyed ``retries`` times, a call gave up after ~50 s (a PostgreSQL
        restart or fail-over takes 30-90 s), where a server that is down itself (connection
        refused) was retried for ~2.5 min by the backoff. Bounded by the waits alone, a call whose
        503s each took the server 10 s (a vanished database host's connect timeout) went on for
        ~8 min (and 152 attempts, ~28 min, with ``Retry-After: 1``)."""
        if not _retry_after(resp) or retries < RETRY_AFTER_STRETCH_MIN_RETRIES:
            return retries
        wait = self._wait_counted(attempt, resp)
        left = self._retry_budget(retries) - max(asked, elapsed)
        return max(retries, attempt + int(max(left, 0.0) // wait))

    def _backoff_step(self, attempt: int) -> float:
        """The backoff before jitter: doubling from backoff_base up to backoff_max. The exponent is
        capped (2**64 outgrows any backoff_max) so a retry_count of thousands never overflows a float."""
        return min(self.backoff_max, self.backoff_base * 2.0 ** min(attempt, 64))

    # ----------------------------------------------------------------- requests
    def request(
        self,
        method: str,
        path: str,
        *,
        params: "Mapping[str, Any] | None" = None,
        json: Any = None,
        data: "Mapping[str, Any] | None" = None,
        authenticated: bool = True,
        idempotency_key: Optional[str] = None,
        retry_count: Optional[int] = None,
        headers: "Mapping[str, str] | None" = None,
        deadline: Optional[float] = None,
    ) -> Any:
        """One API call, retried as the module docstring says. ``idempotency_key`` (POST, PUT, PATCH,
        DELETE) names the logical request (by default each call gets a new one); ``retry_count`` overrides the
        client's retry budget for this call (callers that loop on their own keep it short);
        ``headers`` are added to the request's (``Prefer``). ``deadline`` (a ``time.monotonic()``
        time; None: the client's timeouts and retries alone bound the call): no attempt waits past
        it and none starts or is retried after it (:class:`ServerUnavailable`, or the last answer's
        :class:`APIError`; nothing is sent once it has passed), a token renewal made for the call
        included, for callers whose own give-up bound is shorter than one read timeout
        (a launcher's release: the server may accept and never answer)."""
        resp = self._send(method, path, params=params, json=json, data=data, headers=headers,
                          authenticated=authenticated, idempotency_key=idempotency_key, retry_count=retry_count,
                          deadline=deadline)
        return _parse(resp)

    def request_with_headers(
        self,
        method: str,
        path: str,
        *,
        params: "Mapping[str, Any] | None" = None,
        json: Any = None,
        headers: "Mapping[str, str] | None" = None,
        idempotency_key: Optional[str] = None,
    ) -> tuple[Any, Mapping[str, str]]:
        """:meth:`request` with extra request headers (``Prefer``, ``Accept``); returns the parsed
        body and the response headers."""
        resp = self._send(method, path, params=params, json=json, headers=headers, idempotency_key=idempotency_key)
        return _parse(resp), resp.headers

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: "Mapping[str, Any] | None" = None,
        json: Any = None,
        data: "Mapping[str, Any] | None" = None,
        headers: "Mapping[str, str] | None" = None,
        authenticated: bool = True,
        idempotency_key: Optional[str] = None,
        retry_count: Optional[int] = None,
        deadline: Optional[float] = None,
    ) -> "Response":
        """One call, its retries included (an interactive client's through :meth:`_send_interactive`);
        ``deadline``: see :meth:`request`."""
        kwargs = dict(params=params, json=json, data=data, headers=headers, authenticated=authenticated,
                      idempotency_key=idempotency_key, retry_count=retry_count)
        if self.report_waits_after is not None or self.max_call_wait is not None:
            return self._send_interactive(method, path, deadline=deadline, **kwargs)
        return self._send_until(method, path, deadline=deadline, caller_deadline=deadline is not None,
                                own_deadline=deadline, **kwargs)

    def _send_until(
        self,
        method: str,
        path: str,
        *,
        params: "Mapping[str, Any] | None" = None,
        json: Any = None,
        data: "Mapping[str, Any] | None" = None,
        headers: "Mapping[str, str] | None" = None,
        authenticated: bool = True,
        idempotency_key: Optional[str] = None,
        retry_count: Optional[int] = None,
        deadline: Optional[float],
        caller_deadline: bool = False,
        own_deadline: Optional[float] = None,
    ) -> "Response":
        """:meth:`_send`'s work; ``deadline`` (``time.monotonic()``): no retry and no wait beyond it
        (set by :meth:`_send_interactive` or the caller; None: the retries alone bound the call).
        ``caller_deadline``: the caller's own bound, not an interactive command's (whose
        messages give a user advice). ``own_deadline``: the caller's deadline, if it set one: it also
        bounds a token renewal made for this call, and once it has passed no attempt is sent (an
        attempt of a write sent with no time left to read its answer may still be applied, its
        answer lost). Without one, both are as before (an interactive command's cap included)."""
        method = method.upper()
        url = path if path.startswith("/") else "/" + path
        retries = self.retry_count if retry_count is None else min(int(retry_count), self.retry_count)
        retry_safe_headers = idempotency_headers(method, idempotency_key)
        if authenticated:
            self._ensure_fresh_token(own_deadline)
        content = None if json is None else _encode_json(json)  # encoded once, resent as is on a retry
        body_headers = {"Content-Type": "application/json"} if content is not None else {}
        reauthed = False
        attempt = 0
        started = time.monotonic()
        reached = False  # an attempt of this write was sent and its answer timed out
        #: When the attempts that could not connect at all began (None: the last attempt connected),
        #: for ``connect_wait``.
        unconnected_since: Optional[float] = None
        asked = 0.0  # the waits so far, as the retry budget counts them (_wait_counted)
        jitter = 0.0  # the waits' random parts so far, which the budget leaves out

        def spent_time() -> float:
            """The call's time so far as the retry budget counts it: its attempts' own time and its
            waits, less their jitter (see _retries_allowed)."""
            return time.monotonic() - started - jitter
        while True:
            attempt_started = time.monotonic()
            if own_deadline is not None and deadline is not None and deadline - time.monotonic() <= 0:
                # Past it before the first attempt, or after a token renewal (a retry's backoff never
                # ends past it): nothing is sent.
                raise ServerUnavailable(
                    f"{method} {self.shown_root}{url}: the call's deadline passed before attempt {attempt + 1} "
                    f"({time.monotonic() - started:.0f} s): not sent")
            self.request_counts[f"{method} {url}"] += 1
            pool = self._http()
            try:
                if deadline is None:
                    resp = pool.request(
                        method, url, params=params, content=content, data=data,
                        headers={**self._headers(authenticated), **retry_safe_headers, **body_headers, **(headers or {})},
                    )
                else:  # this attempt waits no longer than the call has left
                    resp = pool.request(
                        method, url, params=params, content=content, data=data,
                        headers={**self._headers(authenticated), **retry_safe_headers, **body_headers, **(headers or {})},
                        timeout=self._attempt_timeout(pool, deadline - time.monotonic()),
                    )
            except self._retry_errors as exc:
                delay = self._backoff(attempt)
                reached = reached or (bool(retry_safe_headers) and _answer_timed_out(exc))
                connect_left = math.inf  # of connect_wait
                if _is_connect_error(exc):
                    unconnected_since = attempt_started if unconnected_since is None else unconnected_since
                    connect_left = unconnected_since + self.connect_wait - time.monotonic()
                    delay = min(delay, max(connect_left, 0.0))  # the last attempt at the end of the wait
                else:
                    unconnected_since = None
                connect_spent = connect_left <= 0
                # Past ``retries`` only after waits of a Retry-After (503s, then the server went down):
                # on to the end of the same budget of time.
                spent = attempt >= retries and (
                    retries < RETRY_AFTER_STRETCH_MIN_RETRIES
                    or max(asked, spent_time()) + self._wait_counted(attempt) > self._retry_budget(retries))
                if (spent or connect_spent
                        or (deadline is not None and time.monotonic() + delay >= deadline)):
                    if caller_deadline and not connect_spent:  # a program's own bound: it words what follows
                        raise ServerUnavailable(
                            f"{method} {self.shown_root}{url}: no answer within the call's deadline after {attempt + 1} "
                            f"attempt{'' if attempt == 0 else 's'} ({time.monotonic() - started:.0f} s): "
                            f"{type(exc).__name__}: {exc}") from None
                    if reached and deadline is not None:  # a CLI command's advice (a launcher says it cannot reach)
                        raise ServerUnavailable(_no_answer_message(method, f"{self.shown_root}{url}", url, attempt + 1,
                                                                   time.monotonic() - started)) from None
                    if connect_spent and attempt < retries:
                        waited = f" over {time.monotonic() - started:.0f} s ({self._connect_wait_source()})"
                    elif deadline is None or attempt >= retries:
                        waited = f" over {time.monotonic() - started:.0f} s" if attempt else ""
                    else:
                        waited = f" (gave up after {self.max_call_wait:g} s, the wait of an interactive command)"
                    raise ServerUnavailable(
                        f"{method} {self.shown_root}{url}: server unreachable after {attempt + 1} "
                        f"attempt{'' if attempt == 0 else 's'}{waited}: {type(exc).__name__}: "
                        f"{_failure_reason(exc) if _connect_timed_out(exc) else exc}"
                        + unreachable_hint(self.api_root, exc)
                    ) from None
                # The record keeps its four arguments and "retrying in" (balsam.cli.launcher rewrites
                # a call's first one for its log); what follows them is for a person reading it.
                if attempt < retries:
                    progress = self._retry_progress(attempt, retries, delay, deadline, connect_left)
                else:  # past them after waits of a Retry-After: what is left of the budget
                    progress = self._retry_progress(attempt, attempt + 1, delay, deadline, connect_left,
                                                    budget_left=self._retry_budget(retries) - max(asked, spent_time()))
                if attempt == 0:  # the call's first failure: say once what is unreachable and what to check
                    progress += (f": the Balsam server at {self.shown_root} {_reach_failure(exc)}: "
                                 f"{_failure_reason(exc)}{_retry_hint(self.api_root, exc)}")
                logger.warning("%s %s: %s; retrying in %.1f s" + progress.replace("%", "%%"), method, url,
                               type(exc).__name__, delay,
                               # attempt 1: the call's first failure; connect_wait: it bounds this call too
                               # (balsam.cli.launcher's budget), where nothing connects.
                               extra={"attempt": attempt + 1, "retries": retries,
                                      "connect_wait": self.connect_wait if _is_connect_error(exc) else math.inf})
                asked += self._wait_counted(attempt)
                jitter += max(delay - self._wait_counted(attempt), 0.0)
                time.sleep(delay)
                attempt += 1
                continue
            unconnected_since = None
            status = resp.status_code
            if status == 429 or status >= 500:
                # A server that asks for more patience than our backoff cap (a throttled login:
                # minutes) gets its answer reported now, not a blocked caller.
                delay = self._backoff(attempt, resp)
                # A Retry-After (a database outage's 503) is obeyed within the same budget of time as
                # the backoff of a server that is down (_retries_allowed), not ``retries`` times.
                allowed = self._retries_allowed(attempt, retries, asked, resp, spent_time())
                if (attempt >= allowed or _retry_after(resp) > self.backoff_max
                        or (deadline is not None and time.monotonic() + delay >= deadline)):
                    raise APIError(method, f"{self.shown_root}{url}", status, _response_detail(resp),
                                   retry_after=retry_after_seconds(resp.headers.get("Retry-After")))
                if allowed > retries:  # waits of Retry-After, to the end of the budget
                    progress = self._retry_progress(attempt, allowed, delay, deadline,
                                                    budget_left=self._retry_budget(retries) - max(asked, spent_time()))
                else:
                    progress = self._retry_progress(attempt, retries, delay, deadline)
                logger.warning("%s %s: HTTP %d; retrying in %.1f s" + progress.replace("%", "%%"),
                               method, url, status, delay,
                               # 1: the call's first failure; retry_after_waits: a Retry-After is retried
                               # that many times within the same time (balsam.cli.launcher's notice)
                               extra={"attempt": attempt + 1, "retries": retries,
                                      "retry_after_waits": allowed if allowed > retries else None})
                asked += self._wait_counted(attempt, resp)
                jitter += max(delay - self._wait_counted(attempt, resp), 0.0)
                time.sleep(delay)
                attempt += 1
                continue
            if status == 401:
                if authenticated and not reauthed and self._renew_after_401(own_deadline):
                    reauthed = True
                    continue
                detail = _response_detail(resp)
                # The embedded server's login is `balsam server login` (`balsam login` refuses
                # it); the server's own text may name the command already: named once. Also for
                # the refresh call (unauthenticated), whose 401 reaches the user as it is.
                login = "balsam server login" if self.api_root.startswith(UNIX_SCHEME) else "balsam login"
                if not authenticated and login != "balsam login" and "`balsam login`" in _detail_text(detail):
                    detail = _detail_text(detail).replace("`balsam login`", f"`{login}`")
                if authenticated:
                    text = _detail_text(detail).replace("`balsam login`", f"`{login}`")
                    if not self.token:
                        hint = "Not logged in"
                    elif self._expired():
                        hint = f"Login expired at {self.token_expiry:%Y-%m-%d %H:%M} UTC"
                    else:
                        hint = "Login expired or invalid"
                    if f"`{login}`" not in text:
                        hint += f": run `{login}`"
                    if not self.token and login == "balsam login":
                        hint += NOT_LOGGED_IN.partition("`balsam login`")[2]  # " (or `balsam server start` ...)"
                    detail = f"{text}. {hint}"
                error = AuthenticationError(method, f"{self.shown_root}{url}", status, detail)
                if authenticated and self.token:
                    _notify_credential_refused(error)
                raise error
            if status >= 400:
                raise APIError(method, f"{self.shown_root}{url}", status, _response_detail(resp), _refused_ids(resp))
            return resp

    def get(self, path: str, params: "Mapping[str, Any] | None" = None, **kw: Any) -> Any:
        return self.request("GET", path, params=params, **kw)

    def post(self, path: str, json: Any = None, params: "Mapping[str, Any] | None" = None, **kw: Any) -> Any:
        return self.request("POST", path, params=params, json=json, **kw)

    def put(self, path: str, json: Any = None, params: "Mapping[str, Any] | None" = None, **kw: Any) -> Any:
        return self.request("PUT", path, params=params, json=json, **kw)

    def patch(self, path: str, json: Any = None, params: "Mapping[str, Any] | None" = None, **kw: Any) -> Any:
        return self.request("PATCH", path, params=params, json=json, **kw)

    def delete(self, path: str, params: "Mapping[str, Any] | None" = None, **kw: Any) -> Any:
        resp = self._send("DELETE", path, params=params, **kw)
        _note_skipped_running(resp)  # a query delete's jobs left out (collect_skipped_running)
        return _parse(resp)

    # ----------------------------------------------------------------- auth helpers
    def auth_methods(self) -> list[str]:
        result = self.get("/auth/how", authenticated=False)
        return [str(m) for m in result] if isinstance(result, list) else []

    def password_login(self, username: str, password: str, *, refresh: bool = False,
                       label: Optional[str] = None) -> dict[str, Any]:
        """POST the password form; store and return ``{access_token, expiration, ...}``. With
        ``refresh``, also a refresh credential (``refresh_token``, ``refresh_expiration``).

        A wrong password raises :class:`AuthenticationError` (401) at once.
        """
        form = {"username": username, "password": password}
        if refresh:
            form["scope"] = "offline_access"
        if label:
            form["label"] = label
        result = self.request("POST", "/auth/password/login", data=form, authenticated=False)
        if not isinstance(result, dict) or "access_token" not in result:
            raise APIError("POST", f"{self.shown_root}/auth/password/login", 200, f"unexpected login response {result!r}")
        self.token = result["access_token"]
        self.refresh_token = result.get("refresh_token") or self.refresh_token
        self.username = username
        return result

    def register(self, username: str, password: str, invitation: Optional[str] = None) -> dict[str, Any]:
        body = {"username": username, "password": password}
        if invitation:
            body["invitation"] = invitation
        return self.request("POST", "/auth/password/register", json=body, authenticated=False)

    def whoami(self) -> dict[str, Any]:
        return self.get("/auth/password/me")

    # ----------------------------------------------------------------- bound models
    def _bound(self, name: str) -> type:
        cls = self._bound_models.get(name)
        if cls is None:
            from balsam._api import models as api_models

            base = getattr(api_models, name)
            cls = base._bind(self)
            self._bound_models[name] = cls
        return cls

    @property
    def Site(self) -> "type[models.Site]":
        return self._bound("Site")

    @property
    def App(self) -> "type[models.App]":
        return self._bound("App")

    @property
    def Job(self) -> "type[models.Job]":
        return self._bound("Job")

    @property
    def BatchJob(self) -> "type[models.BatchJob]":
        return self._bound("BatchJob")

    @property
    def Session(self) -> "type[models.Session]":
        return self._bound("Session")

    @property
    def TransferItem(self) -> "type[models.TransferItem]":
        return self._bound("TransferItem")

    @property
    def EventLog(self) -> "type[models.EventLog]":
        return self._bound("EventLog")


#: Set by the CLI for short interactive commands: a user typing `balsam job ls` against a server that
#: is down wants an answer in seconds, not after the agent-grade retry budget (minutes).
_interactive_retry_cap: Optional[int] = None


def cap_retries_for_interactive_use(retry_count: Optional[int]) -> None:
    """Cap the retries of clients created from now on in this process (None lifts the cap), and make
    them interactive: a call that waits :data:`WAIT_REPORT_FIRST_S` says so on stderr ("still waiting
    for <URL> after 10 s (Ctrl-C to stop)", again at 20, 40, 80 s), and gives up after
    :data:`INTERACTIVE_MAX_WAIT_S` (or the client's read timeout, if longer) in all, where a server
    that accepts connections and never answers held `balsam job ls` for 4 read timeouts (8 minutes)
    without a word. See ``report_waits_after`` and ``max_call_wait`` of :class:`RESTClient`."""
    global _interactive_retry_cap
    _interactive_retry_cap = retry_count


def load_client(path: "Path | str | None" = None) -> RESTClient:
    """A client from the stored login (``$BALSAM_CLIENT_PATH`` or ``$BALSAM_HOME/client.yml``).

    Raises :class:`NotLoggedIn` (one line) if there is no login.
    """
    settings = ClientSettings.load(path)
    if not settings.token and not settings.refresh_token:
        raise NotLoggedIn("the stored login has no token")
    return RESTClient.from_settings(settings, settings_path=path)  # capped for interactive use, if in force
