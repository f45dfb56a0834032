"""Keep-alive HTTP/1.1 connections to a server on this machine (Unix socket or loopback http), on the
standard library's ``http.client``.

Why not httpx here: a local server needs neither TLS, nor proxies, nor HTTP/2, and importing httpx
(with httpcore, h11 and anyio) costs ~80 ms of CPU in every process that talks to one: a quarter of
a launcher's start-up to its first RUNNING job, and every ``balsam`` command's. httpx stays the
client of remote (https) servers, where proxies (``https_proxy`` on compute nodes) and certificate
pinning matter; :meth:`balsam.client.RESTClient._http` picks one by address.

Thread contract: any thread may call :meth:`LocalHTTPPool.request`; each request holds one
connection alone (taken from the idle list under a lock, or new) and gives it back when the answer
has been read in full. A connection the server closed while it sat idle (uvicorn closes idle
keep-alive connections after 5 s) is noticed before reuse (its socket is readable) and dropped, so
a launcher that was quiet for a while does not pay a failed request and a retry.

Failures are raised as :class:`LocalTransportError` (a ``ConnectionError``), which the REST client
retries like httpx's transport errors; ``connect_failed`` says that nothing was sent.

``http.client`` is imported with the first connection, not with this module: with the ``ssl`` and
``email`` modules it pulls in, it is ~10 ms (on the 2-CPU VM of the benchmarks) of every process that imports
``balsam.api``, and a Python ``run()`` job that never calls the server does not need it.
"""

from __future__ import annotations

import functools
import json
import select
import socket
import threading
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional
from urllib.parse import quote

if TYPE_CHECKING:  # pragma: no cover
    import http.client

#: Idle connections kept per pool (a launcher uses at most a few at once: loop, acquirer, updater).
MAX_IDLE = 8


class LocalTransportError(ConnectionError):
    """The request did not get an answer (connection refused or lost, timeout)."""

    def __init__(self, message: str, *, connect_failed: bool = False, timed_out: bool = False) -> None:
        super().__init__(message)
        self.connect_failed = connect_failed
        self.timed_out = timed_out


