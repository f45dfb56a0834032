"""Small helpers the agent and its modules share for talking to the REST API.

Everything goes through the ``balsam.client.RESTClient`` of the site owner (``get/post/put/patch/delete``
returning parsed JSON). Lists are paged with ``limit`` and ``id__gt`` or ``offset``; bulk writes are chunked at
``MAX_ITEMS_PER_BULK_OP`` so one call never carries more than the server accepts.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

from .._api.query import KEYSET_PATHS, read_pages
from ..models import MAX_ITEMS_PER_BULK_OP, MAX_PAGE_SIZE

logger = logging.getLogger(__name__)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso_now() -> str:
    return utcnow().isoformat()


def load_site_client(site_config: Any = None) -> Any:
    """The REST client a site process uses: the SiteConfig's own client when it has one, else the stored login."""
    client = getattr(site_config, "client", None) if site_config is not None else None
    if client is not None and not callable(client):
        return _unattended(client)
    if callable(client):
        return _unattended(client())
    from ..client import ClientSettingsError, load_client

    try:
        return _unattended(load_client())
    except ClientSettingsError as exc:  # a bad login or $BALSAM_CLIENT_CONNECT_WAIT_SEC: in the log too
        logging.getLogger("balsam.site.agent").error("cannot make the API client: %s", exc)
        raise


def _unattended(client: Any) -> Any:
    """An agent rides out a server restart: no interactive session's connect wait (see
    RESTClient.unattended), unless $BALSAM_CLIENT_CONNECT_WAIT_SEC asks for a wait."""
    unattended = getattr(client, "unattended", None)
    return unattended() if callable(unattended) else client


def is_api_outage(exc: BaseException) -> bool:
    """True for errors that mean "the API is unreachable or overloaded": retry later, don't give up."""
    # httpx is imported only by clients of remote servers: if it is not loaded, no error is its.
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    status = getattr(exc, "status_code", None) or getattr(exc, "status", None)
    if isinstance(status, int) and (status >= 500 or status == 429):
        return True
    name = type(exc).__name__.lower()
    return any(word in name for word in ("connection", "timeout", "unavailable", "outage"))


def results(payload: Any) -> list[dict]:
    """The rows of a list response (``{"count", "results"}``) or a bare list."""
    if isinstance(payload, Mapping):
        return list(payload.get("results", []))
    return list(payload or [])


def list_all(client: Any, path: str, params: Optional[Mapping[str, Any]] = None, *, limit: Optional[int] = None) -> list[dict]:
    """GET every row of a list route, following pagination (one request per page).

    The jobs, batch-jobs and transfers lists in id order (their default) read the pages after the
    first by id (``id__gt``, balsam._api.query.read_pages): a record that leaves the filter while
    they are read (a job leaving ``state``, a transfer submitted) hides no other one, as an offset
    would. Other lists and orderings, and servers without ``id__gt``, page by offset."""
    params = dict(params or {})
    by_id = path in KEYSET_PATHS and params.get("ordering", "id") == "id"
    rows: list[dict] = []
    for page in read_pages(page_fetcher(client, path), params, page_size=MAX_PAGE_SIZE, by_id=by_id, limit=limit,
                           client=client):
        rows.extend(page.rows)
    return rows


def page_fetcher(client: Any, path: str) -> Callable[[dict[str, Any]], tuple[int, list[dict]]]:
    """The ``fetch`` of balsam._api.query.read_pages for ``path``: one GET, its (count, rows)."""

    def fetch(page_params: dict[str, Any]) -> tuple[int, list[dict]]:
        payload = client.get(path, params=page_params)
        rows = results(payload)
        total = payload.get("count") if isinstance(payload, Mapping) else None
        # Without a count (a bare list) the page is the whole listing.
        return (len(rows) if total is None else int(total)), rows

    return fetch


def count(client: Any, path: str, params: Optional[Mapping[str, Any]] = None) -> int:
    payload = client.get(path, params={**dict(params or {}), "limit": 0, "offset": 0})
    if isinstance(payload, Mapping) and "count" in payload:
        return int(payload["count"])
    return len(results(payload))


def chunks(items: Sequence[Any], size: int = MAX_ITEMS_PER_BULK_OP) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def bulk_patch(client: Any, path: str, updates: Iterable[Mapping[str, Any]]) -> list[tuple[Mapping[str, Any], BaseException]]:
    """PATCH a list of ``{"id": ..., field: value}`` in chunks; each chunk names a record at most once.

    A chunk the server refuses as a whole (a bad value in one record: 4xx) is split until the refused
    records are isolated, so one bad record never blocks the others. Returns the refused updates
    with the server's error; outages (connection errors, 5xx) raise.
    """
    from ..client.status_updater import isolate_refused

    pending = list(updates)
    refused: list[tuple[Mapping[str, Any], BaseException]] = []
    while pending:
        seen: set[int] = set()
        this_round: list[Mapping[str, Any]] = []
        later: list[Mapping[str, Any]] = []
        for update in pending:
            if update["id"] in seen:
                later.append(update)
            else:
                seen.add(update["id"])
                this_round.append(update)
        for chunk in chunks(this_round):
            refused.extend(isolate_refused(lambda part: client.patch(path, json=list(part)), list(chunk)))
        pending = later
    for update, error in refused:
        logger.error("PATCH %s: the server refused the update of record %s: %s", path, update.get("id"), error)
    return refused
