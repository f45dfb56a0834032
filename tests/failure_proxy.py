"""An HTTP proxy in front of a real test server that injects failures (shared by the tests of
retried requests and of the status updater: tests/api/test_retried_updates.py,
tests/api/test_updater_*.py, tests/launcher/test_h3_status_updater_failures.py).

Every request is forwarded to ``upstream`` unless a rule below answers it instead. Two kinds of rule:

* per request (any method and path): :meth:`FailureProxy.lose_next` forwards the next matching
  request and then drops the connection (``"drop"``: applied, the answer lost) or answers 502;
  every request is recorded in ``log`` (method, path, upstream status, mode) and ``keys``
  (its Idempotency-Key);
* for ``PATCH /jobs/`` (the status updater's call), recorded in ``patches``: ``plan`` / ``always``
  (429 or 503 with a ``Retry-After``, or a drop), ``fail_ids`` / ``flaky`` / ``fail_when`` (500,
  a server fault of one job's data), ``hold`` / ``hold_ids`` (an answer or a call that waits for
  ``release`` after setting ``holding``: something happens at a moment the test picks),
  ``slow_when`` (applied, its answer late: a slow server).
"""

from __future__ import annotations

import http.server
import json
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

from balsam.client.rest import RESTClient


def ids_of(body: Optional[bytes]) -> list[int]:
    return [u["id"] for u in json.loads(body or b"[]")]


class FailureProxy:
    """A proxy to ``upstream``. Each ``PATCH /jobs/`` takes the next of ``plan``: ``("429", header)``
    answers 429 with that ``Retry-After`` without forwarding; ``("503", header)`` forwards (the
    server applies it) and answers 503 with that ``Retry-After`` instead of the server's answer;
    once ``plan`` is empty (or ``always`` is set, which is answered every time) it forwards.
    ``("drop", ...)`` forwards and then closes the connection without an answer (applied, the
    answer lost). ``patches`` records (wall time of arrival, or of a held answer; ids in the body;
    Idempotency-Key; status answered, 0 for none; Retry-After answered or None)."""

    def __init__(self, upstream: str) -> None:
        self.plan: list[tuple[str, Callable[[], str]]] = []
        self.always: Optional[tuple[str, Callable[[], str]]] = None
        self.patches: list[tuple[float, list[int], Optional[str], int, Optional[str]]] = []
        #: While set, a planned answer waits for ``release`` after setting ``holding``: the test
        #: queues more updates while the updater waits for that answer, not racing the retry.
        self.hold = False
        self.holding = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        #: A ``PATCH /jobs/`` naming one of these jobs is answered 500 (no Retry-After: a server
        #: fault of that job's data), ``fail_left`` times; forwarded first (applied, its answer a
        #: 500: a commit then a failure) when ``fail_forward``, else not (rolled back).
        self.fail_ids: set[int] = set()
        self.fail_left = 0
        self.fail_forward = False
        #: A ``PATCH /jobs/`` whose body (the list of updates) this says yes to is answered 500 as
        #: ``fail_ids``' are (not forwarded), every time.
        self.fail_when: Optional[Callable[[list[dict[str, Any]]], bool]] = None
        #: A ``PATCH /jobs/`` naming one of these jobs (and not answered 500) waits for ``release``
        #: after setting ``holding`` before it is forwarded: a call that goes through at a moment
        #: the test picks.
        self.hold_ids: set[int] = set()
        #: ``{job id: n}``: the next ``n`` calls naming that job are answered 500 as ``fail_ids``'
        #: are (a transient fault of a call).
        self.flaky: dict[int, int] = {}
        #: ``slow_when(updates)``: seconds a ``PATCH /jobs/`` with this body waits after the server
        #: applied it before its answer goes back (0: none): a slow server, or an answer that comes
        #: at a moment the test picks.
        self.slow_when: Optional[Callable[[list[dict[str, Any]]], float]] = None
        #: Per-request rules of :meth:`lose_next`: [method, path regex, times left, mode].
        self.rules: list[list[Any]] = []
        #: Every request: (method, path, upstream status (0: not forwarded), mode of the rule applied).
        self.log: list[tuple[str, str, int, Optional[str]]] = []
        self.keys: list[Optional[str]] = []
        self.upstream = httpx.Client(base_url=upstream, timeout=60)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, status: int, content: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def _drop(self) -> None:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

            def _note(self, status: int, mode: Optional[str]) -> None:
                with outer.lock:
                    outer.log.append((self.command, self.path, status, mode))
                    outer.keys.append(self.headers.get("Idempotency-Key"))

            def _forward(self) -> None:
                arrived = time.time()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
                key = self.headers.get("Idempotency-Key")
                if not (self.command == "PATCH" and re.fullmatch(r"/jobs/?", self.path)):
                    self._plain(body, headers)
                    return
                updates = json.loads(body or b"[]")
                ids = [u["id"] for u in updates]
                step = None
                with outer.lock:
                    failing = (outer.fail_left > 0 and bool(outer.fail_ids & set(ids))) or bool(
                        outer.fail_when is not None and outer.fail_when(updates))
                    flaky = [i for i in ids if outer.flaky.get(i, 0) > 0]
                    if failing:
                        if outer.fail_left > 0 and outer.fail_ids & set(ids):
                            outer.fail_left -= 1
                    elif flaky:
                        failing = True
                        outer.flaky[flaky[0]] -= 1
                    else:
                        step = outer.always or (outer.plan.pop(0) if outer.plan else None)
                if failing:
                    if outer.fail_forward:
                        outer.upstream.request(self.command, self.path, content=body, headers=headers)
                    content = b'{"detail": "Internal server error (ArgumentError); see the server log"}'
                    if outer.hold:
                        outer.holding.set()
                        outer.release.wait(60)
                    with outer.lock:
                        outer.patches.append((arrived, ids, key, 500, None))
                    self._note(0, "500")
                    self._answer(500, content, {"Content-Type": "application/json"})
                    return
                if outer.hold_ids and outer.hold_ids & set(ids):
                    outer.holding.set()
                    outer.release.wait(60)
                if step is None and self._by_rule(body, headers, ids, arrived):
                    return
                if step is not None and step[0] == "drop":
                    outer.upstream.request(self.command, self.path, content=body, headers=headers)
                    with outer.lock:
                        outer.patches.append((arrived, ids, key, 0, None))
                    self._note(0, "drop")
                    self._drop()
                    return
                if step is not None and step[0] == "429":
                    status, content = 429, b'{"detail": "Too many requests"}'
                else:
                    answer = outer.upstream.request(self.command, self.path, content=body, headers=headers)
                    status, content = answer.status_code, answer.content
                    late = outer.slow_when(updates) if outer.slow_when is not None else 0
                    if late > 0:
                        time.sleep(late)
                    if step is not None:  # applied upstream; its answer replaced
                        status, content = 503, b'{"detail": "The database is unavailable; retry shortly"}'
                if step is not None and outer.hold:
                    outer.holding.set()
                    outer.release.wait(60)
                    arrived = time.time()  # the answer's time: the client's wait starts after it
                answer_headers = {"Content-Type": "application/json"}
                if step is not None:
                    answer_headers["Retry-After"] = step[1]()
                with outer.lock:
                    outer.patches.append((arrived, ids, key, status, answer_headers.get("Retry-After")))
                self._note(status, step[0] if step is not None else None)
                self._answer(status, content, answer_headers)

            def _rule(self) -> Optional[str]:
                with outer.lock:
                    for rule in outer.rules:
                        if rule[0] == self.command and re.search(rule[1], self.path) and rule[2] > 0:
                            rule[2] -= 1
                            return rule[3]
                return None

            def _by_rule(self, body: Optional[bytes], headers: dict[str, str], ids: list[int], arrived: float) -> bool:
                """A ``PATCH /jobs/`` a :meth:`lose_next` rule takes: forwarded, its answer lost."""
                with outer.lock:
                    taken = any(rule[0] == self.command and re.search(rule[1], self.path) and rule[2] > 0
                                for rule in outer.rules)
                if not taken:
                    return False
                self._plain(body, headers, ids, arrived)
                return True

            def _plain(self, body: Optional[bytes], headers: dict[str, str], ids: Optional[list[int]] = None,
                       arrived: float = 0.0) -> None:
                """Forward; then answer as the server did, unless a :meth:`lose_next` rule says otherwise."""
                answer = outer.upstream.request(self.command, self.path, content=body, headers=headers)
                mode = self._rule()
                self._note(answer.status_code, mode)
                if ids is not None:
                    with outer.lock:
                        outer.patches.append((arrived, ids, self.headers.get("Idempotency-Key"),
                                              0 if mode == "drop" else 502 if mode == "502" else answer.status_code, None))
                if mode == "drop":  # applied upstream; the client never hears of it
                    self._drop()
                    return
                if mode == "502":
                    self._answer(502, b"bad gateway", {})
                    return
                passed = {name: value for name, value in answer.headers.items()
                          if name.lower() in ("content-type", "preference-applied", "retry-after")}
                self._answer(answer.status_code, answer.content, passed)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
                pass  # a connection the test's client dropped: not the test's concern

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def lose_next(self, method: str, path_regex: str, mode: str = "drop") -> None:
        """The next ``method`` request whose path matches is forwarded, then its answer lost
        (``"drop"``: the connection closed) or replaced by a 502 (``"502"``)."""
        with self.lock:
            self.rules.append([method, path_regex, 1, mode])

    def requests(self, method: str, path_regex: str) -> list[tuple[str, str, int, Optional[str]]]:
        return [entry for entry in self.log if entry[0] == method and re.search(path_regex, entry[1])]

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.upstream.close()


# -- what the tests of the status updater share besides the proxy ----------------------------------
def wait_until(condition: Callable[[], bool], timeout: float = 30) -> bool:
    """True once ``condition()`` holds, False after ``timeout`` seconds without."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def job_maker(env: Any, tmp_path: Path, prefix: str) -> Callable[..., list[int]]:
    """``make(n, state="PREPROCESSED")``: ids of ``n`` new jobs of the test user in ``state``, made
    in bulk straight on the server (not through the proxy), under a new site and app."""
    from balsam.api import ApplicationDefinition, Site

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    site = Site.objects.create(name=name, path=str(tmp_path / name))
    app = type(f"{prefix.title()}App", (ApplicationDefinition,), {"site": site.name, "command_template": "echo hi"})
    app.sync()
    client = RESTClient(env.url, env.token)

    def make(n: int, state: str = "PREPROCESSED") -> list[int]:
        made = client.Job.objects.bulk_create(
            [client.Job(workdir=f"{prefix}/{uuid.uuid4().hex[:8]}", app_id=app.__app_id__) for _ in range(n)])
        for job in made:
            job.state = state
        client.Job.objects.bulk_update(made)
        return [job.id for job in made]

    return make


def job_moves(env: Any, job_id: int) -> list[tuple[str, str]]:
    """The job's state changes on the server, in order: (from, to) names."""
    client = RESTClient(env.url, env.token)
    return [(str(e.from_state).rsplit(".", 1)[-1], str(e.to_state).rsplit(".", 1)[-1])
            for e in client.EventLog.objects.filter(job_id=job_id)]


def record_requests(monkeypatch: Any) -> list[tuple[str, str]]:
    """Every request the API client sends from now on, as (method, path), appended to the list returned."""
    sent: list[tuple[str, str]] = []
    real = RESTClient._send

    def counting(self: Any, method: str, path: str, **kwargs: Any) -> Any:
        sent.append((method, path))
        return real(self, method, path, **kwargs)

    monkeypatch.setattr(RESTClient, "_send", counting)
    return sent
