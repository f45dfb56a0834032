"""``Model.objects``: entry point of queries and bulk operations."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Optional, Sequence, TypeVar

from balsam.models import MAX_ITEMS_PER_BULK_OP

from .query import Query

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
    #: what a positional argument of ``get()`` looks up (``Site.objects.get("name")``)
    positional_lookup: Optional[str] = None

    def __init__(self, model: type[T]) -> None:
        self._model = model

    def __repr__(self) -> str:
        return f"<{self._model.__name__}.objects>"

    @property
    def _client(self) -> Any:
        return self._model._get_client()

    # ------------------------------------------------------------------ queries
    def all(self) -> Query[T]:
        return Query(self)

    def filter(self, **kwargs: Any) -> Query[T]:
        return Query(self).filter(**kwargs)

    def get(self, *args: Any, **kwargs: Any) -> T:
        if args:
            if len(args) > 1 or self.positional_lookup is None:
                raise TypeError(f"{self._model.__name__}.objects.get() takes keyword filters only")
            key = "id" if isinstance(args[0], int) else self.positional_lookup
            kwargs[key] = args[0]
        return Query(self).get(**kwargs)

    def count(self) -> int:
        return Query(self).count()

    def first(self) -> Optional[T]:
        return Query(self).first()

    def order_by(self, field: Optional[str]) -> Query[T]:
        return Query(self).order_by(field)

    # ------------------------------------------------------------------ writes
    def create(self, **kwargs: Any) -> T:
        obj = self._model(**kwargs)
        obj.save()
        return obj

    def bulk_create(self, objs: Sequence[T], progress: ProgressFn = None) -> list[T]:
        """Create many records; returns them. (Only Job has a bulk route: see JobManager.)"""
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

    def _update_many(self, rows: list[dict[str, Any]], progress: ProgressFn = None) -> int:
        model = self._model
        client = self._client
        done = 0
        if self.has_bulk_patch:
            for chunk in chunks(rows, self.bulk_chunk_size):
                client.patch(model._path, json=list(chunk))
                done += len(chunk)
                if progress:
                    progress(done, len(rows))
            return done
        for row in rows:
            row = dict(row)
            rid = row.pop("id")
            client.put(f"{model._path}{rid}", json=row)
            done += 1
            if progress:
                progress(done, len(rows))
        return done

    def _delete_query(self, query: Query[T]) -> Optional[int]:
        model = self._model
        if not model._deletable:
            raise AttributeError(f"{model.__name__} records cannot be deleted")
        client = self._client
        ids = query._ids()
        for rid in ids:
            client.delete(f"{model._path}{rid}")
        return len(ids)
