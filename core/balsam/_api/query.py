"""Lazy, chainable queries: ``Job.objects.filter(tags={"x": "y"}).order_by("-id")[10:20]``.

Nothing is fetched until the query is iterated, indexed, counted or ``len()``-ed; results are
cached afterwards. Pagination is transparent (pages of ``page_size``); list filters longer than
``filter_chunk_size`` values are split into several requests and stitched back together, except
key/value filters (``tags``), which all apply together: more than ``MAX_TAG_FILTERS`` distinct
pairs are refused (ValueError) before any request.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from collections.abc import Iterable, Mapping, Set
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterator, NamedTuple, Optional, TypeVar

import orjson

from balsam.client.rest import collect_skipped_running, skipped_running_message
from balsam.client.status_updater import refused_as_unknown
from balsam.util import paused_gc
from balsam.models import ID_AFTER, MAX_ITEMS_PER_BULK_OP, MAX_PAGE_SIZE, MAX_TAG_FILTERS

from . import codec
from .model import Row, to_aware_utc

if TYPE_CHECKING:  # pragma: no cover
    from .manager import Manager
    from .model import BalsamModel

T = TypeVar("T", bound="BalsamModel")

logger = logging.getLogger(__name__)


def encode_filter_value(value: Any) -> Any:
    """One query-string value: enums by value, datetimes as UTC ISO-8601, bools as true/false."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return to_aware_utc(value).isoformat()
    if isinstance(value, dt.date):
        # A day is local, as a naive datetime is: sent as its text, the server read UTC midnight
        # (``last_update_after=date.today()`` began at 18:00 the day before in Chicago). Its first
        # instant by timestamp(): where daylight saving starts at midnight (Cairo, Santiago) local
        # midnight does not exist, and astimezone() put it an hour before the day began.
        first = dt.datetime.combine(value, dt.time()).timestamp()
        return dt.datetime.fromtimestamp(first, dt.timezone.utc).isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, type) and hasattr(value, "__app_id__"):
        return codec.app_id_of(value)
    if hasattr(value, "_record") and hasattr(value, "id"):
        return value.id  # a model object stands for its id (site_id=site)
    return value


