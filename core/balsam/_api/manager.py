"""``Model.objects``: entry point of queries and bulk operations."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Optional, Sequence, TypeVar

from balsam.client.rest import APIError, AuthenticationError, _detail_text
from balsam.models import MAX_ITEMS_PER_BULK_OP

from .query import Query, missing_attribute

if TYPE_CHECKING:  # pragma: no cover
    from .model import BalsamModel

T = TypeVar("T", bound="BalsamModel")
logger = logging.getLogger(__name__)

#: ``progress(done, total)`` callbacks report bulk operations (the CLI draws a progress bar)
ProgressFn = Optional[Callable[[int, int], None]]


def chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Manager(Generic[T]):
    #: records per bulk POST/PATCH (the server's limit)
    bulk_chunk_size: int = MAX_ITEMS_PER_BULK_OP
    #: the list route accepts PATCH with ``[{id, ...changed fields}, ...]``
    has_bulk_patch: bool = False
    #: the list route accepts PUT with filters in the query string and the change as the body
    #: (``PUT /jobs/?tags=...``): ``query.update()`` is then one request
    has_query_update: bool = False

    def __init__(self, model: type[T]) -> None:
        self._model = model

    def __repr__(self) -> str:
        return f"<{self._model.__name__}.objects>"

    if not TYPE_CHECKING:  # a type checker would take any attribute of a manager (py.typed): its errors stay
        def __getattr__(self, name: str) -> Any:
            return missing_attribute(self, name, "{}.objects")

    @property
    def _client(self) -> Any:
        return self._model._get_client()

    # ------------------------------------------------------------------ queries
    def all(self) -> Query[T]:
        return Query(self)

    def filter(self, *args: Any, **kwargs: Any) -> Query[T]:
        """Positional filters are taken in the model's Balsam 0.7 order (see ``Model._positional``)."""
        return Query(self).filter(*args, **kwargs)

    def get(self, *args: Any, **kwargs: Any) -> T:
        """Positional filters are taken in the model's Balsam 0.7 order (see ``Model._positional``)."""
        return Query(self).get(*args, **kwargs)

    def count(self) -> int:
        return Query(self).count()

    def first(self) -> Optional[T]:
        return Query(self).first()

    def order_by(self, field: Optional[str], *more: str) -> Query[T]:
        return Query(self).order_by(field, *more)

    # ------------------------------------------------------------------ writes
    def create(self, *args: Any, **kwargs: Any) -> T:
        """Build and save a record. Positional fields are those the model's constructor takes
        positionally (``_create_positional``: Balsam 0.7's order, ``Job.objects.create(workdir,
        app_id, ...)``); they are bound here so that an error names this call."""
        model = self._model
        if not model._creatable:  # before the positionals: their error would hide this one
            raise TypeError(f"{model.__name__} records are created by the server, not by the API")
        if args:
            kwargs = model._positional_fields(args, kwargs, f"{model.__name__}.objects.create()")
        obj = model(**kwargs)
        obj.save()
        return obj

    def bulk_create(self, objs: Iterable[T], progress: ProgressFn = None) -> list[T]:
        """Create many records; returns them. (Only Job has a bulk route: see JobManager.)"""
        objs = list(objs)  # an iterator too: its length is reported to ``progress``
        created = []
        for i, obj in enumerate(objs):
            if obj._stored:
                raise ValueError(f"{self._model.__name__}(id={obj.id}) is already created")  # type: ignore[attr-defined]
            obj.save()
            created.append(obj)
            if progress:
                progress(i + 1, len(objs))
        return created

    def bulk_update(self, objs: Sequence[T], progress: ProgressFn = None) -> int:
        """Send the changed fields of each object (one PATCH per chunk where the route exists).

        Returns the number of records sent; unchanged objects are skipped.
        """
        rows, sent = [], []
        for obj in objs:
            if not obj._stored:
                raise ValueError(f"bulk_update() needs stored records; this {self._model.__name__} was never saved")
            payload = obj._update_payload()
            if payload:
                rows.append(dict(payload, id=obj.id))  # type: ignore[attr-defined]
                sent.append(obj)
        if not rows:
            return 0
        count = self._update_many(rows, progress=progress)
        for obj in sent:
            obj._mark_clean()
        return count

    def _update_many(self, rows: list[dict[str, Any]], progress: ProgressFn = None, skip_missing: bool = False) -> int:
        """Send ``rows`` (``{id, ...fields}``); returns the number of records updated.

        ``skip_missing`` (``query.update()``: the ids were read just before): a record deleted
        meanwhile is left out (its chunk sent again without it) instead of failing the update,
        as 0.7's update by ids did; the count is then of the records actually updated."""
        model = self._model
        client = self._client
        done = updated = 0
        if self.has_bulk_patch:
            for chunk in chunks(rows, self.bulk_chunk_size):
                try:
                    updated += self._patch_chunk(list(chunk), skip_missing)
                except APIError as exc:
                    if not done:
                        raise
                    # Each chunk is its own transaction: the server's "nothing was updated" is
                    # about this one only.
                    text = _detail_text(exc.detail).replace(", nothing was updated", "")
                    error = type(exc)(exc.method, exc.url, exc.status_code,
                                      f"{updated} of {len(rows)} {model.__name__} records were updated before this "
                                      f"error (the rest were not): {text}", exc.refused_ids)
                    if isinstance(exc, AuthenticationError):
                        # Set on the instance when the server refused the credential for good (a
                        # launcher's status updater stops on it).
                        error.credential_refused = exc.credential_refused
                    raise error from exc
                done += len(chunk)
                if progress:
                    progress(done, len(rows))
            return updated
        for row in rows:
            row = dict(row)
            rid = row.pop("id")
            try:
                client.put(f"{model._path}{rid}", json=row)
                updated += 1
            except APIError as exc:
                if not (skip_missing and exc.status_code == 404):
                    raise
            done += 1
            if progress:
                progress(done, len(rows))
        return updated

    def _patch_chunk(self, chunk: list[dict[str, Any]], skip_missing: bool) -> int:
        """One bulk PATCH (again without the records the server says are gone, with ``skip_missing``)."""
        client = self._client
        while chunk:
            try:
                client.patch(self._model._path, json=chunk)
            except APIError as exc:
                gone = exc.refused_ids if skip_missing and exc.status_code == 404 else None
                left = [row for row in chunk if row["id"] not in gone] if gone else chunk
                if len(left) == len(chunk):
                    raise
                chunk = left
                continue
            return len(chunk)  # applied all or nothing
        return 0

    def _update_query(self, query: Query[T], payload: dict[str, Any]) -> Optional[int]:
        """``query.update()`` as one ``PUT <list route>?<filters>`` where the route exists and the
        query is its filters alone (no slice, no list filter split over requests); returns the
        number updated, or None where the ids must be read and sent (the route also refuses a
        query matching more records than one request may update: 400)."""
        if not self.has_query_update or query._sliced or len(query._chunked_params()) > 1:
            return None
        try:
            result = self._client.put(self._model._path, params=query._params, json=payload)
        except APIError as exc:
            if exc.status_code == 400:  # more matches than one request may update: by ids, in chunks
                return None
            raise
        # Applied: never sent again by ids. The server answers the count (0.7's: the records).
        if isinstance(result, list):
            return len(result)
        return result if isinstance(result, int) and not isinstance(result, bool) else 0

    def _delete_query(self, query: Query[T]) -> Optional[int]:
        model = self._model
        if not model._deletable:
            raise AttributeError(f"{model.__name__} records cannot be deleted")
        client = self._client
        ids = query._ids()
        for rid in ids:
            client.delete(f"{model._path}{rid}")
        return len(ids)
