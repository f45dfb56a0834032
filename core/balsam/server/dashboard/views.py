"""The dashboard's pages (server-rendered HTML; JavaScript only refreshes them and draws the plots).

Every page reads through the same query logic as the REST API (``jobs_logic``, ``events_select``,
``batch_jobs_select``), scoped to the logged-in user's sites exactly as the API scopes a bearer
token: another user's site, job or BatchJob is "not found" here too.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional
from urllib.parse import parse_qsl, unquote, urlencode

import jinja2
import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.datastructures import QueryParams as StarletteQueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

import balsam
from balsam.dependencies import DELETED, parent_wait
from balsam.models import SUBMITTED_BY_KEY
from balsam.states import BatchJobState, JobState

from .. import job_counts, jobs_logic
from ..auth import (AuthUser, authenticate_password, client_address, issue_credential, require_unscoped,
                    revoke_credentials)
from ..db import count_and_page, read_tx, write_tx
from ..errors import APIError, NotFound, Unauthorized, ValidationFailed
from ..http import ID_AFTER, MAX_TAG_FILTERS, QueryParams, json_response
from ..routes.batch_jobs import BJ_FIELDS, batch_jobs_select
from ..routes.events import EV_FIELDS, events_by_id_select, events_select
from ..routing import PUBLIC_BODY_LIMIT_BYTES, Ctx, read_body, route
from ..settings import secure_cookie_mode
from ..tables import apps, credentials, job_parents, jobs, log_events, sites, users
from . import session as sessions
from .plots import plot_data

logger = logging.getLogger("balsam.server.dashboard")
HERE = Path(__file__).parent
ACTIVE_WINDOW = dt.timedelta(minutes=2)
PAGE_SIZES = (25, 50, 100, 200)
DEFAULT_PAGE_SIZE = 50
BATCH_JOB_PAGE_SIZE = 50
#: States a job is never stored in (CREATED becomes AWAITING_PARENTS/READY/STAGED_IN at once).
LISTED_STATES = [s.value for s in JobState if s not in (JobState.created, JobState.staged_out)]
ACTIVE_BATCH_STATES = [BatchJobState.pending_submission.value, BatchJobState.queued.value,
                       BatchJobState.running.value, BatchJobState.pending_deletion.value]
ERROR_STATES = {JobState.run_error.value, JobState.failed.value, JobState.run_timeout.value}

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _fmt_time(value: Optional[dt.datetime]) -> str:
    if value is None:
        return ""
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(value: Optional[dt.datetime]) -> str:
    return "" if value is None else value.astimezone(dt.timezone.utc).isoformat()


def _ago(value: Optional[dt.datetime]) -> str:
    if value is None:
        return "never"
    seconds = int((dt.datetime.now(dt.timezone.utc) - value).total_seconds())
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def error_text(detail: Any) -> str:
    """An APIError's detail as one line: a validation error's list of ``{loc, msg}`` becomes
    ``"state: expected one of ...; got 'BOGUS'"`` (the field, without the ``query``/``body`` part)."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}" if isinstance(e, dict) else str(e)
            for e in detail)
    return str(detail)