def _filter_items(value: Any) -> Optional[list[Any]]:
    """The values of a list filter, or None for a single value. Any iterable is a list, as in
    Balsam 0.7 (``filter(id=tasks.keys())``, a generator, ``range``, a numpy array), read once;
    text, paths and enum members are single values."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    if isinstance(value, (str, bytes, bytearray, PurePath, enum.Enum, Mapping)) or not isinstance(value, Iterable):
        return None
    try:
        return list(value)
    except TypeError:  # iterable by its type only (a 0-d numpy array): one value
        return None


def check_key_value_keys(model: str, method: str, key: str, pairs: Mapping[Any, Any]) -> None:
    """Refuse a key/value filter (``tags={...}``) whose key holds ':'. The API's filter is
    ``KEY:VALUE`` split at the first ':', so ``{"a:b": "c"}`` was read as ``a`` = ``"b:c"``:
    ``Job.objects.filter(tags={"a:b": "c"})`` returned (and its ``delete()`` deleted) the jobs tagged
    ``{"a": "b:c"}``, never those tagged ``{"a:b": "c"}``. Such a key can still be saved on a
    record (as in Balsam 0.7); those records are selected by id."""
    for k, v in pairs.items():
        if ":" in str(k):
            head, _, rest = str(k).partition(":")
            raise ValueError(f"{model}.objects.{method}(): {key} key {str(k)!r} holds ':', which a {key} filter cannot "
                             f"hold (the API reads '{k}:{v}' as {key} {head!r} = {rest + ':' + str(v)!r}); "
                             f"select these records by id")


def encode_filters(model: str, valid: frozenset[str], kwargs: dict[str, Any],
                   method: str = "filter") -> tuple[dict[str, Any], bool]:
    """Validate filter names and encode values. Returns (params, matches_nothing)."""
    params: dict[str, Any] = {}
    empty = False
    for key, value in kwargs.items():
        if key not in valid:
            raise TypeError(f"{model}.objects.filter() got an unknown filter {key!r} (filters: {', '.join(sorted(valid))})")
        if value is None:
            continue  # as in Balsam 0.7, a filter given as None is no filter
        if isinstance(value, Mapping):
            check_key_value_keys(model, method, key, value)
            value = [f"{k}:{v}" for k, v in value.items()]
            if not value:
                continue  # an empty tag dict matches everything
        items = _filter_items(value)
        if items is not None:
            values = [encode_filter_value(v) for v in items]
            if isinstance(value, Set):  # set, frozenset, dict.keys(): one query string for one set
                values = sorted(values, key=str)
            if not values:
                empty = True
            params[key] = values
        else:
            params[key] = encode_filter_value(value)
    return params, empty


#: Filters matching the records that hold every ``K:V`` given (tags): given again in a chain
#: (``filter(tags=a).filter(tags=b)``), both sets apply.
CONTAINMENT_FILTERS = frozenset({"tags", "data", "filter_tags"})


def check_key_value_count(model: str, method: str, key: str, value: Any) -> None:
    """Refuse more than :data:`MAX_TAG_FILTERS` distinct ``K:V`` pairs in a key/value filter
    (CONTAINMENT_FILTERS) before any request: the server refuses them (422), counting a pair given
    twice once, as here. They are never split over requests to fit: a record must hold every pair,
    and requests of part of them each would return the records holding any part (their union)."""
    pairs = value if isinstance(value, list) else [value]
    count = len({str(pair) for pair in pairs})
    if count > MAX_TAG_FILTERS:
        raise ValueError(f"{model}.objects.{method}(): at most {MAX_TAG_FILTERS} distinct {key} filters "
                         f"(key:value pairs, balsam.models.MAX_TAG_FILTERS), got {count}")


def _and_filter(model: str, method: str, key: str, old: Any, new: Any) -> tuple[Any, bool]:
    """A filter given again in a chain (``filter(id=a).filter(id=b)``), as both together (a query's
    filters all apply, as in Django): (the value, whether it matches nothing). Balsam 0.7 kept the
    last one only, so ``mine.filter(tags={"step": "3"}).delete()`` reached jobs outside ``mine``."""
    old_items = old if isinstance(old, list) else [old]
    new_items = new if isinstance(new, list) else [new]
    if not old_items or not new_items:
        return [], True  # an empty list filter matches nothing, whatever else applies
    if sorted(map(str, old_items)) == sorted(map(str, new_items)):
        return new, False
    if key in CONTAINMENT_FILTERS:
        return list(dict.fromkeys(old_items + new_items)), False
    if key == "id" or isinstance(old, list) or isinstance(new, list):
        # A list matches any of its values: narrowed (``filter(state=[A, B, C]).filter(state=C)``),
        # the values in both, compared encoded (1 and "1" are one id, as the server reads them).
        wanted = {str(v) for v in new_items}
        both = [v for v in old_items if str(v) in wanted]
        if both and not isinstance(new, list):
            return new, False  # one value: kept as given (a one-value filter, not a list)
        if both and not isinstance(old, list):
            return old, False
        return both, not both
    raise ValueError(f"{model}.objects.{method}(): filter {key!r} given again ({new!r:.80}; the query has {old!r:.80}): "
                     f"a query's filters all apply (Balsam 0.7 silently kept the last one): give each filter once")


def positional_filters(model: Any, method: str, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the positional ``args`` of ``get()``/``filter()`` added under their names: the
    order of the model's filters in Balsam 0.7 (``Job.objects.get(5)`` is ``get(id=5)``; App's first
    is ``site_id``), except that the first argument may name another filter by its type
    (``Site.objects.get(3)`` is ``id=3``, ``App.objects.get("Name")`` is ``name="Name"``)."""
    if not args:
        return kwargs
    order = model._positional
    name = model.__name__
    if len(args) > len(order):
        raise TypeError(f"{name}.objects.{method}() takes at most {len(order)} positional filter"
                        f"{'s' if len(order) != 1 else ''} ({len(args)} given), in this order: {', '.join(order)}")
    names = list(order[: len(args)])
    names[0] = model._first_positional(args[0]) or names[0]
    out = dict(kwargs)
    for key, value in zip(names, args):
        if key in out:
            raise TypeError(f"{name}.objects.{method}() got multiple values for filter {key!r} "
                            f"(positional filters are, in order: {', '.join(order)})")
        out[key] = value
    return out


#: Django query methods that Balsam queries do not have (nor had 0.7's), named in the
#: AttributeError with what to use instead (Python's own named the attribute only, and a user
#: coming from Django was left to guess that ``exclude(state=...)`` is ``filter(state__ne=...)``).
#: The hints depend on the model (see :func:`_query_method_hint`): only what works for it.
NOT_QUERY_METHODS = frozenset({"exclude", "exists", "values", "values_list", "last", "latest", "earliest", "limit",
                               "in_bulk", "distinct", "annotate", "aggregate"})


def _query_method_hint(model: Any, name: str) -> str:
    """What to use instead of the Django query method ``name`` on a query of ``model``: only what
    that model's queries take (Site has no ordering nor ``state__ne``: ``order_by('-id')`` and
    ``filter(state__ne=...)`` raise there)."""
    label = getattr(model, "__name__", "?")
    filters = getattr(model, "_filters", frozenset())
    orderings = getattr(model, "_orderings", frozenset())
    fields = list(getattr(model, "_fields", {}))
    var = label.lower()
    shown = [f for f in ("id", "state", "name", "timestamp") if f in fields][:2] or fields[:2]
    read = f"iterate the query and read the fields ({', '.join(f'{var}.{f}' for f in shown)})"
    unordered = f"{label} queries take no ordering: they come in id order"
    if name == "exclude":
        if "state__ne" in filters:
            return "use filter(state__ne=STATE) to leave out a state (the only negated filter)"
        return f"{label} queries have no negated filter: iterate the query and skip records in Python"
    if name == "exists":
        return "use bool(query) or query.count()"
    if name in ("values", "values_list"):
        return read
    if name == "last":
        default = getattr(model, "_default_order", "id")
        if default.startswith("-") and default[1:] in orderings:  # newest first (EventLog): last is oldest
            return f"use order_by('{default[1:]}').first() ({label} queries come {default[1:]} descending)"
        if "id" in orderings:
            return "use order_by('-id').first()"
        return f"use list(query)[-1] ({unordered})"
    if name in ("latest", "earliest"):
        if not orderings:
            if name == "latest":
                return f"use list(query)[-1] for the highest id ({unordered})"
            return f"use list(query)[0] for the lowest id ({unordered})"
        sign = "-" if name == "latest" else ""
        return f"use order_by('{sign}FIELD').first() (FIELD: {', '.join(sorted(orderings))})"
    if name == "limit":
        return "slice the query: query[:N]"
    if name == "in_bulk":
        return "use filter(id=[...]) (list filters match any of their values)"
    if name == "distinct":
        return "records are listed once each"
    analytics = " (balsam.analytics has reports of EventLog queries)" if label in ("Job", "EventLog") else ""
    return f"iterate the query and compute in Python{analytics}"