class ResponseHeaders(dict):
    """Response headers with case-insensitive ``get`` and ``in`` (keys stored lower-case)."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


class LocalResponse:
    """What the REST client reads of an answer (the names httpx.Response gives them)."""

    __slots__ = ("status_code", "reason_phrase", "headers", "content")

    def __init__(self, status_code: int, reason_phrase: str, headers: ResponseHeaders, content: bytes) -> None:
        self.status_code = status_code
        self.reason_phrase = reason_phrase
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


def _param_text(value: Any) -> str:
    # As httpx writes query values, so that both transports send the same URL.
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return ""
    return str(value)


def _param_pairs(params: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    for key, value in params.items():
        if isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                yield key, _param_text(item)
        else:
            yield key, _param_text(value)


def encode_query(params: "Mapping[str, Any] | None") -> str:
    """``a=1&b=x&b=y`` (a list is the key repeated), percent-encoded; empty for no parameters."""
    if not params:
        return ""
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in _param_pairs(params))


def _http_client() -> Any:
    """The standard library's ``http.client`` (imported on first use: see the module's docstring)."""
    import http.client

    return http.client


@functools.cache
def _unix_connection_class() -> Any:
    """``http.client.HTTPConnection`` over a Unix socket (the Host header is ``host``)."""

    class UnixHTTPConnection(_http_client().HTTPConnection):  # type: ignore[misc,name-defined]
        def __init__(self, socket_path: str, host: str, timeout: float) -> None:
            super().__init__(host, timeout=timeout)
            self.socket_path = socket_path

        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except BaseException:
                sock.close()
                raise
            self.sock = sock

    return UnixHTTPConnection


class LocalHTTPPool:
    """Connections to one local server: ``unix_path`` (a Unix socket, Host header ``host``) or
    ``host``:``port`` over TCP. ``headers`` go with every request."""

    def __init__(self, *, host: str, port: Optional[int] = None, unix_path: Optional[str] = None,
                 connect_timeout: float = 6.2, read_timeout: float = 120.0,
                 headers: "Mapping[str, str] | None" = None, base_path: str = "") -> None:
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.headers = dict(headers or {})
        self.base_path = base_path.rstrip("/")
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        where = f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"
        return f"LocalHTTPPool({where})"

    # -- connections ---------------------------------------------------------------------------
    def _new_connection(self, timeout: Optional[float] = None) -> http.client.HTTPConnection:
        connect_timeout = self.connect_timeout if timeout is None else min(self.connect_timeout, timeout)
        if self.unix_path:
            conn: http.client.HTTPConnection = _unix_connection_class()(self.unix_path, self.host, connect_timeout)
        else:
            conn = _http_client().HTTPConnection(self.host, self.port, timeout=connect_timeout)
        try:
            conn.connect()
        except socket.timeout as exc:
            conn.close()
            raise LocalTransportError(f"connect to {self._where()} timed out", connect_failed=True, timed_out=True) from exc
        except OSError as exc:
            conn.close()
            raise LocalTransportError(f"cannot connect to {self._where()}: {exc}", connect_failed=True) from exc
        conn.sock.settimeout(self.read_timeout)
        return conn

    def _where(self) -> str:
        return self.unix_path or f"{self.host}:{self.port}"

    @staticmethod
    def _closed_by_server(conn: http.client.HTTPConnection) -> bool:
        # An idle keep-alive connection has nothing to read; readable means the server closed it
        # (or sent something unasked): either way it cannot carry the next request.
        # poll, not select: a launcher can hold more than FD_SETSIZE (1,024) descriptors.
        sock = conn.sock
        if sock is None:
            return True
        poller = select.poll()
        try:
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def _take(self, timeout: Optional[float] = None) -> http.client.HTTPConnection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._new_connection(timeout)
            if not self._closed_by_server(conn):
                return conn
            conn.close()

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- requests ------------------------------------------------------------------------------
    def request(self, method: str, url: str, *, params: "Mapping[str, Any] | None" = None,
                content: Optional[bytes] = None, data: "Mapping[str, Any] | None" = None,
                headers: "Mapping[str, str] | None" = None, timeout: Optional[float] = None) -> LocalResponse:
        """One request; the whole answer is read before this returns. ``data``: a form body;
        ``timeout``: this request's connect and read timeout, when shorter than the pool's (the
        rest of an interactive call's wait)."""
        target = self.base_path + url
        query = encode_query(params)
        if query:
            target += ("&" if "?" in target else "?") + query
        all_headers = {**self.headers, **(headers or {})}
        body = content
        if data is not None:
            body = encode_query(data).encode()
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn = self._take(timeout)
        read_timeout = self.read_timeout
        try:
            if timeout is not None and timeout < read_timeout:
                read_timeout = timeout
                conn.sock.settimeout(timeout)
            conn.request(method, target, body=body, headers=all_headers)
            resp = conn.getresponse()
            payload = resp.read()
        except socket.timeout as exc:
            conn.close()
            raise LocalTransportError(f"{method} {url}: no answer from {self._where()} within {read_timeout:.3g} s",
                                      timed_out=True) from exc
        except (OSError, _http_client().HTTPException) as exc:
            conn.close()
            raise LocalTransportError(f"{method} {url}: connection to {self._where()} lost: "
                                      f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            conn.close()  # a half-used connection must not be reused
            raise
        answer = LocalResponse(resp.status, resp.reason,
                               ResponseHeaders((k.lower(), v) for k, v in resp.getheaders()), payload)
        if resp.will_close:
            conn.close()
        else:
            if read_timeout != self.read_timeout:
                conn.sock.settimeout(self.read_timeout)
            self._give_back(conn)
        return answer
