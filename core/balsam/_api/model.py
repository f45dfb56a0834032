"""Model base class: field descriptors with dirty tracking, save/refresh/delete, default client.

Each API model wraps one attrs record of :mod:`balsam.models`. Values live in that record
(structured types: ``Path``, enums, ``datetime``). ``save()`` on a stored object sends only
the fields that changed: fields assigned to, and dict/list/set fields changed in place (a
fingerprint of such a field is taken the first time it is read, and compared at save time).

Datetimes read from the API are returned as naive *local* times (comparable with
``datetime.now()``, as Balsam 0.7 clients such as libEnsemble do); naive datetimes given to
the API are taken as local time, aware ones are respected.
"""

from __future__ import annotations

import copy
import datetime as dt
import difflib
import enum
import inspect
import json
import os
import sys
import threading
import typing
import warnings
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Optional, TypeVar

import attrs
from cattrs.errors import ClassValidationError, IterableValidationError

from balsam.client import RESTClient
from balsam.client.rest import APIError
# The default client lives with the REST client (importable without the models); re-exported here.
from balsam.client.default import get_default_client, reset_default_client, set_default_client  # noqa: F401
from balsam.serialization import _flatten, converter

if TYPE_CHECKING:  # pragma: no cover
    from .manager import Manager

T = TypeVar("T", bound="BalsamModel")

# ------------------------------------------------------------------------------------ type helpers
def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_mutable_type(tp: Any) -> bool:
    base = _strip_optional(tp)
    return base in (dict, list, set) or typing.get_origin(base) in (dict, list, set)


def _fingerprint(value: Any, tp: Any) -> Any:
    """What a mutable field's value is compared by to see an in-place change before a save.

    A flat map of strings (tags, most ``data``) is its own copy: equal copies mean equal JSON, at
    a hundredth of the cost of encoding it (listing 10,000 jobs and reading their tags and data
    encoded 20,000 values). Anything else is its canonical JSON text, an empty map or list one
    written out (a copy never equals a text, so a value that changes shape is seen as changed)."""
    kind = type(value)
    if not value and (kind is dict or kind is list):
        return "{}" if kind is dict else "[]"  # the canonical JSON, without a new container
    if kind is dict and all(type(k) is str and type(v) is str for k, v in value.items()):
        return dict(value)
    return json.dumps(converter.unstructure(value, tp), sort_keys=True, default=str)


def to_local_naive(value: dt.datetime) -> dt.datetime:
    """``value`` as a naive local time. In the hour daylight saving's fall-back repeats, the second
    occurrence gets ``fold=1`` (``astimezone()`` alone gives a fixed offset, which the naive value
    loses): its ``.timestamp()`` is then right, and so is ordering by it (the analytics do)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    local = value.astimezone()
    naive = local.replace(tzinfo=None)
    if naive.astimezone().utcoffset() != local.utcoffset():  # read as the first occurrence: it is the second
        naive = naive.replace(fold=1)
    return naive


def to_aware_utc(value: Any) -> Any:
    """Naive datetimes given to the API are local time (like ``datetime.now()``)."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.astimezone()
        return value.astimezone(dt.timezone.utc)
    return value


def _is_str_dict(tp: Any) -> bool:
    base = _strip_optional(tp)
    return typing.get_origin(base) is dict and typing.get_args(base) == (str, str)


def _plain(value: Any) -> Any:
    """Paths become strings (at any depth), as the wire format has them."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _str_map_wire(value: dict) -> dict:
    """A copy of a string map (tags, launch_params, optional_params ...) with its numbers (and
    number keys) as strings: Balsam 0.7 (pydantic) turned ``{"n": 5}`` into ``{"n": "5"}``. Used
    both when such a field is assigned and when it is sent (a number put in place,
    ``job.tags["n"] = 5``, is sent as ``"5"``); other values are left for the server to refuse."""
    return {k if type(k) is str else str(k): str(v) if isinstance(v, (int, float)) else v for k, v in value.items()}


def _stringify_numbers_in_place(value: dict) -> None:
    """Turn the numbers among a string map's values into strings, in the map itself (a value read
    again after an in-place change, as the site's hook runner reads ``self.job.tags``, is then
    what the server takes)."""
    for key, item in value.items():
        if type(item) is not str and isinstance(item, (int, float)):
            value[key] = str(item)  # an existing key: the dict's size does not change


def structure_value(model: str, name: str, value: Any, tp: Any) -> Any:
    if _strip_optional(tp) is dt.datetime:
        value = to_aware_utc(value)
    value = _plain(value)
    if value is not None and not isinstance(value, typing.Mapping) and typing.get_origin(_strip_optional(tp)) is dict:
        # cattrs would fail on ``value.items()``: an AttributeError that named no field.
        raise ValueError(f"{model}.{name}: expected a dict, got {type(value).__name__} {value!r:.80}")
    if _is_str_dict(tp) and isinstance(value, dict):
        # Balsam 0.7 (pydantic) turned numbers in tags/launch_params/... into strings: keep doing so.
        value = _str_map_wire(value)
    try:
        return converter.structure(value, tp)
    except (ClassValidationError, IterableValidationError, ValueError, TypeError, KeyError) as exc:
        problems = "; ".join(f"{p}: {m}" if p else m for p, m in _flatten(exc)) or str(exc)
        raise ValueError(f"{model}.{name}: {problems}") from None


#: Types whose JSON value is already the Python value (checked with ``type(v) is t``).
_PLAIN_TYPES = (int, str, bool)


def _json_encoder(tp: Any) -> Any:
    """A function giving the wire form of a value of type ``tp``: the common field types directly,
    the rest through the converter (payloads of 10,000 jobs are built field by field)."""
    base = _strip_optional(tp)
    generic = typing.get_origin(base)
    args = typing.get_args(base)

    def fallback(value: Any) -> Any:
        return converter.unstructure(value, tp)

    if base in (int, str, bool, float):
        return lambda value: value
    if base is PurePath or (isinstance(base, type) and issubclass(base, PurePath)):
        return lambda value: None if value is None else str(value)
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return lambda value: None if value is None else value.value
    if generic is dict and args == (str, str):
        return _encode_str_map
    if generic is dict and args[:1] == (str,) and args[1:] == (Any,):
        # Plain JSON values are sent as they are; anything else (a Path, a datetime) converted.
        return lambda value: value if not value else fallback(value)
    if generic in (set, frozenset) and args == (int,):
        return lambda value: None if value is None else sorted(value)
    return fallback


def _encode_str_map(value: Any) -> Any:
    """The wire form of a string map: a copy, its numbers as strings (see :func:`_str_map_wire`)."""
    if value is None:
        return None
    if all(type(k) is str and type(v) is str for k, v in value.items()):
        return dict(value)
    return _str_map_wire(value)


#: What a fast structurer returns for a value it leaves to the converter (which words any error).
_SLOW = object()


# Both return a new dict, as the converter does: the value read may be shared (a create payload's
# default, a page's column) and the record's own is changed in place by its user.
def _str_map(value: Any) -> Any:
    if type(value) is dict and all(type(k) is str and type(v) is str for k, v in value.items()):
        return dict(value)
    return _SLOW


def _json_object(value: Any) -> Any:
    # dict[str, Any]: the converter checks the keys and passes the values through.
    if type(value) is dict and all(type(k) is str for k in value):
        return dict(value)
    return _SLOW


def _fast_structurer(base: Any) -> Any:
    """A function giving the value of a field of type ``base`` from its JSON for the common shapes
    (the same value the converter gives, without its dispatch: reading six fields of each of 10,000
    listed jobs spent most of its time there), or :data:`_SLOW` to leave it to the converter;
    None for types without one."""
    generic = typing.get_origin(base)
    args = typing.get_args(base)
    if isinstance(base, type) and issubclass(base, enum.Enum):
        members = base._value2member_map_

        def enum_member(value: Any) -> Any:
            return members.get(value, _SLOW) if type(value) is str else _SLOW

        return enum_member
    if isinstance(base, type) and issubclass(base, PurePath):
        return lambda value: base(value) if type(value) is str else _SLOW
    if base is float:
        return lambda value: value if type(value) is float else float(value) if type(value) is int else _SLOW
    if generic is dict and args == (str, str):
        return _str_map
    if generic is dict and args == (str, Any):
        return _json_object
    return None


class Row:
    """One record of a page sent as columns (``fields`` once, then a list of values per field;
    ``columns[i]`` is field i's list, see balsam._api.query.PageColumns): read like the record's
    JSON object, without building a dict (or a list) per record."""

    __slots__ = ("index", "columns", "position")

    def __init__(self, index: dict[str, int], columns: Any, position: int) -> None:
        self.index = index  # field name -> column, shared by the rows of a page
        self.columns = columns
        self.position = position

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def __getitem__(self, name: str) -> Any:
        return self.columns[self.index[name]][self.position]

    def get(self, name: str, default: Any = None) -> Any:
        i = self.index.get(name)
        return default if i is None else self.columns[i][self.position]

    def items(self) -> Iterator[tuple[str, Any]]:
        columns, position = self.columns, self.position
        return ((name, columns[i][position]) for name, i in self.index.items())


#: The changed fields of a record just read: shared, and replaced by a set of its own on the first
#: change (a set per record is one more object for the garbage collector to walk per listed job).
_CLEAN: frozenset = frozenset()

#: The default of a field that has none (never equal to a value).
_NO_DEFAULT = object()
#: A field not (yet) in a lazily loaded record's JSON or structured values.
_ABSENT = object()
#: Taken to build a lazily loaded record, structure one of its fields the first time, or swap in
#: a fresh copy (see ``BalsamModel._materialize``): one lock for all records, as each hold is short
#: and under the GIL anyway; a per-record lock would cost one object per listed record. Reentrant:
#: a field's first read may build the whole record.
_LAZY_LOCK = threading.RLock()


def _new_lazy_lock() -> None:
    # A child forked while another thread held the lock would otherwise find it held for ever.
    global _LAZY_LOCK
    _LAZY_LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lazy_lock)


class UnsavedAttributeWarning(UserWarning):
    """A model object sent to the server (``save()``, ``bulk_update()``, ``bulk_create()``) has an
    attribute of its own whose name is close to a field's (``job.num_node = 3``): a plain
    attribute, which is not sent. Once per model class and name per process."""


#: model class -> the attribute names already looked at by ``_warn_unsaved_attributes``: each
#: is compared with the fields once per process, and warned about at most once.
_UNSAVED_CHECKED: dict[type, set[str]] = {}
#: The instance attributes the API itself keeps on model objects (others, of the user's or not,
#: are looked at one by one: only a shortcut).
_INTERNAL_ATTRIBUTES = frozenset({"_raw", "_lazy", "_rec", "_stored", "_dirty", "_snapshots", "_deleted",
                                  "_params_cache", "_app_name"})
#: This package's folder: a warning names the first caller outside it (the user's save() line).
_API_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _outside_api_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in this function's caller) of the first frame
    outside balsam._api: save() and bulk_update() reach the check through different depths."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_API_DIR):
        frame, level = frame.f_back, level + 1
    return level


def _default_of(field: "attrs.Attribute") -> Any:
    default = field.default
    if default is attrs.NOTHING:
        return _NO_DEFAULT
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return default.factory() if not default.takes_self else _NO_DEFAULT  # type: ignore[union-attr]
    return default


class Field:
    """Descriptor for one record field of a model."""

    def __init__(self, name: str, tp: Any, role: Optional[str]) -> None:
        self.name = name
        self.type = tp
        self.role = role
        self.mutable = _is_mutable_type(tp)
        #: a map of strings (tags ...): numbers put in it in place are made strings when read again
        self.str_map = _is_str_dict(tp)
        self.is_datetime = _strip_optional(tp) is dt.datetime
        base = _strip_optional(tp)
        #: The JSON value can be used as it is when its type is exactly this one.
        self.plain_type = base if base in _PLAIN_TYPES else None
        self.optional = base is not tp
        self.to_json = _json_encoder(tp)
        self.fast_structure = _fast_structurer(base)

    def structure(self, model: str, value: Any) -> Any:
        """This field's value from the server's JSON (one field of a lazily loaded record)."""
        if value is None and self.optional:
            return None
        if self.plain_type is not None and type(value) is self.plain_type:
            return value
        if self.fast_structure is not None:
            fast = self.fast_structure(value)
            if fast is not _SLOW:
                return fast
        try:
            return converter.structure(value, self.type)
        except (ClassValidationError, IterableValidationError, ValueError, TypeError, KeyError) as exc:
            problems = "; ".join(f"{p}: {m}" if p else m for p, m in _flatten(exc)) or str(exc)
            raise ValueError(f"{model}: unexpected server response ({self.name}: {problems})") from None

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        if obj._rec is None and obj._raw is not None:
            value = obj._lazy_value(self)
        else:
            value = getattr(obj._record, self.name)
        if self.mutable and obj._stored and self.name not in obj._snapshots and self.name not in obj._dirty:
            obj._snapshots[self.name] = _fingerprint(value, self.type)
        elif self.str_map and type(value) is dict:
            # Read before, so maybe changed in place since: ``job.tags["n"] = 5`` reads as "5" from
            # here on, as the attribute's assignment and save() have it (0.7's server stored "5").
            _stringify_numbers_in_place(value)
        if self.is_datetime and value is not None:
            return to_local_naive(value)
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj._set_field(self.name, value)

    def __repr__(self) -> str:
        return f"Field({self.name!r})"


class ManagerDescriptor:
    """``Model.objects``: one Manager per model class (bound subclasses get their own)."""

    def __get__(self, obj: Any, owner: Any) -> "Manager":
        if obj is not None:
            owner = type(obj)  # ``job.objects`` is ``Job.objects``, as in Balsam 0.7 (a class attribute there)
        manager = owner.__dict__.get("_manager_instance")
        if manager is None:
            manager = owner._manager_cls(owner)
            setattr(owner, "_manager_instance", manager)
        return manager


class BalsamModel:
    """Base of the API models (Site, App, Job, BatchJob, Session, TransferItem, EventLog)."""

    _record_cls: ClassVar[type]
    _path: ClassVar[str]
    _manager_cls: ClassVar[type]
    _client: ClassVar[Optional[RESTClient]] = None
    _fields: ClassVar[dict[str, Field]]
    #: lower-cased name -> name of what a user sets (see _warn_unsaved_attribute), built on first use
    _settable_names: ClassVar[dict[str, str]]
    _create_fields: ClassVar[frozenset[str]]
    #: (name, default, wire encoder or None for plain values) of each create field, in record order
    _create_plan: ClassVar[tuple[tuple[str, Any, Any], ...]]
    _update_fields: ClassVar[frozenset[str]]
    _creatable: ClassVar[bool] = True
    _updatable: ClassVar[bool] = True
    _deletable: ClassVar[bool] = True
    #: the list route takes limit/offset (GET /sessions/ does not)
    _paginated: ClassVar[bool] = True
    #: the create route takes a list (bulk create), even for one record
    _create_as_list: ClassVar[bool] = False
    #: field name -> the server's own check of a value, ``problem(value) -> str | None``: run when
    #: the field is set, so a bad value raises ValueError there, as Balsam 0.7's pydantic models
    #: did, rather than an APIError 422 at save() (or in the middle of a bulk_create)
    _field_checks: ClassVar[dict[str, Callable[[Any], Optional[str]]]] = {}
    #: query-string filter names accepted by the list route (those of Balsam 0.7)
    _filters: ClassVar[frozenset[str]] = frozenset()
    _orderings: ClassVar[frozenset[str]] = frozenset()
    #: the filters that positional arguments of ``get()``/``filter()`` give, in order: Balsam 0.7's
    #: (its generated managers' signatures)
    _positional: ClassVar[tuple[str, ...]] = ("id",)
    #: the fields the constructor and ``objects.create()`` take positionally: those Balsam 0.7's
    #: generated ``__init__``/``create()`` took first (the ones it required, in its order); see
    #: :meth:`_positional_fields`
    _create_positional: ClassVar[tuple[str, ...]] = ()
    #: create fields the server, launcher or agent sets, left out of the keywords a positional
    #: error suggests (still accepted by keyword)
    _create_internal: ClassVar[frozenset[str]] = frozenset()
    #: fields cleared back to their default after every successful save (event payloads)
    _reset_after_save: ClassVar[tuple[str, ...]] = ()
    #: the list route's order when none is asked for (list filters split over several requests
    #: are merged back in this order)
    _default_order: ClassVar[str] = "id"
    #: how the list route breaks ties of a descending ordering (``-field``): by id descending
    #: (jobs, events) or ascending (BatchJob's ``-start_time``); merged split filters follow it
    _desc_ties_by_id_desc: ClassVar[bool] = True
    #: filters the server matches as a substring of a field (Balsam 0.7's Site ``path``): filter
    #: name -> that field. ``get()`` given one resolves several matches to the record whose field
    #: is exactly the value (see Query.get)
    _substring_filters: ClassVar[dict[str, str]] = {}
    #: set by delete(): save() then never creates the record again (see save())
    _deleted: bool = False

    objects: ClassVar["Manager"] = ManagerDescriptor()  # type: ignore[assignment]

    # A record read from the server is kept as its JSON (``_raw``) and each field is structured
    # the first time it is read (``_lazy``): listing 10,000 jobs costs little more than the HTTP
    # transfer, and reading a few fields of each costs only those. Anything that needs the whole
    # record (save, compare, display, pickle) builds it once through ``_record``; values already
    # handed out are kept in it, so an in-place change through them is still seen.
    _rec: Any = None
    _raw: "dict[str, Any] | Row | None" = None
    _lazy: Optional[dict[str, Any]] = None

    @property
    def _record(self) -> Any:
        rec = self._rec
        if rec is None:
            rec = self._materialize()
        return rec

    @_record.setter
    def _record(self, value: Any) -> None:
        self._rec = value
        self._raw = None
        self._lazy = None

    def _materialize(self) -> Any:
        # Under the lock: another thread may be structuring a field of this record (_lazy_value's
        # slow path), building it too, or adopting a fresh copy (wait() polls from one thread while
        # others read the same jobs, as DeepHyper does). Without it a field read meanwhile could
        # find _raw/_lazy gone, or hand out a tags/data dict that is not the record's (an in-place
        # change then lost at save()).
        with _LAZY_LOCK:
            rec = self._rec
            if rec is not None:  # built by another thread meanwhile: theirs is the record
                return rec
            raw = self._raw
            if raw is None:
                raise AttributeError(f"{type(self).__name__} has no record")
            known = {k: v for k, v in raw.items() if k in self._fields}
            try:
                rec = converter.structure(known, self._record_cls)
            except (ClassValidationError, IterableValidationError, ValueError, TypeError, KeyError) as exc:
                problems = "; ".join(f"{p}: {m}" if p else m for p, m in _flatten(exc)) or str(exc)
                raise ValueError(f"{type(self).__name__}: unexpected server response ({problems})") from None
            for key, value in (self._lazy or {}).items():
                setattr(rec, key, value)  # values already handed out stay the record's
            # The record first: a thread that finds _rec unset still finds _raw/_lazy set.
            self._rec = rec
            self._raw = None
            self._lazy = None
            return rec

    def _lazy_value(self, fld: Field) -> Any:
        # Every field of a listed record is read here once: lookups by get() with a sentinel,
        # as a missed key's KeyError cost more than the rest of a first read.
        # Fast path, no lock: a value already structured is the one the record gets (a dict is
        # read and written whole under the GIL). The caller's check that the record is unbuilt
        # may be stale by now (another thread built it): then read the built record.
        lazy = self._lazy
        name = fld.name
        if lazy is not None:
            value = lazy.get(name, _ABSENT)
            if value is not _ABSENT:
                return value
        with _LAZY_LOCK:  # see _materialize
            lazy = self._lazy
            raw = self._raw
            if lazy is None or raw is None:
                return getattr(self._record, name)
            value = lazy.get(name, _ABSENT)
            if value is not _ABSENT:
                return value
            wire = raw.get(name, _ABSENT)
            if wire is _ABSENT:  # the default: build the whole record once
                return getattr(self._materialize(), name)
            value = lazy[name] = fld.structure(type(self).__name__, wire)
            return value

    class DoesNotExist(Exception):
        pass

    class MultipleObjectsReturned(Exception):
        pass

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_record_cls" not in cls.__dict__:
            return
        record = cls._record_cls
        fields: dict[str, Field] = {}
        for f in attrs.fields(record):
            fld = Field(f.name, f.type, f.metadata.get("role"))
            fields[f.name] = fld
            setattr(cls, f.name, fld)
        cls._fields = fields
        cls._create_fields = frozenset(n for n, f in fields.items() if f.role not in ("server", "update"))
        cls._create_plan = tuple(
            (f.name, _default_of(f), None if fields[f.name].plain_type is not None else fields[f.name].to_json)
            for f in attrs.fields(record) if f.name in cls._create_fields
        )
        cls._update_fields = frozenset(n for n, f in fields.items() if f.role not in ("server", "create"))
        name = cls.__name__
        cls.DoesNotExist = type("DoesNotExist", (BalsamModel.DoesNotExist,), {"__qualname__": f"{name}.DoesNotExist"})
        cls.MultipleObjectsReturned = type(
            "MultipleObjectsReturned",
            (BalsamModel.MultipleObjectsReturned,),
            {"__qualname__": f"{name}.MultipleObjectsReturned"},
        )

    @classmethod
    def _first_positional(cls, value: Any) -> Optional[str]:
        """The filter a first positional argument gives when its type says so (None: the first of
        ``_positional``)."""
        return None

    # ------------------------------------------------------------------ client binding
    @classmethod
    def _bind(cls: type[T], client: RESTClient) -> type[T]:
        """A subclass of this model that talks through ``client`` instead of the default one."""
        return type(cls.__name__, (cls,), {"_client": client, "__module__": cls.__module__, "__qualname__": cls.__qualname__})

    @classmethod
    def _get_client(cls) -> RESTClient:
        return cls._client if cls._client is not None else get_default_client()

    @classmethod
    def _model_for(cls, name: str) -> type:
        """The model class ``name`` bound to the same client as ``cls``."""
        if cls._client is not None:
            return getattr(cls._client, name)
        from . import models

        return getattr(models, name)

    # ------------------------------------------------------------------ construction
    @classmethod
    def _positional_fields(cls, args: tuple[Any, ...], kwargs: dict[str, Any], call: str) -> dict[str, Any]:
        """``kwargs`` with ``args`` bound to ``_create_positional`` in order. The order of 0.7's
        optional fields is not known here, so more positionals are a TypeError naming the keywords,
        never a value bound to a field it was not meant for. ``call``: how the error names the call."""
        order = cls._create_positional
        if len(args) > len(order):
            # The constructor's keyword-only names too (Job's site_name, parameters).
            own = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
            names = dict.fromkeys([*own, *sorted(cls._create_fields - cls._create_internal)])
            keywords = ", ".join(f"{k}=..." for k in names if k not in order)
            if order:
                others = f": give the others by keyword ({keywords})" if keywords else ""
                raise TypeError(
                    f"{call} takes at most {len(order)} positional field(s): {', '.join(order)} "
                    f"(those Balsam 0.7 took first, in its order); got {len(args)}{others}")
            raise TypeError(f"{call} takes keyword fields ({keywords})")
        fields = dict(zip(order, args))
        both = sorted(set(fields) & set(kwargs))
        if both:
            raise TypeError(f"{call} got {', '.join(both)} both positionally and by keyword")
        return {**fields, **kwargs}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not self._creatable:
            raise TypeError(f"{type(self).__name__} records are created by the server, not by the API")
        if args:  # Balsam 0.7's generated __init__ took the fields its create() did, positionally
            kwargs = self._positional_fields(args, kwargs, f"{type(self).__name__}()")
        self._stored = False
        self._dirty: set[str] = set()
        self._snapshots: dict[str, Any] = {}
        name = type(self).__name__
        values: dict[str, Any] = {}
        for key, value in kwargs.items():
            fld = self._fields.get(key)
            if fld is None or fld.role == "server" or key not in self._create_fields:
                valid = ", ".join(sorted(self._create_fields))
                raise TypeError(f"{name}() got an unexpected field {key!r} (fields: {valid})")
            if value is None:
                continue  # None means "the default" (Balsam 0.7 clients pass None for unset options)
            values[key] = self._checked(key, structure_value(name, key, value, fld.type))
        try:
            self._record = self._record_cls(**values)
        except TypeError as exc:
            missing = [
                f.name for f in attrs.fields(self._record_cls)
                if f.default is attrs.NOTHING and f.name not in values and f.metadata.get("role") != "server"
            ]
            if missing:
                raise TypeError(f"{name}() missing required field(s): {', '.join(missing)}") from None
            raise TypeError(f"{name}(): {exc}") from None

    @classmethod
    def _wire_defaults(cls) -> dict[str, Any]:
        """The create fields' defaults in wire form (what the server stores for a field left out)."""
        cached = cls.__dict__.get("_wire_defaults_cache")
        if cached is None:
            cached = {name: default if default is None or encode is None else encode(default)
                      for name, default, encode in cls._create_plan if default is not _NO_DEFAULT}
            cls._wire_defaults_cache = cached
        return cached

    @classmethod
    def _from_api(cls: type[T], data: dict[str, Any]) -> T:
        obj = cls.__new__(cls)
        obj._load(data)
        return obj

    @classmethod
    def _from_api_many(cls: type[T], records: list[Any]) -> list[T]:
        """``[_from_api(r) for r in records]`` without a call per record (10,000-job pages)."""
        out = []
        append = out.append
        new = cls.__new__
        for data in records:
            if type(data) is not Row and not isinstance(data, dict):
                raise ValueError(f"{cls.__name__}: expected a JSON object from the server, got {type(data).__name__}")
            obj = new(cls)
            obj._raw = data
            obj._lazy = {}
            obj._stored = True
            obj._dirty = _CLEAN
            obj._snapshots = {}
            append(obj)
        return out

    def _load(self, data: Any) -> None:
        name = type(self).__name__
        if not isinstance(data, (dict, Row)):
            raise ValueError(f"{name}: expected a JSON object from the server, got {type(data).__name__}")
        # Structured lazily (see ``_record``); a malformed field is reported when it is read.
        # Under the lock and in this order (see _adopt): a thread reading a field meanwhile (save()
        # in one thread, reads in another) finds the old record or the new JSON, never neither.
        with _LAZY_LOCK:
            self._lazy = {}
            self._raw = data
            self._rec = None
        self._stored = True
        self._dirty = set()
        self._snapshots = {}

    # ------------------------------------------------------------------ fields
    def _set_field(self, key: str, value: Any) -> None:
        name = type(self).__name__
        fld = self._fields.get(key)
        if fld is None:
            raise AttributeError(f"{name} has no field {key!r}")
        if self._stored or self._deleted:
            if not self._updatable:
                raise AttributeError(f"{name} is read-only")
            if key not in self._update_fields:
                raise AttributeError(f"{name}.{key} cannot be changed after creation")
        elif key not in self._create_fields:
            raise AttributeError(f"{name}.{key} cannot be set before the {name} is created")
        value = self._checked(key, structure_value(name, key, value, fld.type))
        setattr(self._record, key, value)
        if self._dirty is _CLEAN:
            self._dirty = set()
        self._dirty.add(key)
        self._snapshots.pop(key, None)

    @classmethod
    def _validate_update(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """Check and encode an update applied to many records (``Query.update``)."""
        name = cls.__name__
        if not cls._updatable:
            raise AttributeError(f"{name} is read-only")
        payload = {}
        for key, value in fields.items():
            fld = cls._fields.get(key)
            if fld is None or key not in cls._update_fields:
                valid = ", ".join(sorted(cls._update_fields))
                raise AttributeError(f"{name}.{key} cannot be updated (updatable: {valid})")
            payload[key] = converter.unstructure(cls._checked(key, structure_value(name, key, value, fld.type)), fld.type)
        return payload

    @classmethod
    def _checked(cls, key: str, value: Any) -> Any:
        """``value``, if the field's check (``_field_checks``) passes it; else ValueError."""
        check = cls._field_checks.get(key)
        problem = check(value) if check is not None else None
        if problem is not None:
            raise ValueError(f"{cls.__name__}.{key}: {problem}")
        return value

    def _adopt(self, other: "BalsamModel") -> None:
        """Take the stored state of ``other`` (a fresh copy of the same record) as it is: a listed
        record stays unstructured until a field of it is read (see ``_record``). ``wait()`` re-reads
        every pending job at each poll and looks at its state only: structuring each whole record
        took 60% of a poll's time (2.3 s of 4 s for 10,000 pending jobs)."""
        # Under the lock (see _materialize): a thread structuring a field or building the record
        # meanwhile works from one copy, the old or the new one, never half of each. Set in an
        # order in which a lock-free read (Field.__get__, _lazy_value's fast path) finds either.
        rec = other._rec
        with _LAZY_LOCK:
            if rec is not None:
                self._record = rec  # the record first, then the lazy state cleared
            else:
                self._lazy = other._lazy
                self._raw = other._raw
                self._rec = None  # from here on read from the new JSON
        self._stored = other._stored
        self._dirty = set()
        self._snapshots = {}

    def _peek(self, name: str) -> Any:
        """Field ``name``'s value, read without taking its snapshot (reading a dict/list/set field
        takes one, see Field.__get__): for a reader that never changes it and may run in another
        thread than the object's user (a wait's report), so that it changes nothing of the object."""
        if self._rec is None and self._raw is not None:
            return self._lazy_value(self._fields[name])
        return getattr(self._record, name)

    def _changed_fields(self) -> set[str]:
        changed = set(self._dirty)
        # Over a copy (taken at once, under the GIL): another thread reading a field of this object
        # meanwhile adds its snapshot (a wait()'s report reads parent_ids while the user saves).
        for key, snap in list(self._snapshots.items()):
            if key not in changed and _fingerprint(getattr(self._record, key), self._fields[key].type) != snap:
                changed.add(key)
        return changed & self._update_fields

    @property
    def dirty_fields(self) -> set[str]:
        """Names of the fields ``save()`` would send."""
        return self._changed_fields() if self._stored else set(self._create_fields)

    def _field_json(self, key: str) -> Any:
        return self._fields[key].to_json(getattr(self._record, key))

    def _create_payload(self, *, omit_defaults: bool = False) -> dict[str, Any]:
        """The create body of this record: its fields in wire form, None left out (the server's
        default), and with ``omit_defaults`` every field equal to its default too (the server
        applies the same defaults: a bulk create of 10,000 jobs then sends a quarter of the bytes)."""
        self._warn_unsaved_attributes()
        payload = {}
        rec = self._record
        for key, default, encode in self._create_plan:
            value = getattr(rec, key)
            if value is None or (omit_defaults and value == default):
                continue
            payload[key] = value if encode is None else encode(value)
        return payload

    def _update_payload(self) -> dict[str, Any]:
        self._warn_unsaved_attributes()
        self._refuse_fixed_fields_changed_in_place()
        return {key: self._field_json(key) for key in sorted(self._changed_fields())}

    def _refuse_fixed_fields_changed_in_place(self) -> None:
        """AttributeError for a field that cannot be updated but was changed in place
        (``job.parent_ids.add(7)``, ``job.transfers[...] = ...``), as assigning it raises: save()
        sent the other changes and dropped this one silently (in-place changes of the fields that
        can be updated are sent)."""
        for key, snap in list(self._snapshots.items()):  # a copy: see _changed_fields
            if key in self._update_fields:
                continue
            if _fingerprint(getattr(self._record, key), self._fields[key].type) != snap:
                name = type(self).__name__
                what = f"{name} is read-only" if not self._updatable else f"{name}.{key} cannot be changed after creation"
                raise AttributeError(f"{what}: it was changed in place, and save() cannot store that "
                                     f"(refresh_from_db() restores the stored value)")

    def _warn_unsaved_attributes(self) -> None:
        """Warn (:class:`UnsavedAttributeWarning`) about an attribute of the object's own whose name
        is close to a field's: ``job.num_node = 3`` is a plain attribute (as in Balsam 0.7, whose
        models took any attribute) that is never sent. Checked here, when the object's changes are
        sent, not when an attribute is set: a check there cost every listed record and every
        attribute set (listing 10,000 jobs +50%), and refused names 0.7 code uses (``job.idx``)."""
        state = self.__dict__
        if state.keys() <= _INTERNAL_ATTRIBUTES:
            return  # the common case, in one C-level check (bulk_update of 10,000 jobs)
        checked = _UNSAVED_CHECKED.setdefault(type(self), set())
        new = state.keys() - _INTERNAL_ATTRIBUTES - checked  # set operations: no loop per object
        if new:
            checked |= new
            for name in sorted(new):
                if name[:1] != "_":
                    self._warn_unsaved_attribute(name)

    def _warn_unsaved_attribute(self, name: str) -> None:
        cls = type(self)
        if hasattr(cls, name):
            return  # the class's own (a method shadowed on the instance): not a misspelt field
        names = cls.__dict__.get("_settable_names")
        if names is None:
            # What a user sets: the fields that can be created or changed, and the properties with
            # a setter (Job.parameters); by lower case, so "Num_Nodes" is close to "num_nodes".
            names = {f.lower(): f for f in cls._create_fields | cls._update_fields}
            for klass in reversed(cls.__mro__):
                for key, attr in vars(klass).items():
                    if isinstance(attr, property) and attr.fset is not None and not key.startswith("_"):
                        names[key.lower()] = key
            cls._settable_names = names
        close = difflib.get_close_matches(name.lower(), list(names), n=1, cutoff=0.8)
        if close:
            warnings.warn(UnsavedAttributeWarning(
                f"{cls.__name__} has no field {name!r} (did you mean {names[close[0]]!r}?): the attribute is not "
                f"saved"), stacklevel=_outside_api_stacklevel())

    def _mark_clean(self) -> None:
        for key in self._reset_after_save:
            fld = attrs.fields_dict(self._record_cls)[key]
            default = fld.default.factory() if isinstance(fld.default, attrs.Factory) else copy.copy(fld.default)  # type: ignore[union-attr]
            setattr(self._record, key, default)
        # Fields the caller has seen may be changed in place later through a kept reference:
        # fingerprint them again rather than forgetting them.
        seen = [k for k in set(self._snapshots) | self._dirty if self._fields[k].mutable]
        self._dirty = set()
        self._snapshots = {k: _fingerprint(getattr(self._record, k), self._fields[k].type) for k in seen}

    def _apply_response(self, data: Any) -> None:
        """Adopt the server's copy after create/update when it sent one."""
        if isinstance(data, dict) and "id" in data:
            self._load(data)
        self._mark_clean()

    # ------------------------------------------------------------------ persistence
    @property
    def _detail_path(self) -> str:
        if self.id is None:  # type: ignore[attr-defined]
            raise ValueError(f"{type(self).__name__} has no id: save() it first")
        return f"{self._path}{self.id}"  # type: ignore[attr-defined]

    def save(self) -> None:
        """Create the record, or send the changed fields of a stored one (nothing if unchanged)."""
        client = self._get_client()
        if self._deleted:
            # Balsam 0.7 kept a deleted object "stored" with no id: save() sent nothing, or failed
            # for a changed field. Creating the record again (a new id, a job run twice) is never
            # what such a call meant.
            if self._changed_fields():
                raise self._does_not_exist(f"{type(self).__name__} was deleted: save() cannot store its changes "
                                           f"(build a new {type(self).__name__} to create it again)")
            return
        if not self._stored:
            payload = self._create_payload()
            data = client.post(self._path, json=[payload] if self._create_as_list else payload)
            if isinstance(data, list) and len(data) == 1:
                data = data[0]
            self._load(data)
            return
        payload = self._update_payload()
        if not payload:
            return
        data = client.put(self._detail_path, json=payload)
        self._apply_response(data)

    def refresh_from_db(self) -> None:
        """Re-read the record; ``Model.DoesNotExist`` (also an ``APIError``, HTTP 404) once it is deleted."""
        if self._deleted:
            raise self._does_not_exist(f"{type(self).__name__} was deleted")
        if not self._stored:
            raise AttributeError(f"cannot refresh a {type(self).__name__} before it is saved")
        path = self._detail_path
        try:
            data = self._get_client().get(path)
        except APIError as exc:
            if exc.status_code != 404:
                raise
            # Balsam 0.7 read the record with objects.get(id=...): a deleted one raised DoesNotExist.
            raise self._does_not_exist(f"{type(self).__name__}(id={self.id}) does not exist (deleted?): {exc}",  # type: ignore[attr-defined]
                                       exc) from None
        self._load(data)

    @classmethod
    def _does_not_exist(cls, message: str, cause: Optional[APIError] = None) -> Exception:
        """A ``cls.DoesNotExist`` that is also an :class:`APIError` (HTTP 404): what Balsam 0.7 raised,
        and what code written for this API's earlier answer (``except APIError``) catches."""
        base = cls.DoesNotExist
        both = base.__dict__.get("_with_api_error")
        if both is None:
            both = type("DoesNotExist", (base, APIError), {"__qualname__": base.__qualname__,
                                                            "__module__": base.__module__})
            base._with_api_error = both  # type: ignore[attr-defined]
        if cause is not None:
            error = both(cause.method, cause.url, cause.status_code, cause.detail)
        else:
            error = both("", cls._path, 404, message)  # no request was sent: the object knows
        error.args = (message,)
        return error

    def delete(self) -> None:
        if self._deleted:
            raise self._does_not_exist(f"{type(self).__name__} was already deleted")
        if not self._stored:
            raise AttributeError(f"cannot delete a {type(self).__name__} that was never saved")
        if not self._deletable:
            raise AttributeError(f"{type(self).__name__} records cannot be deleted")
        self._get_client().delete(self._detail_path)
        self._record.id = None  # type: ignore[attr-defined]
        self._stored = False
        self._deleted = True

    # ------------------------------------------------------------------ display
    def display_dict(self) -> dict[str, Any]:
        data = json.loads(json.dumps(converter.unstructure(self._record, self._record_cls), default=str))
        for key, fld in self._fields.items():
            if fld.is_datetime and getattr(self._record, key) is not None:
                data[key] = to_local_naive(getattr(self._record, key)).isoformat(sep=" ", timespec="seconds")
        return data

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.display_dict().items())
        return f"{type(self).__name__}({args})"

    def __str__(self) -> str:
        # yaml here, not at the top: ~10 ms of every run() job's start-up, for printing a model.
        import yaml

        return yaml.safe_dump(self.display_dict(), sort_keys=False, indent=4)

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, BalsamModel) or other._record_cls is not self._record_cls:
            return NotImplemented
        if not (self._stored and other._stored):
            return self is other
        return self._record == other._record

    def __hash__(self) -> int:
        rid = getattr(self, "id", None) if "id" in self._fields else None
        return hash((self._record_cls.__name__, rid)) if self._stored and rid is not None else id(self)

    def __reduce__(self) -> tuple:
        # Pickled as the plain model (a client-bound subclass cannot be found by name; the copy
        # uses the default client where it is unpickled).
        dirty = self._dirty | (self._changed_fields() if self._stored else set())
        # The snapshots of the fields that cannot be updated travel too: a copy of a job whose
        # parent_ids were changed in place refuses to save as the original does (it dropped them).
        fixed = {key: snap for key, snap in list(self._snapshots.items()) if key not in self._update_fields}
        state = {"record": converter.unstructure(self._record, self._record_cls), "stored": self._stored,
                 "dirty": sorted(dirty), "deleted": self._deleted, "snapshots": fixed}
        return (_unpickle_model, (self._record_cls.__name__, state))

    def _restore(self, state: dict[str, Any]) -> None:
        self._record = converter.structure(state["record"], self._record_cls)
        self._stored = state["stored"]
        self._dirty = set(state["dirty"])
        self._snapshots = dict(state.get("snapshots") or {})  # absent from pickles of an earlier release
        self._deleted = bool(state.get("deleted", False))


def _unpickle_model(record_name: str, state: dict[str, Any]) -> BalsamModel:
    from . import models

    cls = {"Site": models.Site, "App": models.App, "Job": models.Job, "BatchJob": models.BatchJob,
           "Session": models.Session, "TransferItem": models.TransferItem, "EventLog": models.EventLog}[record_name]
    obj = cls.__new__(cls)
    obj._restore(state)
    return obj