def not_a_query_method(obj: Any, owner: str, name: str) -> AttributeError:
    """The AttributeError of ``obj.name`` (a query or manager, ``owner`` in words, lacking ``name``):
    Python's, or for a Django query method (:data:`NOT_QUERY_METHODS`) one with a hint that fits
    the model of ``obj``."""
    if name not in NOT_QUERY_METHODS:
        return AttributeError(f"{type(obj).__name__!r} object has no attribute {name!r}")
    model = obj.__dict__.get("_model")
    # The methods this model's queries take (Site: no order_by; EventLog: no update, delete).
    takes = ["filter", "get"] + (["order_by"] if getattr(model, "_orderings", None) else []) + ["count", "first",
                                                                                             "slicing"]
    takes += (["update"] if getattr(model, "_updatable", False) else []) + (
        ["delete"] if getattr(model, "_deletable", False) else [])
    return AttributeError(f"{owner} has no {name}() (a Django query method; Balsam queries, as 0.7's, take "
                          f"{', '.join(takes)}): {_query_method_hint(model, name)}")


def _attribute_of_class(obj: Any, name: str) -> bool:
    """``name`` is defined on the class of ``obj`` (a property, a method): its AttributeError came
    from inside it (``_client`` when the client's set-up raised AttributeError), not from a
    missing name."""
    return any(name in vars(klass) for klass in type(obj).__mro__)


def missing_attribute(obj: Any, name: str, owner: str) -> Any:
    """``__getattr__`` of a query or manager (``owner`` in words, ``{}`` for the model's name), so
    only for names not found otherwise: a Django method's error says what to use instead."""
    if _attribute_of_class(obj, name):
        return object.__getattribute__(obj, name)  # again: its own AttributeError, not hidden
    model = obj.__dict__.get("_model")
    raise not_a_query_method(obj, owner.format(getattr(model, "__name__", "?")), name)


class NegativeIndexError(ValueError, AssertionError):
    """A negative index or slice bound on a query: not supported (the query's length is not known
    before it is read). A ValueError, and an AssertionError, which Balsam 0.7's check raised."""