def _num(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _json_text(value: Any) -> str:
    """A stored JSON value (a job's ``data``, an event's, a BatchJob's ``status_info``) as JSON
    text, as inserted (key order kept): a string as itself, anything else as JSON (``{"a": [1,
    true, null]}``, never Python's ``{'a': [1, True, None]}``)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


#: How the dashboard names a BatchJob without ``status_info.submitted_by`` (one its user submitted
#: with ``balsam queue submit`` or the API; ``balsam queue ls`` shows "-").
SUBMITTED_BY_USER = "user"


def submitted_by(status_info: Any) -> str:
    """Who submitted a BatchJob: its ``status_info["submitted_by"]`` (an agent module, e.g.
    ``queue_maintainer``, ``elastic_queue``), else :data:`SUBMITTED_BY_USER`."""
    name = status_info.get(SUBMITTED_BY_KEY) if isinstance(status_info, dict) else None
    return " ".join(str(name).split()) if name not in (None, "") else SUBMITTED_BY_USER


_env.filters.update(time=_fmt_time, iso=_iso, ago=_ago, num=_num, json=_json_text, submitted_by=submitted_by)
_env.globals.update(SUBMITTED_BY_KEY=SUBMITTED_BY_KEY)


# -------------------------------------------------------------------------------------------------
# Request plumbing
# -------------------------------------------------------------------------------------------------

class View:
    """What a page handler gets: the request, the session, the parsed form and the database."""

    def __init__(self, request: Request, session: Optional[sessions.DashboardSession], form: dict[str, str]) -> None:
        self.request = request
        self.session = session
        self.form = form
        self.settings = request.app.state.settings
        self.engine: sa.Engine = request.app.state.engine
        self.base = _app_root(request) + "/dashboard"
        self.set_cookies: list[tuple[str, str, int]] = []

    @property
    def user(self) -> AuthUser:
        assert self.session is not None
        return self.session.user

    def read(self):
        return read_tx(self.engine)

    def params(self, names: Iterable[str]) -> StarletteQueryParams:
        """The page's query string limited to ``names``, without empty values (HTML forms send
        ``state=`` for "any"), tag fields split on spaces and commas outside quotes (``a:1, b:2``,
        ``"exp:a b" c:1``: see :func:`split_tags`). A tags value with an unbalanced quote is refused,
        and so are more than :data:`MAX_TAG_FILTERS` distinct tags. A tag given twice is one filter,
        as in the API's listings (``QueryParams.key_values``): kept once, so that the page's limit,
        its Tags field and its links (count all, states, paging) count and carry distinct pairs."""
        wanted = set(names)
        items: list[tuple[str, str]] = []
        seen_tags: set[str] = set()
        for key, value in self.request.query_params.multi_items():
            if key not in wanted:
                continue
            parts = split_tags(value) if key == "tags" else [value.strip()]
            for part in parts:
                if not part or (key == "tags" and part in seen_tags):
                    continue
                items.append((key, part))
                if key == "tags":
                    seen_tags.add(part)
        n_tags = len(seen_tags)
        if n_tags > MAX_TAG_FILTERS:
            raise ValidationFailed.field(["query", "tags"], f"at most {MAX_TAG_FILTERS} tags, got {n_tags}")
        return StarletteQueryParams(items)

    def filters(self, names: Iterable[str]) -> tuple[StarletteQueryParams, str, str]:
        """The page's filters (:meth:`params`), the text of its Tags field and an error: with a tags
        value that cannot be split, the other filters, the tags as typed (to correct them) and why."""
        names = tuple(names)
        try:
            raw = self.params(names)
        except APIError as exc:
            typed = " ".join(self.request.query_params.getlist("tags"))
            return self.params(n for n in names if n != "tags"), typed, error_text(exc.detail)
        return raw, " ".join(quote_tag(t) for t in raw.getlist("tags")), ""

    def query(self, params: StarletteQueryParams) -> QueryParams:
        return QueryParams(params)

    def url(self, path: str = "", params: "StarletteQueryParams | list[tuple[str, Any]] | dict | None" = None, **changes: Any) -> str:
        """A dashboard URL with query parameters; ``changes`` replace (None removes) parameters."""
        items = list(params.multi_items()) if isinstance(params, StarletteQueryParams) else list(
            (params or {}).items() if isinstance(params, dict) else params or [])
        for key, value in changes.items():
            items = [(k, v) for k, v in items if k != key]
            if value is not None:
                items.append((key, value))
        # A tag is quoted where it must be to come back as one tag (a value with a space or a comma).
        query = urlencode([(k, quote_tag(str(v)) if k == "tags" else v) for k, v in items if v is not None and v != ""])
        return f"{self.base}/{path}" + (f"?{query}" if query else "")

    def render(self, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("title", "")
        context.setdefault("active_page", "")
        html = _env.get_template(template).render(
            base=self.base, user=self.session.user if self.session else None,
            csrf_token=self.session.csrf_token(self.settings.secret_key) if self.session else "",
            version=balsam.__version__, url=self.url, path=self.request.url.path, **context,
        )
        return HTMLResponse(html, status_code=status_code)


_TAG_SEPARATORS = re.compile(r"[\s,]")


def split_tags(text: str) -> list[str]:
    """A Tags field (``a:1, b:2``) as its tags: whitespace and commas separate them, except inside
    quotes, so a value with a space or a comma can be asked for (``"exp:a b"`` or ``exp:"a b"``,
    as ``balsam job ls -t 'exp=a b'`` does). Inside double quotes a backslash escapes ``"`` and
    ``\\``; single quotes take everything literally; elsewhere a backslash is an ordinary character
    (values like ``dir:C:\\runs`` need no quoting)."""
    tags: list[str] = []
    current: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "\"'":
            end = i + 1
            while end < n and text[end] != ch:
                if ch == '"' and text[end] == "\\" and end + 1 < n and text[end + 1] in '"\\':
                    end += 1
                current.append(text[end])
                end += 1
            if end >= n:
                raise ValidationFailed.field(["query", "tags"], f"unbalanced quote ({ch}) in {text!r}")
            i = end + 1
        elif _TAG_SEPARATORS.match(ch):
            tags.append("".join(current))
            current, i = [], i + 1
        else:
            current.append(ch)
            i += 1
    tags.append("".join(current))
    return [t for t in tags if t]


def quote_tag(tag: str) -> str:
    """``tag`` as :func:`split_tags` reads it back as one tag (quoted only where it must be)."""
    if not tag or not re.search(r"[\s,\"']", tag):
        return tag
    return '"' + tag.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _app_root(request: Request) -> str:
    """The application's own path prefix (a reverse proxy's ``--root-path``), inside a Mount too."""
    return request.scope.get("app_root_path", request.scope.get("root_path", ""))


def _secure(request: Request, settings: Any) -> bool:
    # ServerSettings normalises the mode when made, but a program may set the field after ("yes",
    # "1", True): read through the same mapping here, and a value it cannot read gives Secure
    # cookies (fail closed: a typo must not send the session cookie over plain HTTP).
    mode = secure_cookie_mode(settings.dashboard_secure_cookies) or "always"
    return mode == "always" or (mode == "auto" and request.url.scheme == "https")


def _cookie_path(request: Request) -> str:
    return _app_root(request) + "/dashboard"


def _set_session_cookie(response: Response, request: Request, value: str) -> None:
    settings = request.app.state.settings
    response.set_cookie(sessions.SESSION_COOKIE, value, max_age=settings.dashboard_session_ttl_sec,
                        path=_cookie_path(request), httponly=True, samesite="lax", secure=_secure(request, settings))


#: The headers of every dashboard answer, its static files included (an SVG opened by itself is a
#: document too; ``nosniff`` keeps a browser from running a file as other than its type).
SECURITY_HEADERS = (
    ("Content-Security-Policy",
     "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
     "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
)


def _security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS:
        response.headers.setdefault(name, value)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


class _StaticWithSecurityHeaders:
    """StaticFiles answering with :data:`SECURITY_HEADERS` (the pages' own; they had none). Not
    ``no-store``: the pages ask for the files with the version in the query (``?v=``)."""

    def __init__(self, app: StaticFiles) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS:
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _same_origin(request: Request) -> bool:
    """A POST whose Origin (or Referer) names another host is refused even with a valid token."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin or origin == "null":
        return origin != "null"
    host = request.headers.get("host", "")
    match = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://([^/]+)", origin)
    return bool(match) and match.group(1).lower() == host.lower()


def _user_exists(engine: sa.Engine, user_id: int) -> bool:
    with read_tx(engine) as conn:
        return conn.execute(sa.select(users.c.id).where(users.c.id == user_id)).first() is not None


def _session_valid(request: Request, session: sessions.DashboardSession) -> bool:
    """The session's ``dashboard`` credential still exists, is not revoked and has not expired,
    checked as the API checks a bearer token's (the app's credential cache; a revocation made by
    another process counts within ``BALSAM_AUTH_REVOCATION_CACHE_SEC``). The credential goes with
    its user: a deleted user's session ends too."""
    if session.credential_id is None:  # a cookie from before sessions had credentials
        return False
    engine = request.app.state.engine
    try:
        request.app.state.credential_cache.check(lambda: read_tx(engine), session.user)
    except Unauthorized:
        return False
    return True


def _start_session(view: "View", conn: sa.Connection, user: AuthUser, how: str) -> str:
    """A new session's cookie, with its ``dashboard`` credential made in ``conn`` (a write
    transaction that commits before the cookie is sent). The credential lives the session's
    maximum age (``BALSAM_DASHBOARD_SESSION_MAX_AGE_SEC``)."""
    settings = view.settings
    label = f"dashboard {how} from {client_address(view.request)}"
    cred_id, _expires, _code = issue_credential(conn, user.id, "dashboard", label, settings.dashboard_session_max_age_sec)
    cookie, _session = sessions.issue_session(AuthUser(id=user.id, username=user.username, credential_id=cred_id),
                                              settings.secret_key, settings.dashboard_session_ttl_sec)
    return cookie


def _safe_next(view_base: str, target: Optional[str]) -> str:
    """Only a path inside the dashboard (no scheme, no host, no ``//`` or ``\\`` in the path): no
    open redirect. No ``.`` or ``..`` segment either, encoded (``%2e``, ``..%2f``) or not: a browser
    resolves ``/dashboard/../x`` to ``/x``, out of the dashboard (to another application behind the
    same host). Only the path is checked: the query is a page's filters (``workdir__contains=a//b``,
    ``tags=a:..``) and, like the fragment, is never resolved as a path.

    Tabs and line breaks: RedirectResponse percent-encodes them (``%09``, ``%0A``), so a browser
    never gets the raw ones it would drop from a URL; a dot segment split by one (``.<TAB>.``) is
    refused all the same, so that this check does not rest on how the Location header is encoded."""
    if not target or not target.startswith(view_base + "/"):
        return view_base + "/"
    path = re.split(r"[?#]", target, maxsplit=1)[0]
    if "//" in path or "\\" in path:
        return view_base + "/"
    if any(segment in (".", "..") for segment in re.sub(r"[\t\n\r]", "", unquote(path)).split("/")):
        return view_base + "/"
    return target


Handler = Callable[[View], Response]

#: What the login page (and a refused request) says when the browser's session cookie no longer
#: opens a session.
SESSION_ENDED = "Your dashboard session has ended (it expired, was revoked or was logged out): log in again."


#: Database errors whose API answer quotes the database (app.py's handlers): what the page says instead.
_DATABASE_ERROR_KINDS: tuple[tuple[type, str], ...] = (
    (sa.exc.IntegrityError, "The change conflicts with existing data"),
    (sa.exc.DataError, "A value cannot be stored"),
)


async def _database_error_page(request: Request, exc: Exception) -> Response:
    """A database error on a dashboard page, answered by the app's own handler (an outage: 503 and
    Retry-After, noted as an outage; a conflict; a fault of ours: 500, logged), as a page in place
    of the API's JSON: what happened in the handler's words, never the database's message."""
    handler = None
    for cls in type(exc).__mro__:
        handler = request.app.exception_handlers.get(cls) if hasattr(request.app, "exception_handlers") else None
        if handler is not None:
            break
    if handler is None:
        raise exc
    answer = await handler(request, exc)
    if not answer.headers.get("content-type", "").startswith("application/json"):
        return answer
    try:
        detail = json.loads(bytes(answer.body)).get("detail", "")
    except (ValueError, AttributeError):
        detail = ""
    status = answer.status_code
    # The API's answers to a conflict and to a value the database cannot store end with the
    # database's own first line (a constraint's or a column's name, the value): the page names only
    # the kind of error, the server log has the rest (its handlers log it).
    for kind, said in _DATABASE_ERROR_KINDS:
        if isinstance(exc, kind):
            detail = f"{said} ({type(exc).__name__}); the server log has the details."
            break
    title = "Database unavailable" if status == 503 else "Server error" if status >= 500 else "Error"
    page = View(request, None, {}).render(
        "error.html", status, title=title, show_login=False,
        message=(error_text(detail) or "The server could not answer.") + (" Reload the page to try again." if status == 503 else ""))
    for name in ("Retry-After", "Connection"):
        if name in answer.headers:
            page.headers[name] = answer.headers[name]
    return page


#: Dashboard forms are a few short fields; the API's own (bulk-sized) body limit is far too generous.
#: The same bound as the API's public routes (login, registration), which are read before any login too.
FORM_BODY_LIMIT_BYTES = PUBLIC_BODY_LIMIT_BYTES


def _page(path: str, handler: Handler, methods: tuple[str, ...] = ("GET",), *, login: bool = True,
          name: Optional[str] = None, no_referrer: bool = False) -> Route:
    """A dashboard route: session check (redirect to the login page), CSRF check on POST, the
    handler in the thread pool, errors rendered as pages, security headers on everything.
    ``no_referrer``: every answer, the error pages included, sends ``Referrer-Policy: no-referrer``
    (a page whose address holds a secret: the login link's ticket)."""

    async def endpoint(request: Request) -> Response:
        form: dict[str, str] = {}
        if request.method == "POST":
            # Read before any login check, so bounded: a form is a few fields (413 beyond the bound,
            # as a page: it was the API's JSON, without the pages' headers).
            try:
                body = await read_body(request, FORM_BODY_LIMIT_BYTES)
            except APIError as exc:
                return _security_headers(View(request, None, {}).render(
                    "error.html", exc.status_code, title="Refused", show_login=False, message=error_text(exc.detail)))
            form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        try:
            response = await run_in_threadpool(_dispatch, request, form)
        except sa.exc.SQLAlchemyError as exc:
            response = await _database_error_page(request, exc)
        return _security_headers(_no_referrer(response) if no_referrer else response)

    def _dispatch(request: Request, form: dict[str, str]) -> Response:
        settings = request.app.state.settings
        cookie = request.cookies.get(sessions.SESSION_COOKIE)
        session = sessions.read_session(cookie, settings.secret_key)
        if session is not None and not _session_valid(request, session):
            session = None
        view = View(request, session, form)
        if login and session is None:
            # A cookie that no longer opens a session (expired, revoked, logged out elsewhere): the
            # login page says so (``ended``). The cookie stays until a login replaces it, so that
            # every open tab (their live refreshes, the plots' data requests) is told the same.
            ended = bool(cookie)
            if request.method == "GET" and not path.startswith("/plots/data"):
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(view.url("login", next=target, ended="1" if ended else None), status_code=303)
            return view.render("error.html", 401, title="Not logged in",
                               message=SESSION_ENDED if ended else "You are not logged in: log in first.")
        if request.method == "POST" and login:
            assert session is not None
            if not _same_origin(request) or not sessions.check_csrf(session, settings.secret_key, form.get("csrf_token")):
                return view.render("error.html", 403, title="Refused",
                                   message="The form's security token is missing or stale: reload the page and try again.")
        try:
            response = handler(view)
        except APIError as exc:
            response = view.render("error.html", exc.status_code, title="Error", message=error_text(exc.detail))
        except sa.exc.SQLAlchemyError:
            raise  # the app's handlers answer database errors (conflicts, values it cannot store)
        except Exception as exc:  # a page must fail as a page, with the details in the server log
            logger.exception("dashboard page %s failed", request.url.path)
            response = view.render("error.html", 500, title="Server error",
                                   message=f"This page failed ({type(exc).__name__}); the server log has the details.")
        if session is not None and login:
            renewed = sessions.renew_session(session, settings.secret_key, settings.dashboard_session_ttl_sec,
                                             settings.dashboard_session_max_age_sec)
            if renewed:
                _set_session_cookie(response, request, renewed)
        return response

    endpoint.__name__ = name or ("dashboard_" + (path.strip("/").replace("/", "_").replace("{", "").replace("}", "") or "home"))
    return Route(path, endpoint, methods=list(methods), name=endpoint.__name__)


# -------------------------------------------------------------------------------------------------
# Shared lookups
# -------------------------------------------------------------------------------------------------

def _site_rows(conn: sa.Connection, user_id: int) -> list[sa.Row]:
    return list(conn.execute(sa.select(sites).where(sites.c.owner_id == user_id).order_by(sites.c.id)))


def _app_names(conn: sa.Connection, user_id: int) -> dict[int, tuple[str, int]]:
    stmt = (sa.select(apps.c.id, apps.c.name, apps.c.site_id)
            .where(apps.c.site_id.in_(jobs_logic.owned_site_ids(user_id))).order_by(apps.c.name))
    return {row.id: (row.name, row.site_id) for row in conn.execute(stmt)}


def _is_active(site: Any, now: dt.datetime) -> bool:
    return site.last_refresh is not None and now - site.last_refresh < ACTIVE_WINDOW


def _state_table(counts: dict[str, int]) -> list[tuple[str, int]]:
    return [(s, counts.get(s, 0)) for s in LISTED_STATES if counts.get(s)]


# -------------------------------------------------------------------------------------------------
# Pages
# -------------------------------------------------------------------------------------------------

def sites_page(view: View) -> Response:
    now = dt.datetime.now(dt.timezone.utc)
    with view.read() as conn:
        site_rows = _site_rows(conn, view.user.id)
        counts = job_counts.counts_by_site_state(conn, view.user.id)
        bj_stmt, _ = batch_jobs_select(view.user.id, view.query(StarletteQueryParams([("state", s) for s in ACTIVE_BATCH_STATES])),
                                       conn.dialect.name)
        active_bjs = [dict(zip(BJ_FIELDS, r)) for r in conn.execute(bj_stmt.order_by(sa.desc("id")).limit(500))]
    by_site: dict[int, list[dict]] = {}
    for bj in active_bjs:
        by_site.setdefault(bj["site_id"], []).append(bj)
    cards = []
    for site in site_rows:
        site_counts = counts.get(site.id, {})
        cards.append({
            "site": site, "active": _is_active(site, now), "counts": _state_table(site_counts),
            "total": sum(site_counts.values()), "batch_jobs": by_site.get(site.id, []),
        })
    return view.render("sites.html", title="Sites", cards=cards, active_page="sites")


def _listed(params: StarletteQueryParams, name: str) -> list[str]:
    """A list parameter's values as the form shows them selected: repeated and/or comma-separated,
    as the API reads them (``QueryParams.enum_list``), without checking them (the page says why a
    bad one is refused)."""
    return [item.strip() for raw in params.getlist(name) for item in raw.split(",") if item.strip()]


JOB_FILTER_NAMES = ("state", "tags", "site_id", "app_id", "batch_job_id", "workdir__contains", "parent_id")


def jobs_page(view: View) -> Response:
    raw, tags_text, error = view.filters(JOB_FILTER_NAMES)
    paging = view.params(("before", "after", "limit", "count"))
    pq = view.query(paging)
    rows: list[dict] = []
    counts: dict[str, int] = {}
    exact = True
    more = False
    limit = DEFAULT_PAGE_SIZE
    before = after = None
    states: list[str] = []
    with view.read() as conn:
        site_rows = _site_rows(conn, view.user.id)
        app_names = _app_names(conn, view.user.id)
        if not error:  # else tags that cannot be split: nothing to count or list
            try:
                limit = pq.int("limit", DEFAULT_PAGE_SIZE, minimum=1, maximum=max(PAGE_SIZES)) or DEFAULT_PAGE_SIZE
                # job ids are 64-bit (as the Events page's event ids): a 32-bit bound refused the
                # "Older" link of a job id past 2**31
                before, after = pq.int("before", minimum=0, bits=64), pq.int("after", minimum=0, bits=64)
                q = view.query(raw)
                # Checked here, as the API checks it: when the counts say nothing matches, the page is
                # not read, and an unknown state would otherwise read as "0 matching jobs". Read as
                # the API reads it, so ``state=READY,RUNNING`` is both states here too (the page
                # answered 422 for it, and its counts looked for a state named "READY,RUNNING").
                states = q.enum_list("state", JobState) or []
                count_all = pq.choice("count", ["all"]) == "all"
                counts, exact = jobs_logic.count_jobs_by_state(
                    conn, view.user.id, q, window=None if count_all else jobs_logic.COUNT_SCAN_WINDOW)
                if sum(n for s, n in counts.items() if not states or s in states) == 0 and exact:
                    rows, more = [], False  # nothing matches: no need to look for a page of it
                else:
                    rows, more = jobs_logic.keyset_page_jobs(conn, view.user.id, q, limit, before_id=before, after_id=after)
            except APIError as exc:
                error = error_text(exc.detail)
    if error:
        states = _listed(raw, "state")  # as given: the form shows them back
    matching = sum(n for s, n in counts.items() if not states or s in states)
    # A count over the newest jobs only may miss older matches that this very page lists: the
    # lower bound is at least the rows shown, and one more when another page follows.
    at_least = matching if exact else max(matching, len(rows) + (1 if more else 0))
    site_names = {s.id: s.name for s in site_rows}
    newest_page = before is None and after is None
    # Cursor links: "newer" exists unless this is the first page; "older" when more rows lie beyond.
    has_newer = bool(rows) and not newest_page and (after is None or more)
    has_older = bool(rows) and (more if after is None else True)
    return view.render(
        "jobs.html", 422 if error else 200, title="Jobs", active_page="jobs", error=error, rows=rows,
        counts=_state_table(counts), count_total=sum(counts.values()), matching=matching, at_least=at_least, more=more,
        exact=exact, filters=raw,
        window=jobs_logic.COUNT_SCAN_WINDOW, count_all_url=view.url("jobs", raw, count="all") if not exact else "",
        selected_states=states, tags_text=tags_text, sites=site_rows, site_names=site_names,
        apps=app_names, states=LISTED_STATES, limit=limit, page_sizes=PAGE_SIZES,
        newer_url=view.url("jobs", raw, after=rows[0]["id"], limit=limit if limit != DEFAULT_PAGE_SIZE else None) if has_newer else "",
        older_url=view.url("jobs", raw, before=rows[-1]["id"], limit=limit if limit != DEFAULT_PAGE_SIZE else None) if has_older else "",
        first_url=view.url("jobs", raw, limit=limit if limit != DEFAULT_PAGE_SIZE else None) if not newest_page else "",
    )


def _error_tail(events: list[dict]) -> Optional[dict]:
    """The most recent event that carries an error (the tail of job.out, or a hook's traceback);
    else the most recent move to an error state that says why."""
    def data(event: dict) -> dict:
        return event.get("data") if isinstance(event.get("data"), dict) else {}

    with_error = [e for e in events if data(e).get("error")]
    if with_error:
        return with_error[-1]
    # "message": the server's own words; "reason": the launcher's (a RUN_TIMEOUT it reported).
    explained = [e for e in events if e["to_state"] in ERROR_STATES and (data(e).get("message") or data(e).get("reason"))]
    return explained[-1] if explained else None


def job_page(view: View) -> Response:
    job_id = int(view.request.path_params["job_id"])
    if not 0 < job_id < 2 ** 63:  # no job has such an id (jobs.id is a 64-bit integer)
        raise NotFound(f"Job {job_id} not found")
    with view.read() as conn:
        found = jobs_logic.keyset_page_jobs(conn, view.user.id, view.query(StarletteQueryParams([("id", str(job_id))])), 1)[0]
        if not found:
            raise NotFound(f"Job {job_id} not found")
        job = found[0]
        placed = conn.execute(
            sa.select(sites.c.id, sites.c.name, sites.c.path, apps.c.name.label("app_name"))
            .select_from(jobs.join(apps, apps.c.id == jobs.c.app_id).join(sites, sites.c.id == jobs.c.site_id))
            .where(jobs.c.id == job_id)
        ).one()
        stmt, order = events_select(view.user.id, view.query(StarletteQueryParams([("job_id", str(job_id)), ("ordering", "timestamp")])),
                                    conn.dialect.name)
        events = [dict(zip(EV_FIELDS, r)) for r in conn.execute(stmt.order_by(*order))]
        family_ids = set(job["parent_ids"] or [])
        children = list(conn.execute(
            sa.select(job_parents.c.child_id).where(job_parents.c.parent_id == job_id).order_by(job_parents.c.child_id).limit(200)
        ).scalars())
        family_ids.update(children)
        family = {r.id: r for r in conn.execute(
            sa.select(jobs.c.id, jobs.c.state, jobs.c.workdir).where(
                jobs.c.id.in_(sorted(family_ids)), jobs.c.site_id.in_(jobs_logic.owned_site_ids(view.user.id))))}
    job_out = str(Path(placed.path) / "data" / job["workdir"] / "job.out")
    shown_fields = [(name, job[name]) for name in (
        "workdir", "tags", "data", "return_code", "num_nodes", "ranks_per_node", "threads_per_rank", "threads_per_core",
        "gpus_per_rank", "node_packing_count", "launch_params", "wall_time_min", "pending_file_cleanup")]
    return view.render(
        "job.html", title=f"Job {job_id}", active_page="jobs", job=job, site=placed, events=events,
        error_event=_error_tail(events), job_out=job_out, fields=shown_fields,
        **_parents_context(job, family),
        children=[family[c] for c in children if c in family], has_more_children=len(children) >= 200,
        error_states=ERROR_STATES,
    )


#: The most parents (and children) a job page lists.
PARENTS_SHOWN = 200


def _parents_context(job: dict, family: dict[int, Any]) -> dict[str, Any]:
    """Every parent of ``job`` (``None`` in place of one deleted) and, for a job in
    AWAITING_PARENTS, what it waits for and what to do: the rule and its words are
    :func:`balsam.dependencies.parent_wait`'s, shared with ``balsam job show``."""
    wait = parent_wait(job["id"], job["state"], job["parent_ids"],
                       {p: family[p].state for p in job["parent_ids"] or () if p in family})
    # A campaign's reduction step can have 100,000 parents: the page lists PARENTS_SHOWN (the list
    # and the "Waiting for" line) and says how many more, as the Children list does. FAILED ones
    # first (they keep the job waiting until re-run), then the other unfinished ones, then the
    # rest, each by id: in id order a blocking FAILED parent past the first 200 was named nowhere.
    parents = sorted(wait.parents, key=_blocking_first)
    waits_for = sorted(wait.waits_for, key=_blocking_first)
    waits_for_text = wait.waits_for_text
    if waits_for:
        waits_for_text = ", ".join(f"{p} ({s})" for p, s in waits_for[:PARENTS_SHOWN])
        if len(waits_for) > PARENTS_SHOWN:
            waits_for_text += f" and {len(waits_for) - PARENTS_SHOWN:,} more"
    return {
        "parents": [(p, family.get(p)) for p, _ in parents[:PARENTS_SHOWN]],
        "more_parents": max(0, len(parents) - PARENTS_SHOWN),
        "deleted_label": DELETED, "waiting": wait.waiting, "waits_for_text": waits_for_text,
        # each advice line as (text, is_code) pieces: its commands (between backticks) shown as code
        # (the CLI's lowercase sentence starts with a capital here)
        "parent_advice": [[(piece, n % 2 == 1) for n, piece in enumerate((line[:1].upper() + line[1:]).split("`")) if piece]
                          for line in _capped_advice(wait.advice, waits_for)],
    }


def _blocking_first(parent: tuple[int, Optional[str]]) -> tuple[int, int]:
    pid, state = parent
    if state == JobState.failed.value:
        return 0, pid
    return (1 if state not in (None, JobState.finished.value) else 2), pid


def _capped_advice(advice: list[str], waits_for: list[tuple[int, str]]) -> list[str]:
    """``advice`` with its re-run command naming at most PARENTS_SHOWN FAILED parents: it named
    every one (5,000 FAILED parents: 68 KB of ``-i`` on the page). Capped here, not in
    :func:`parent_wait`: ``balsam job show`` prints the whole command, which can be run as it is."""
    failed = sorted(p for p, s in waits_for if s == JobState.failed.value)
    if len(failed) <= PARENTS_SHOWN:
        return advice
    every = " ".join(f"-i {p}" for p in failed)
    shown = " ".join(f"-i {p}" for p in failed[:PARENTS_SHOWN])
    command = "`balsam job modify {} -s RESTART_READY`"
    return [line.replace(command.format(every),
                         f"{command.format(shown)} and {len(failed) - PARENTS_SHOWN:,} more", 1) for line in advice]


#: ``id``: one BatchJob (the link from a job's page), as the API's ``GET /batch-jobs/?id=``.
BATCH_JOB_FILTER_NAMES = ("state", "site_id", "id")


def batch_jobs_page(view: View) -> Response:
    raw = view.params(BATCH_JOB_FILTER_NAMES)
    error = ""
    page, count = 1, 0
    bjs: list[dict] = []
    ran: dict[int, dict[str, int]] = {}
    with view.read() as conn:
        site_rows = _site_rows(conn, view.user.id)
        try:
            page = view.query(view.params(("page",))).int("page", 1, minimum=1) or 1
            stmt, _ = batch_jobs_select(view.user.id, view.query(raw), conn.dialect.name)
            count, rows = count_and_page(conn, stmt, [sa.desc("id")], BATCH_JOB_PAGE_SIZE, (page - 1) * BATCH_JOB_PAGE_SIZE)
        except APIError as exc:  # shown above the results, the filter form kept to correct it
            error, rows = error_text(exc.detail), []
        bjs = [dict(zip(BJ_FIELDS, r)) for r in rows]
        if bjs:
            for bj_id, state, n in conn.execute(
                sa.select(jobs.c.batch_job_id, jobs.c.state, sa.func.count())
                .where(jobs.c.batch_job_id.in_([b["id"] for b in bjs]), jobs.c.site_id.in_(jobs_logic.owned_site_ids(view.user.id)))
                .group_by(jobs.c.batch_job_id, jobs.c.state)
            ):
                ran.setdefault(bj_id, {})[state] = n
    pages = max(1, -(-count // BATCH_JOB_PAGE_SIZE))
    return view.render(
        "batch_jobs.html", 422 if error else 200, title="BatchJobs", active_page="batch_jobs", error=error,
        batch_jobs=bjs, count=count, page=page,
        pages=pages, filters=raw, selected_states=_listed(raw, "state"), states=[s.value for s in BatchJobState],
        sites=site_rows, site_names={s.id: s.name for s in site_rows}, ran=ran,
        # past the last page (an old link, a typed number): "Newer" leads to the last page, not the one before
        prev_url=view.url("batch-jobs", raw, page=min(page - 1, pages)) if page > 1 else "",
        next_url=view.url("batch-jobs", raw, page=page + 1) if page < pages else "",
    )


#: The Events page's filters: the API's own (``GET /events/``), so the page lists what it lists.
EVENT_FILTER_NAMES = ("job_id", "batch_job_id", "site_id", "from_state", "to_state", "tags", "timestamp_after",
                      "timestamp_before")
EVENT_PAGE_SIZE = 100


def events_page(view: View) -> Response:
    """The EventLog (state changes of the user's jobs), newest first, paged by the event id as the
    Jobs page is by the job id ("Older": ``before``; "Newer": the API's ``id__gt``), never by an
    offset, so that a page deep in a long campaign's log costs what the first does."""
    raw, tags_text, error = view.filters(EVENT_FILTER_NAMES)
    events: list[dict] = []
    more = False
    before = after = None
    with view.read() as conn:
        site_rows = _site_rows(conn, view.user.id)
        if not error:
            try:
                paging = view.query(view.params(("before", "after")))
                before, after = paging.int("before", minimum=0, bits=64), paging.int("after", minimum=0, bits=64)
                params = list(raw.multi_items()) + ([(ID_AFTER, str(after))] if after is not None else [])
                # Read as the API reads a page (routes.events.events_page_select), in id order: not
                # the join of events_select, whose plan on SQLite first read every job of the sites
                # (10^5 jobs: 13 ms for the newest page, 0.5 ms this way).
                stmt = events_by_id_select(conn, view.user.id, view.query(StarletteQueryParams(params)),
                                           newest_first=after is None, before=before)
                found = [dict(zip(EV_FIELDS, r)) for r in conn.execute(stmt.limit(EVENT_PAGE_SIZE + 1))]
                more = len(found) > EVENT_PAGE_SIZE
                events = found[:EVENT_PAGE_SIZE]
                if after is not None:
                    events.reverse()
            except APIError as exc:
                error = error_text(exc.detail)
    newest_page = before is None and after is None
    return view.render(
        "events.html", 422 if error else 200, title="Events", active_page="events", error=error, events=events,
        filters=raw, tags_text=tags_text, sites=site_rows, states=LISTED_STATES, error_states=ERROR_STATES,
        newer_url=view.url("events", raw, after=events[0]["id"]) if events and not newest_page and (after is None or more) else "",
        older_url=view.url("events", raw, before=events[-1]["id"]) if events and (more if after is None else True) else "",
        first_url=view.url("events", raw) if not newest_page else "",
    )


PLOT_FILTER_NAMES = ("site_id", "tags")


def plots_page(view: View) -> Response:
    """The page without its figures: plots.js fetches them (``plots/data``) and fills the summary
    table and the charts from that one answer, so a view (and each refresh) computes them once."""
    raw, tags_text, error = view.filters(PLOT_FILTER_NAMES)
    with view.read() as conn:
        site_rows = _site_rows(conn, view.user.id)
        if not error:
            try:  # the filters checked as plot_data checks them (the statements are built, not run)
                q = view.query(raw)
                events_select(view.user.id, q, conn.dialect.name)
                batch_jobs_select(view.user.id, q, conn.dialect.name)
            except APIError as exc:
                error = error_text(exc.detail)
    return view.render(
        "plots.html", 422 if error else 200, title="Throughput and utilization", active_page="plots", error=error,
        sites=site_rows, filters=raw, tags_text=tags_text, data_url="" if error else view.url("plots/data", raw),
    )


def plots_data(view: View) -> Response:
    raw = view.params(PLOT_FILTER_NAMES)
    with view.read() as conn:
        data = plot_data(conn, view.user.id, view.query(raw))
    return json_response(data)


# -------------------------------------------------------------------------------------------------
# Login, logout, one-time links
# -------------------------------------------------------------------------------------------------

def _logged_in_as(user: AuthUser) -> str:
    return (f"You are logged in as {user.username} in this browser (from another tab or window): "
            f"log out first to log in as another user.")


def login_page(view: View) -> Response:
    if view.session is not None and view.request.method == "GET":
        return RedirectResponse(_safe_next(view.base, view.request.query_params.get("next")), status_code=303)
    secret = view.settings.secret_key
    error, status = "", 200
    next_url = view.form.get("next") or view.request.query_params.get("next") or ""
    username = view.form.get("username", "")
    if view.request.method == "POST":
        nonce_ok = sessions.check_login_nonce(secret, view.request.cookies.get(sessions.LOGIN_COOKIE),
                                              view.form.get("login_token"))
        # A form whose nonce is not this browser's current one, from a browser with a session: a
        # form opened before another tab logged in (the nonce cookie went with that login). On to
        # the page only for that session's own user, the password checked: a redirect on any form
        # took another account's username and password (or a wrong password) to the session's
        # user's pages without a word.
        session_user = view.session.user if view.session is not None and not nonce_ok else None
        if not _same_origin(view.request):  # a login form posted from another site (login CSRF)
            error, status = "This login form was sent from another site and is refused: log in from this page.", 403
        elif not nonce_ok and session_user is None:
            error, status = "The login form expired: please try again.", 403
        elif session_user is not None and username != session_user.username:
            error, status = _logged_in_as(session_user), 409
        elif "password" not in view.settings.login_methods:
            error, status = "Password login is not enabled on this server.", 400
        else:
            try:
                with view.read() as conn:
                    user = authenticate_password(conn, username, view.form.get("password", ""),
                                                 throttle=view.request.app.state.login_throttle,
                                                 address=client_address(view.request),
                                                 only_user=view.settings.only_user)
            except Unauthorized as exc:
                error, status = str(exc.detail), 401
            except APIError as exc:  # e.g. a rate limit (429) decided by the server's login check
                error, status = str(exc.detail), exc.status_code
            else:
                if session_user is not None and user.id == session_user.id:  # logged in meanwhile: on to the page
                    return RedirectResponse(_safe_next(view.base, next_url), status_code=303)
                if session_user is not None:
                    error, status = _logged_in_as(session_user), 409
                else:
                    with write_tx(view.engine) as conn:
                        cookie = _start_session(view, conn, user, "password login")
                    response = RedirectResponse(_safe_next(view.base, next_url), status_code=303)
                    _set_session_cookie(response, view.request, cookie)
                    response.delete_cookie(sessions.LOGIN_COOKIE, path=_cookie_path(view.request))
                    return response
    # Every tab's form carries the browser's one nonce: a new nonce for each form replaced the cookie
    # of the forms already open, and logging in from one of those (two tabs sent to log in when
    # their session ended) answered "The login form expired".
    current = view.request.cookies.get(sessions.LOGIN_COOKIE)
    nonce = current if current and sessions.check_login_nonce(secret, current, current) else sessions.new_login_nonce(secret)
    # Why this form is shown (a page asked for a login): a session that ended says so.
    notice = "" if error else SESSION_ENDED if view.request.query_params.get("ended") else \
        "Log in to see that page." if next_url else ""
    response = view.render("login.html", status, title="Log in", error=error, notice=notice, username=username,
                           next_url=next_url, login_token=nonce)
    response.set_cookie(sessions.LOGIN_COOKIE, nonce, max_age=3600, path=_cookie_path(view.request), httponly=True,
                        samesite="strict", secure=_secure(view.request, view.settings))
    return response


def logout(view: View) -> Response:
    """End the session: its credential is revoked (a copy of the cookie stops working too)."""
    session = view.session
    if session is not None and session.credential_id is not None:
        with write_tx(view.engine) as conn:
            revoke_credentials(conn, sa.and_(credentials.c.id == session.credential_id,
                                             credentials.c.user_id == session.user.id,
                                             credentials.c.kind == "dashboard"))
        view.request.app.state.credential_cache.forget([session.credential_id])
    response = RedirectResponse(view.url("login"), status_code=303)
    response.delete_cookie(sessions.SESSION_COOKIE, path=_cookie_path(view.request))
    return response


def _no_referrer(response: Response) -> Response:
    """``response`` sent with ``Referrer-Policy: no-referrer``: a page whose address holds a login
    ticket names it to nobody (not even this server's own stylesheet and links)."""
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def ticket_login(view: View) -> Response:
    """``GET /dashboard/ticket?t=...``. Every answer (its route's ``no_referrer``), a database
    error's page too, sends no Referer: the address holds the ticket, perhaps not yet redeemed."""
    ticket = sessions.read_ticket(view.request.query_params.get("t"), view.settings.secret_key)
    if ticket is None or not _user_exists(view.engine, ticket.user.id):
        return view.render("error.html", 401, title="Link expired",
                           message="This login link is invalid or has expired (links last two minutes): run "
                                   "`balsam dashboard` again, or log in with a password.")
    # One-time: a link seen by someone else (a shared screen, a proxy's log) must not log them in too.
    with write_tx(view.engine) as conn:
        first_use = sessions.redeem_ticket(conn, ticket)
        cookie = _start_session(view, conn, ticket.user, "login link") if first_use else None
    if cookie is None:
        return view.render("error.html", 401, title="Link already used",
                           message="This login link has already been used (each link logs in once): run "
                                   "`balsam dashboard` again, or log in with a password.")
    response = RedirectResponse(view.url(""), status_code=303)
    _set_session_cookie(response, view.request, cookie)
    return response


def login_link(ctx: Ctx) -> Response:
    """``POST /dashboard/login-link`` (API bearer auth): a one-time login path for a browser."""
    user = ctx.user
    # A launcher credential is limited to its site and mints nothing: a dashboard session shows all
    # the user's sites and would outlive the credential's revocation. (Checked here rather than with
    # route(not_for_site_scoped=...), whose message would name the path inside the mount.)
    require_unscoped(user, "open a dashboard session: run `balsam dashboard` with your own login")
    with ctx.read() as conn:
        if conn.execute(sa.select(users.c.id).where(users.c.id == user.id)).first() is None:
            raise Unauthorized("This token's user no longer exists")
    ticket = sessions.issue_ticket(user, ctx.settings.secret_key)
    path = _app_root(ctx.request) + "/dashboard/ticket?" + urlencode({"t": ticket})
    return json_response({"ticket": ticket, "path": path, "expires_in": sessions.TICKET_TTL_SEC})


def not_found_page(request: Request, status_code: int) -> Response:
    """An HTML answer for a dashboard address that does not exist (the API answers JSON)."""
    view = View(request, None, {})
    message = f"No page at {request.url.path}." if status_code == 404 else f"{request.method} is not allowed here."
    return _security_headers(view.render("error.html", status_code, title="Not found" if status_code == 404 else "Not allowed",
                                         message=message))


def _redirect_home(request: Request) -> Response:
    return RedirectResponse(_app_root(request) + "/dashboard/", status_code=307)


def dashboard_routes() -> list[BaseRoute]:
    pages = [
        _page("/", sites_page),
        _page("/jobs", jobs_page),
        _page("/jobs/{job_id:int}", job_page),
        _page("/batch-jobs", batch_jobs_page),
        _page("/events", events_page),
        _page("/plots", plots_page),
        _page("/plots/data", plots_data),
        _page("/login", login_page, ("GET", "POST"), login=False),
        _page("/logout", logout, ("POST",)),
        _page("/ticket", ticket_login, login=False, no_referrer=True),
        route("/login-link", {"POST": login_link}),
        Mount("/static", app=_StaticWithSecurityHeaders(StaticFiles(directory=HERE / "static")), name="dashboard_static"),
    ]
    return [
        Route("/dashboard", _redirect_home, methods=["GET"]),
        Mount("/dashboard", routes=pages),
    ]
