"""What guards the server's doors before the app: the access log's redaction of secrets in
request targets (one-time login links, credentials sent in a query string; installed by every
app, see ``create_app``) and the embedded server's loopback-only ``Host`` check (against DNS
rebinding). Standard library only, so that app.py and embedded.py import it at once (the CLI
imports embedded.py for its helpers; it need not load starlette)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Awaitable, Callable, MutableMapping
from urllib.parse import unquote

from balsam.netnames import is_loopback_host

#: A request target with a query string, as uvicorn's access line writes it (raw path, ``"`` as %22).
_TARGET_WITH_QUERY = re.compile(r'(/[^\s?"]*)\?([^\s"]*)')
#: The last path segment of the dashboard's one-time login link (``/dashboard/ticket?t=<ticket>``).
_SECRET_QUERY_SEGMENT = "ticket"
#: Query parameters whose values are credentials, on any path (compared decoded, lowercased, with
#: all but letters and digits left out: ``accessToken``, ``api-key``, ``Access%5FToken``,
#: ``access.token``, ``token[]`` are these names). No
#: route reads a credential from the query (tokens go in ``Authorization``, passwords and refresh
#: codes in the body), so such a request is refused (401, 422), but uvicorn logged its target
#: first: a client that put its token (``?access_token=...``, as some OAuth2 clients do), its
#: password or its refresh code there left a working secret in the log for whoever reads it.
SECRET_QUERY_NAMES = frozenset({
    "accesstoken", "refreshtoken", "idtoken", "token", "password", "passwd", "clientsecret", "secret",
    "invitation", "apikey", "authorization",
})
#: How many times a parameter's value is decoded looking for a secret inside it (a value encoded
#: twice, inside a ``next`` that is itself inside one).
_NESTED_DEPTH = 3
#: Characters of one access line's target-looking values decoded looking for a nested secret;
#: past them such a value is redacted without being decoded.
_NESTED_BUDGET = 16384
_NOT_ALPHANUMERIC = re.compile(r"[^0-9a-z]+")
#: What a decoded target must contain (letters and digits only) to be searched for a secret:
#: a part of each of :data:`SECRET_QUERY_NAMES` (``api-key`` is ``apikey``), and the login link.
_SECRET_WORDS = ("token", "passw", "secret", "invitation", "apikey", "authorization", _SECRET_QUERY_SEGMENT)


def _redacted(part: str) -> str:
    return part.split("=", 1)[0] + "=[redacted]" if "=" in part else "[redacted]" if part else part


def _plain_name(text: str) -> str:
    """``text`` decoded, lowercased, with everything but letters and digits left out."""
    if "%" in text:  # unquote only what is encoded: an access line is written for every request
        text = unquote(text.replace("+", " "))
    return _NOT_ALPHANUMERIC.sub("", text.lower())


def _secret_name(name: str) -> bool:
    """Whether a (possibly encoded) query parameter name is one of :data:`SECRET_QUERY_NAMES`."""
    return bool(name) and _plain_name(name) in SECRET_QUERY_NAMES


def _looks_like_target(value: str) -> bool:
    """Whether a raw query value is a request target (``/...``), encoded up to :data:`_NESTED_DEPTH`
    times: only such values are decoded further (a redirect's ``next``); ordinary data such as
    ``tags=note:a%26token%3Dx`` is not, so it is neither redacted nor costs a nested decode."""
    head = value[:3 * _NESTED_DEPTH + 3].lower()
    for _ in range(_NESTED_DEPTH):
        if not head.startswith("%25"):
            break
        head = "%" + head[3:]
    return head.startswith(("/", "%2f"))


def _carries_secret(part: str, budget: "list[int]", depth: int = _NESTED_DEPTH) -> bool:
    """Whether a query parameter (``name=value``) is a secret, or its value is a request target
    that, decoded, carries one: the dashboard's login redirect copies the whole target it was sent
    (``/dashboard/login?next=%2Fjobs%3Faccess_token%3D...``, or a one-time login link). ``budget``
    holds the characters of the line's target-looking values still to be decoded; past it, such a
    value is redacted undecoded (an access line is written in the event loop, for every request)."""
    name, _eq, value = part.partition("=")
    if _secret_name(name):
        return True
    if depth == 0 or not value or not _looks_like_target(value):
        return False
    budget[0] -= len(value)
    if budget[0] < 0:
        return True  # past the line's budget: redacted undecoded
    decoded = value
    for _ in range(depth):  # cheap and linear: decode until it stops changing
        inner = unquote(decoded.replace("+", " "))
        if inner == decoded:
            break
        decoded = inner
    plain = _NOT_ALPHANUMERIC.sub("", decoded.lower())
    if not any(word in plain for word in _SECRET_WORDS):
        return False
    return _nested_carries_secret(value, budget, depth)


def _nested_carries_secret(value: str, budget: "list[int]", depth: int) -> bool:
    """Whether a target-looking ``value``, decoded, is a login link or has a secret parameter."""
    if depth == 0:
        return False
    inner = unquote(value.replace("+", " "))
    path, mark, query = inner.partition("?")
    if mark and unquote(path).rstrip("/").rsplit("/", 1)[-1] == _SECRET_QUERY_SEGMENT:
        return True
    if any(_carries_secret(p, budget, depth - 1) for p in (query if mark else inner).split("&") if "=" in p):
        return True
    return inner != value and _nested_carries_secret(inner, budget, depth - 1)  # encoded once more


def redact_request_targets(text: str) -> str:
    """``text`` with secrets of request targets replaced by ``[redacted]``: every query value of
    one-time login links (whoever reads the log within the ticket's two minutes could log in with
    one not yet redeemed; the path is compared decoded, ``/dashboard/%74icket`` is routed as
    ``/dashboard/ticket``, and every value goes, whatever its possibly encoded name), and on any
    path the values of :data:`SECRET_QUERY_NAMES` (names compared decoded, lowercased, all but
    letters and digits left out) and the values that are request targets (``/...``, encoded or
    not) carrying such a parameter or login link inside them (``next=%2Fjobs%2F%3Faccess_token%3D...``)."""

    def redact(match: "re.Match[str]") -> str:
        path, query = match.group(1), match.group(2)
        if unquote(path).rstrip("/").rsplit("/", 1)[-1] == _SECRET_QUERY_SEGMENT:
            return f"{path}?{'&'.join(_redacted(part) for part in query.split('&'))}"
        parts = query.split("&")
        budget = [_NESTED_BUDGET]
        secret = [_carries_secret(part, budget) for part in parts]
        if not any(secret):
            return match.group(0)
        return f"{path}?{'&'.join(_redacted(p) if s else p for p, s in zip(parts, secret))}"

    return _TARGET_WITH_QUERY.sub(redact, text) if "?" in text else text


class AccessLogRedaction(logging.Filter):
    """Keeps secrets of request targets out of uvicorn's access log (``redact_request_targets``);
    the record's arguments keep their number and order (uvicorn's access formatter unpacks them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_request_targets(a) if isinstance(a, str) else a for a in record.args)
        elif not record.args and isinstance(record.msg, str):
            record.msg = redact_request_targets(record.msg)
        return True


