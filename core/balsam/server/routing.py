"""Glue between Starlette and the synchronous handlers (which run in the thread pool)."""

from __future__ import annotations

from typing import Any, Callable

import orjson
import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .auth import AuthUser
from .db import read_tx, write_tx
from .errors import ValidationFailed
from .http import QueryParams, current_user, path_int, reject_nul
from .idempotency import IdempotentRequest


class Ctx:
    """What a handler needs: the request, its raw body, the authenticated user and the database."""

    def __init__(self, request: Request, body: "bytes | None") -> None:
        self.request = request
        self.body = body
        self._user: "AuthUser | None" = None
        self._idempotency: "IdempotentRequest | None" = None
        self.settings = request.app.state.settings
        self.engine: sa.Engine = request.app.state.engine

    @property
    def user(self) -> AuthUser:
        if self._user is None:
            self._user = current_user(self.request)
        return self._user

    @property
    def idempotency(self) -> IdempotentRequest:
        """The request's ``Idempotency-Key`` (creating routes claim and record it)."""
        if self._idempotency is None:
            self._idempotency = IdempotentRequest(self)
        return self._idempotency

    def json(self) -> Any:
        if not self.body:
            raise ValidationFailed.field(["body"], "request body is empty; expected JSON")
        try:
            data = orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise ValidationFailed.field(["body"], f"malformed JSON: {exc}") from None
        if b"\\u0000" in self.body:
            reject_nul(data, ["body"])
        return data

    def query(self, allowed: "set[str] | None" = None) -> QueryParams:
        return QueryParams(self.request, allowed)

    def path_int(self, name: str) -> int:
        return path_int(self.request, name)

    def write(self):
        return write_tx(self.engine)

    def read(self):
        return read_tx(self.engine)


Handler = Callable[[Ctx], Response]


def route(path: str, methods: dict[str, Handler]) -> Route:
    async def endpoint(request: Request) -> Response:
        handler = methods[request.method if request.method != "HEAD" else "GET"]
        body = await request.body() if request.method in ("POST", "PUT", "PATCH") else None
        return await run_in_threadpool(handler, Ctx(request, body))

    endpoint.__name__ = path.strip("/").replace("/", "_").replace("{", "").replace("}", "") or "root"
    return Route(path, endpoint, methods=list(methods))