class Query(Generic[T]):
    #: page size of list requests (the server's maximum)
    page_size: int = MAX_PAGE_SIZE
    #: list filters longer than this are split over several requests (URL length); key/value
    #: filters (``tags``) never are (see check_key_value_count)
    filter_chunk_size: int = 500
    #: ids per bulk PATCH in ``update()``
    bulk_chunk_size: int = MAX_ITEMS_PER_BULK_OP

    def __init__(self, manager: "Manager[T]") -> None:
        self._manager = manager
        self._model = manager._model
        self._params: dict[str, Any] = {}
        self._empty = False
        self._order: Optional[str] = None
        self._limit: Optional[int] = None
        self._offset: int = 0
        self._sliced = False
        self._cache: Optional[list[T]] = None
        self._count_cache: Optional[int] = None

    if not TYPE_CHECKING:  # a type checker would take any attribute of a query (py.typed): its errors stay
        def __getattr__(self, name: str) -> Any:
            return missing_attribute(self, name, "{} query")

    def _clone(self) -> "Query[T]":
        q = type(self)(self._manager)
        q._params = dict(self._params)
        q._empty = self._empty
        q._order = self._order
        q._limit = self._limit
        q._offset = self._offset
        q._sliced = self._sliced
        return q

    # ------------------------------------------------------------------ building
    def filter(self, *args: Any, **kwargs: Any) -> "Query[T]":
        return self._narrowed("filter", args, kwargs)

    def _narrowed(self, method: str, args: tuple, kwargs: dict[str, Any]) -> "Query[T]":
        """This query with ``method``'s filters (``filter()``, ``get()``) added: errors name it."""
        if self._sliced:
            raise AttributeError("cannot filter a query after slicing it")
        kwargs = positional_filters(self._model, method, args, kwargs)
        params, empty = encode_filters(self._model.__name__, self._model._filters, kwargs, method)
        q = self._clone()
        for key, value in params.items():
            if key in q._params:
                value, none_left = _and_filter(self._model.__name__, method, key, q._params[key], value)
                empty = empty or none_left
            q._params[key] = value
            if key in CONTAINMENT_FILTERS:  # counted with the pairs of the chain's earlier filters
                check_key_value_count(self._model.__name__, method, key, value)
        q._empty = q._empty or empty
        return q

    def order_by(self, field: Optional[str], *more: str) -> "Query[T]":
        if more:  # Django's order_by("state", "-id"): Python's "takes 2 positional arguments" said less
            raise TypeError(f"{self._model.__name__}.objects.order_by() takes one field name, got {1 + len(more)} "
                            f"({', '.join(map(repr, (field, *more)))}): the server orders by one field, ties by id")
        if self._sliced:
            raise AttributeError("cannot re-order a query after slicing it")
        if field is not None and not isinstance(field, str):
            raise TypeError(f"{self._model.__name__}.objects.order_by() takes one field name (a str, '-' for "
                            f"descending), got {type(field).__name__} {field!r:.80}")
        if field is not None and field.lstrip("-") not in self._model._orderings:
            if not self._model._orderings:  # Site, App...: the server lists them in id order only
                raise ValueError(f"{self._model.__name__} cannot be ordered by {field!r}: {self._model.__name__} "
                                 "queries take no ordering (they come in id order)")
            allowed = ", ".join(sorted(self._model._orderings))
            raise ValueError(f"{self._model.__name__} cannot be ordered by {field!r} (orderings: {allowed}, '-' for descending)")
        q = self._clone()
        q._order = field
        return q

    def __getitem__(self, k: "int | slice") -> Any:
        if isinstance(k, slice):
            if (k.start is not None and k.start < 0) or (k.stop is not None and k.stop < 0):
                raise NegativeIndexError("negative indexing is not supported on queries")
            if k.step not in (None, 1):
                # Balsam 0.7 gave a list: the rows of start:stop, every step-th (a negative step
                # walks them backwards, as a list does).
                if k.step == 0:
                    raise ValueError("slice step cannot be zero")
                if k.step > 0:
                    return list(self[k.start:k.stop])[::k.step]
                return list(self)[k]
            if self._cache is not None:
                return self._cache[k]
            q = self._clone()
            start = k.start or 0
            q._offset = self._offset + start
            if k.stop is not None:
                new_limit = max(0, k.stop - start)
                q._limit = new_limit if self._limit is None else max(0, min(new_limit, self._limit - start))
            elif self._limit is not None:
                q._limit = max(0, self._limit - start)
            q._sliced = True
            return q
        if not isinstance(k, int):
            raise TypeError("query indices must be integers or slices")
        if k < 0:
            raise NegativeIndexError("negative indexing is not supported on queries")
        if self._cache is not None:
            return self._cache[k]
        results = self[k : k + 1]._evaluate()
        if not results:
            raise IndexError("query index out of range")
        return results[0]

    def __setitem__(self, k: int, value: T) -> None:
        """``q[i] = obj``, as Balsam 0.7's Query: item ``i`` of this query's fetched records
        (fetched first if not yet) becomes ``obj``; iterating, indexing and ``len()`` of this
        query then see it. Nothing is sent to the server (``obj.save()`` or
        ``Manager.bulk_update`` sends changes); a new query fetches the stored records. As in
        0.7, the index is a list's (a negative one counts from the end; out of range:
        IndexError) and a slice is refused."""
        if not isinstance(k, int):
            raise TypeError(f"query item assignment takes an int index, not {type(k).__name__}")
        self._evaluate()[k] = value

    # ------------------------------------------------------------------ evaluation
    def _chunked_params(self) -> list[dict[str, Any]]:
        # Key/value filters are never split (all their pairs apply together: chunks would match the
        # records holding any chunk's pairs); there are at most MAX_TAG_FILTERS of them (_narrowed).
        long_keys = [k for k, v in self._params.items()
                     if isinstance(v, list) and len(v) > self.filter_chunk_size and k not in CONTAINMENT_FILTERS]
        if not long_keys:
            return [dict(self._params)]
        key = max(long_keys, key=lambda k: len(self._params[k]))
        values = self._params[key]
        chunks = [values[i : i + self.filter_chunk_size] for i in range(0, len(values), self.filter_chunk_size)]
        out = []
        for chunk in chunks:
            params = dict(self._params)
            params[key] = chunk
            out.append(params)
        # Only the longest list is split; any other long list is sent whole (correct, just a longer URL).
        return out

    def _get_pages(self, params: dict[str, Any], offset: int, limit: Optional[int]) -> tuple[int, list[Any]]:
        """(count, records): dicts, or Row objects where the server sent the page as columns."""
        total, records = 0, []
        for page in self._iter_pages(params, offset, limit):
            total = page.count
            records.extend(page.rows)
        return total, records

    def _iter_pages(self, params: dict[str, Any], offset: int, limit: Optional[int],
                    size: Optional[int] = None, after: Optional[int] = None) -> Iterator["Page"]:
        """The pages of one request each (``size`` records, by default ``page_size``), as
        :func:`read_pages` reads them: a listing in id order (the default of Job, BatchJob and
        TransferItem, or ``order_by("id")``) reads its pages after the first by id (keyset
        paging), so no record that stays is skipped when others leave the result. The first page
        starts at the query's offset (a slice's start), so a slice is read the same way, or, in id
        order, past the id ``after`` where it is given (the offset is then where a server without
        ``id__gt`` reads instead)."""
        client = self._model._get_client()
        if not self._model._paginated:
            count, rows = _unpack_list(client.get(self._model._path, params=params))
            end = None if limit is None else offset + limit
            yield Page(count, rows[offset:end], False, len(rows), None)
            return

        def fetch(page_params: dict[str, Any]) -> tuple[int, list[Any]]:
            if self._order:
                page_params["ordering"] = self._order
            # Job pages come as columns (the server's COLUMNS_MEDIA_TYPE); other lists, and servers
            # that do not have it, answer with objects.
            data, headers = client.request_with_headers("GET", self._model._path, params=page_params,
                                                        headers={"Accept": f"{COLUMNS_MEDIA_TYPE}, application/json"})
            if headers.get("content-type", "").startswith(COLUMNS_MEDIA_TYPE):
                return _unpack_columns(data)
            return _unpack_list(data)

        if offset > MAX_OFFSET:
            # Past what the list routes take (a 32-bit offset: 422), and past the end of any
            # listing a server holds: empty, as a list sliced past its end, once a count (one
            # limit=0 request) says so.
            count, _ = _unpack_list(client.get(self._model._path, params=dict(params, limit=0, offset=0)))
            if count > offset:
                raise ValueError(f"{self._model.__name__} query offset {offset} is beyond what the server pages "
                                 f"(at most {MAX_OFFSET}) and within its {count} records")
            yield Page(count, [], False, offset, None)
            return
        by_id = self._model._path in KEYSET_PATHS and (self._order or self._model._default_order) == "id"
        yield from read_pages(fetch, params, page_size=size or self.page_size, by_id=by_id, offset=offset,
                              limit=limit, after=after, client=client)

    def pages(self, size: Optional[int] = None, after: Optional[int] = None) -> Iterator[tuple[list[T], bool]]:
        """The query's records a request at a time (``size`` records, by default ``page_size``), as
        model objects, each page with whether more may follow: for listings too long to hold
        whole (``balsam job ls``). Read as iterating the query reads them (by id in id order). A
        list filter that is split over several requests (longer than ``filter_chunk_size``
        values) is read whole first, as one page. ``after`` (id-ordered Job, BatchJob and
        TransferItem queries): start past this id instead of at the slice's start, which is then
        where a server without ``id__gt`` reads (``balsam job ls -n``: see balsam.cli.newest_pages)."""
        if self._cache is not None or self._empty or self._limit == 0 or len(self._chunked_params()) > 1:
            records = self._evaluate()
            if records:
                yield records, False
            return
        for page in self._iter_pages(self._chunked_params()[0], self._offset, self._limit, size, after=after):
            with paused_gc():
                records = self._model._from_api_many(page.rows)
            yield records, page.more

    def _evaluate(self) -> list[T]:
        if self._cache is not None:
            return self._cache
        if self._empty or self._limit == 0:
            self._cache, self._count_cache = [], 0 if self._empty else self._count_cache
            return self._cache
        param_sets = self._chunked_params()
        if len(param_sets) == 1:
            total, rows = self._get_pages(param_sets[0], self._offset, self._limit)
            self._count_cache = total
        else:
            rows = []
            for params in param_sets:
                _, part = self._get_pages(params, 0, None)
                rows.extend(part)
            rows = self._sort_rows(rows)
            self._count_cache = len(rows)
            end = None if self._limit is None else self._offset + self._limit
            rows = rows[self._offset : end]
        with paused_gc():
            self._cache = self._model._from_api_many(rows)
        return self._cache

    def _sort_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Without an ordering, the model's default one: what the server gives one request (the
        # newest events first), so a list filter of 501 values reads in the same order as of 500.
        order = self._order or self._model._default_order
        key = order.lstrip("-")
        reverse = order.startswith("-")
        seen: dict[Any, dict[str, Any]] = {}
        for row in rows:
            seen[row.get("id")] = row
        rows = list(seen.values())

        fld = self._model._fields.get(key)
        # Datetimes compared as datetimes, not as the text of their JSON (whose forms may differ).
        as_value = (lambda v: fld.structure(self._model.__name__, v)) if fld is not None and fld.is_datetime else None

        def sort_key(row: dict[str, Any]) -> tuple:
            value = row.get(key)
            if value is not None and as_value is not None:
                value = as_value(value)
            return (value is None, value if value is not None else 0)

        # Ties broken by id as the server breaks them (ascending, or descending for a descending
        # order where the model says so): ids first, then a stable sort by the field.
        ids_descending = reverse and self._model._desc_ties_by_id_desc
        rows.sort(key=lambda row: row.get("id") or 0, reverse=ids_descending)
        return sorted(rows, key=sort_key, reverse=reverse)

    def __iter__(self) -> Iterator[T]:
        return iter(self._evaluate())

    def __len__(self) -> int:
        return len(self._evaluate())

    def __bool__(self) -> bool:
        return bool(self._evaluate())

    def __repr__(self) -> str:
        items = list(self[:21]) if self._cache is None else self._cache[:21]
        text = [repr(x) for x in items[:20]]
        if len(items) > 20:
            text.append("...(remaining elements truncated)...")
        return f"<Query [{', '.join(text)}]>"

    def count(self) -> int:
        """Number of records matching the filters (one request with ``limit=0`` unless already fetched).

        As in Balsam 0.7, a slice does not change it (``Job.objects.all()[:2].count()`` is the number
        of jobs; ``len()`` of the slice is at most 2)."""
        if self._empty:
            return 0
        if self._cache is not None and not self._sliced:
            return len(self._cache)
        if self._count_cache is not None:
            return self._count_cache  # the matches of the filters, from the request that filled the cache
        param_sets = self._chunked_params()
        if self._model._paginated and (len(param_sets) == 1 or self._disjoint_chunks(param_sets)):
            # One limit=0 request per chunk: a record matches one id at most, so the counts of
            # chunks of distinct ids add up (reading the records cost a download of every one).
            client = self._model._get_client()
            return sum(_unpack_list(client.get(self._model._path, params=dict(params, limit=0, offset=0)))[0]
                       for params in param_sets)
        return len(self._unsliced()._evaluate())

    def _disjoint_chunks(self, param_sets: list[dict[str, Any]]) -> bool:
        """Whether no record can match two of the chunks: the split list is ``id``'s, of distinct ids."""
        split = [k for k, v in param_sets[0].items() if v != self._params.get(k)]
        if split != ["id"]:
            return False
        ids = self._params["id"]
        return len({str(i) for i in ids}) == len(ids)  # as sent: 1 and "1" are the same id

    def _unsliced(self) -> "Query[T]":
        """A new query of the same filters and order, without this one's slice or cache."""
        q = self._clone()
        q._limit = None
        q._offset = 0
        q._sliced = False
        return q

    def first(self) -> Optional[T]:
        results = self[0:1]._evaluate() if self._cache is None else self._cache[:1]
        return results[0] if results else None

    def get(self, *args: Any, **kwargs: Any) -> T:
        kwargs = positional_filters(self._model, "get", args, kwargs)
        q = self._narrowed("get", (), kwargs) if kwargs else self  # unknown filter names raise here first
        if kwargs and all(value is None for value in kwargs.values()) and not q._params and not q._empty:
            # A filter given as None is no filter (as in 0.7): ``get(id=job_id)`` with job_id None
            # returned whichever record was the only one (a test site's one job), silently. Beside
            # real filters of the query (``filter(app_id=X).get(id=None)``) it is 0.7's answer.
            nones = ", ".join(f"{key}=None" for key in kwargs)
            raise ValueError(f"{self._model.__name__}.objects.get({nones}): a filter given as None is no filter, so "
                             f"this would return any one record: pass a value (or get() with no filter for that)")
        given = {key: value for key, value in kwargs.items() if value is not None}
        results = q[0:2]._evaluate() if q._cache is None else q._cache
        if not results:
            raise self._model.DoesNotExist(f"no {self._model.__name__} matches {_describe(given or q._params)}")
        if len(results) > 1:
            exact = q._exact_substring_match()
            if exact is not None:
                return exact
            n = q.count()
            raise self._model.MultipleObjectsReturned(
                f"{n} {self._model.__name__} records match {_describe(given or q._params)}; expected one"
            )
        return results[0]

    def _exact_substring_match(self) -> Optional[T]:
        """The one record of several matches whose field is exactly the value of a substring filter
        of this query (``_substring_filters``), or None. ``Site.objects.get(path=os.getcwd())`` at
        ``/proj/site`` also matched ``/proj/site2`` (the path filter is a substring, as in 0.7) and
        raised MultipleObjectsReturned for a path that names one site exactly. Reads every match
        (a user's sites: a few records)."""
        def plain(value: Any) -> str:  # "/proj/site/" is "/proj/site"
            return str(value).rstrip("/") or "/"

        wanted = {key: plain(self._params[key]) for key in self._model._substring_filters
                  if isinstance(self._params.get(key), str)}  # as sent (encode_filter_value: a Path as str)
        if not wanted:
            return None
        exact = [obj for obj in (self._cache if self._cache is not None else self._clone()._evaluate())
                 if all(plain(getattr(obj, self._model._substring_filters[key])) == value for key, value in wanted.items())]
        return exact[0] if len(exact) == 1 else None

    # ------------------------------------------------------------------ bulk writes
    def _ids(self) -> list[int]:
        """The ids of the records matching now: read again, never from this query's cache (a bulk
        write to an evaluated query must reach what its filters match, as Balsam 0.7's did)."""
        if self._empty:
            return []
        return [obj.id for obj in self._clone()._evaluate()]  # type: ignore[attr-defined]

    def _forget(self) -> None:
        """Drop the cached results after a bulk write (they no longer show the records)."""
        self._cache = None
        self._count_cache = None

    def update(self, **fields: Any) -> int:
        """Apply the same change to every record the query matches now; returns the number updated.

        A Job query of filters alone is one request, ``PUT /jobs/?<filters>`` (what they match when
        the server applies it; up to 5,000 jobs). Otherwise (a slice, a list filter split over
        requests, more matches, other models) the matching ids are read afresh (an evaluated
        query's cached rows are not what is updated), then sent as bulk PATCHes of up to
        ``bulk_chunk_size`` records (PUT per record for the models without a bulk route: Site,
        App); a record deleted meanwhile is skipped. The query's cache is dropped: iterating it
        again reads the updated records.
        """
        model = self._model
        if not model._updatable:
            raise AttributeError(f"{model.__name__} is read-only")
        payload = model._validate_update(fields)
        try:
            if self._empty:
                return 0
            # Job: one PUT /jobs/?<filters>, applied to what the filters match then (as 0.7's update).
            count = self._manager._update_query(self, payload)
            if count is not None:
                return count
            ids = self._ids()
            if not ids:
                return 0
            # A record deleted between reading the ids and the update is skipped, not an error.
            return self._manager._update_many([dict(payload, id=i) for i in ids], skip_missing=True)
        finally:
            self._forget()

    def delete(self, *, warn: bool = True) -> Optional[int]:
        """Delete every record the query matches now (Job: one bulk ``DELETE /jobs/?filters``);
        returns how many were deleted.

        The server leaves out the matching jobs RUNNING in a launcher (the user may not have meant
        to end those runs; other leased jobs are deleted): ``skipped_running`` is then set to
        ``(count, first ids)`` and, with ``warn``, one WARNING names them (``balsam job rm``
        prints it instead)."""
        self.skipped_running: Optional[tuple[int, list[int]]] = None
        try:
            with collect_skipped_running() as skipped:
                deleted = self._manager._delete_query(self)
        finally:
            self._forget()
        if skipped:
            self.skipped_running = (sum(n for n, _ in skipped), [i for _, ids in skipped for i in ids][:50])
            if warn:
                logger.warning("%s", skipped_running_message(*self.skipped_running))
        return deleted