#: The one instance (``Logger.addFilter`` adds an instance once, however many apps are created).
ACCESS_LOG_REDACTION = AccessLogRedaction()


ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


def _host_name(host: str) -> str:
    """The name of a ``Host`` header, without its port, lower-cased (``[::1]:8765`` -> ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0]


def loopback_hosts_only(app: ASGIApp) -> ASGIApp:
    """``app``, answering a request that reached a TCP port with a ``Host`` other than a loopback
    name (``localhost``, ``localhost.localdomain``, ``ip6-localhost``; with or without a trailing
    dot) or a loopback address (``127.0.0.1``, ``[::1]``, any of 127.0.0.0/8; with any port) 421
    (Misdirected Request), in one line. For a server whose TCP port listens on a loopback address
    only (the embedded server's default): those are the names a browser of this machine (or at the
    end of an SSH tunnel) uses for it. Any other name is a web page whose domain was made to
    resolve to 127.0.0.1 (DNS rebinding), which would otherwise reach the unauthenticated login
    routes from the user's browser. Requests on the Unix socket (the ASGI ``server`` has no port
    there) and those without a ``Host`` (HTTP/1.0 clients; browsers always send one) are let
    through."""

    async def guarded(scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                      send: Callable[[Any], Awaitable[None]]) -> None:
        server = scope.get("server")
        if scope["type"] == "http" and server is not None and server[1] is not None:
            raw = next((value for name, value in scope["headers"] if name == b"host"), None)
            host = raw.decode("latin-1") if raw is not None else None
            if host is not None and not is_loopback_host(_host_name(host)):
                body = json.dumps({"detail": (
                    f"Host {host!r} is not a name of this server: its port listens on the loopback "
                    f"address only and answers requests for localhost or a loopback address such as "
                    f"127.0.0.1 or [::1] (e.g. http://127.0.0.1:{server[1]}/), not for another site's name "
                    f"(DNS rebinding)")}, separators=(",", ":"), ensure_ascii=False).encode()
                await send({"type": "http.response.start", "status": 421,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded
