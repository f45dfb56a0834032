"""A reverse proxy that loses answers *after* the server applied the request (for the drills).

``LossyProxy(upstream_url, fault)`` listens on a free loopback port (``.url``). Every request is
forwarded to the server unchanged and the server's answer is read in full; then
``fault(method, path, count)`` (``count``: how many requests with that method and path came before)
decides what the client gets: ``None`` the answer, ``"drop"`` a closed connection and no answer,
``"502"`` / ``"504"`` a gateway error. ``.faults`` counts what was done.
"""

from __future__ import annotations

import collections
import http.server
import socket
import threading
from typing import Callable, Optional

import httpx

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


class LossyProxy:
    def __init__(self, upstream: str, fault: Callable[[str, str, int], Optional[str]]) -> None:
        self.upstream = upstream.rstrip("/")
        self.fault = fault
        self.seen: collections.Counter = collections.Counter()
        self.faults: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                path_only = self.path.split("?", 1)[0]
                with proxy._lock:
                    count = proxy.seen[(self.command, path_only)]
                    proxy.seen[(self.command, path_only)] += 1
                with httpx.Client(timeout=120) as client:
                    answer = client.request(self.command, proxy.upstream + self.path, headers=headers, content=body)
                action = proxy.fault(self.command, path_only, count)
                if action is not None:
                    with proxy._lock:
                        proxy.faults[action] += 1
                if action == "drop":
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if action in ("502", "504"):
                    payload = b'{"detail": "bad gateway (test proxy)"}'
                    self.send_response(int(action))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-encoding":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="lossy-proxy", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "LossyProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