#: The largest ``offset`` the list routes take (a 32-bit integer, as in balsam.server.openapi's
#: PAGE_PARAMS); a slice that starts beyond it is past the end of any listing (see _iter_pages).
MAX_OFFSET = 2**31 - 1


#: The lists whose server takes ``id__gt`` (keyset paging, see read_pages); the others
#: (sites, apps: a few records) page by offset, and sessions come whole.
KEYSET_PATHS = frozenset({"/jobs/", "/batch-jobs/", "/transfers/"})


#: The client attribute that remembers that its server lacks ``id__gt`` (see read_pages).
LACKS_ID_AFTER = "lacks_id_after"


class Page(NamedTuple):
    """One request's page of :func:`read_pages`."""

    #: The listing's count: the last offset page's, or the first page's (a keyset page counts only
    #: the records past its cursor).
    count: int
    #: The page's records that no earlier page returned.
    rows: list[Any]
    #: Whether another request may find more records.
    more: bool
    #: Where an offset page would go on: the start offset plus the records fetched.
    offset: int
    #: The last id read, while the pages go by id (the next page's ``id__gt``); else None.
    after: Optional[int]


def read_pages(fetch: Callable[[dict[str, Any]], tuple[int, list[Any]]], params: Mapping[str, Any], *,
               page_size: int, by_id: bool, offset: int = 0, limit: Optional[int] = None,
               after: Optional[int] = None, client: Any = None) -> Iterator[Page]:
    """The pages of a listing, one ``fetch(page_params) -> (count, records)`` call (one request)
    each, ``page_size`` records (fewer to end at ``limit``); records are dicts or Rows.

    ``by_id`` (a list of KEYSET_PATHS ordered by id) reads the pages after the first by id (keyset
    paging): each asks for the records whose id is greater than the last one read (``id__gt``).
    Records that leave the result meanwhile (deleted, or no longer matching the filters: jobs
    leaving ``state="RUN_DONE"``) then move no other record, so none that stays is skipped or
    read twice, at any depth. The first page starts at ``offset``, or past the id ``after`` where
    it is given (a reader that goes on from an earlier listing's last id; ``offset`` is then where
    the same read goes on by offset).

    Other orderings page by offset: rows inserted ahead of the read position while the pages are
    read (a live campaign's events, listed newest first) shift the later pages: their first rows
    are the last of the page before. Offsets count the rows fetched and a row seen already is
    dropped, so none is returned twice. Rows that leave the result meanwhile shift the later pages
    back: as many unchanged rows are skipped.

    A server without ``id__gt`` is read by offset, as before: ours of an older release refuses it
    (422 naming it), Balsam 0.7's ignores it (its page is not past the cursor). Either is
    remembered on ``client`` (its ``lacks_id_after``), so that its later listings page by offset
    from the start instead of spending a request each to find out again."""
    if by_id and getattr(client, LACKS_ID_AFTER, False) is True:
        by_id = False
    cursor = after if by_id else None
    total = 0
    fetched = 0  # records fetched by offset pages and keyset pages alike: where an offset page goes on
    returned = 0
    seen: set[Any] = set()
    while True:
        want = page_size if limit is None else min(page_size, limit - returned)
        if want <= 0:
            return
        page_params = dict(params, limit=want)
        if cursor is None:
            page_params["offset"] = offset + fetched
        else:
            page_params[ID_AFTER] = cursor
        try:
            count, page = fetch(page_params)
        except Exception as exc:
            if cursor is not None and refused_as_unknown(exc, [ID_AFTER]):
                # A server of ours older than id__gt refuses it as an unknown filter (422).
                _note_lacks_id_after(client)
                by_id, cursor = False, None
                continue
            raise
        if cursor is not None and not _ids_ascending_after(page, cursor):
            # A server that ignores unknown parameters (Balsam 0.7's) answered the listing's start
            # again: drop the page, and read on by offset.
            _note_lacks_id_after(client)
            by_id, cursor = False, None
            continue
        if cursor is None or not fetched:
            total = count
        fetched += len(page)
        fresh = []
        for row in page:
            row_id = row.get("id")  # a dict, or a Row of a page sent as columns
            if row_id is None:
                fresh.append(row)
            elif row_id not in seen:
                seen.add(row_id)
                fresh.append(row)
        returned += len(fresh)
        done = (not page or len(page) < want or (limit is not None and returned >= limit)
                or (cursor is None and fetched + offset >= count)
                or (cursor is not None and len(page) >= count))  # the page held every match past the cursor
        if by_id and page:
            cursor = page[-1].get("id")
        yield Page(total, fresh, not done, offset + fetched, cursor)
        if done:
            return


def _note_lacks_id_after(client: Any) -> None:
    """Remember on ``client`` that its server lacks ``id__gt`` (a client that takes no attribute
    just asks again at its next listing)."""
    try:
        setattr(client, LACKS_ID_AFTER, True)
    except (AttributeError, TypeError):
        pass


def _ids_ascending_after(page: list[Any], cursor: int) -> bool:
    """The page's ids are increasing and greater than ``cursor``: the server applied ``id__gt``
    (one that ignored it answered from the listing's start again, ids up to the cursor first).
    Where no record up to the cursor matches any more, an ignored ``id__gt`` gives the same page."""
    previous = cursor
    for row in page:
        row_id = row.get("id")
        if not isinstance(row_id, int) or row_id <= previous:
            return False
        previous = row_id
    return True


#: A page as ``{"count", "fields", "columns"}`` (see balsam.server.jobs_logic.COLUMNS_MEDIA_TYPE).
COLUMNS_MEDIA_TYPE = "application/vnd.balsam.columns+json"


class PageColumns:
    """The columns of a page sent as columns, each the JSON text of its list of values: a column is
    parsed the first time a field of it is read, then kept (listing jobs makes none of their
    values; reading one field of each parses that column once). Lists are taken as they are."""

    __slots__ = ("_columns", "_parsed", "length")

    def __init__(self, columns: list[Any]) -> None:
        self._columns = columns
        self._parsed: list[Optional[list[Any]]] = [None] * len(columns)
        self.length = len(self[0]) if columns else 0

    def __len__(self) -> int:
        return len(self._columns)

    def __getitem__(self, i: int) -> list[Any]:
        column = self._parsed[i]
        if column is None:
            column = self._parse(i)
        return column

    def _parse(self, i: int) -> list[Any]:
        column = self._columns[i]
        if type(column) is str:
            try:
                with paused_gc():
                    column = orjson.loads(column)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"unexpected list response from the server: column {i}: {exc}") from None
        if type(column) is not list or (i and len(column) != self.length):
            raise ValueError(f"unexpected list response from the server: column {i} is not a list of "
                             f"{self.length} values")
        self._parsed[i] = column
        return column


def _unpack_columns(data: Any) -> tuple[int, list[Row]]:
    fields = data.get("fields") if isinstance(data, dict) else None
    columns = data.get("columns") if isinstance(data, dict) else None
    if (not isinstance(fields, list) or not isinstance(columns, list) or len(columns) != len(fields)
            or not all(type(column) in (str, list) for column in columns)):
        raise ValueError(f"unexpected list response from the server: {str(data)[:200]}")
    page = PageColumns(columns)  # parses the first column (ids): the number of records
    index = {name: i for i, name in enumerate(fields)}
    with paused_gc():
        records = [Row(index, page, position) for position in range(page.length)]
    return int(data.get("count", page.length)), records


def _unpack_list(data: Any) -> tuple[int, list[dict[str, Any]]]:
    if isinstance(data, dict) and "results" in data:
        results = data["results"] or []
        return int(data.get("count", len(results))), results
    if isinstance(data, list):
        return len(data), data
    raise ValueError(f"unexpected list response from the server: {str(data)[:200]}")


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items()) or "the query"
