"""JSON-ready dicts <-> model objects, with one clear error for a bad payload.

- datetimes are ISO-8601 strings in UTC (naive input is taken as UTC);
- paths are strings, sets are sorted lists, enums are their wire values;
- unknown keys are rejected; a bad payload raises :class:`PayloadError` naming the field.
"""

from __future__ import annotations

import datetime as dt
import enum
import numbers
import operator
import reprlib
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

T = TypeVar("T")


class PayloadError(ValueError):
    """A payload that does not fit a model. ``errors`` lists ``(field_path, problem)`` pairs."""

    def __init__(self, model: str, errors: list[tuple[str, str]]) -> None:
        self.model = model
        self.errors = errors
        detail = "; ".join(f"{path}: {problem}" if path else problem for path, problem in errors)
        super().__init__(f"invalid {model}: {detail}")


class _ShortRepr(reprlib.Repr):
    """Values shown in error messages, shortened: a 422 names what was wrong, it does not echo a
    60 MB value back (nor a million-digit integer, whose ``repr`` itself fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 2
        self.maxstring = self.maxother = self.maxlong = 60
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 6

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 200:  # beyond any integer a field takes; repr() fails past 4300 digits
            return f"<an integer of about {int(x.bit_length() * 0.30103)} digits>"
        return super().repr_int(x, level)


_short_repr = _ShortRepr()


def show(value: Any) -> str:
    """``repr(value)``, shortened for an error message."""
    return _short_repr.repr(value)


#: Seconds since the epoch that a datetime holds (years 1 to 9999, UTC).
_MIN_TIMESTAMP = dt.datetime.min.replace(tzinfo=dt.timezone.utc).timestamp()
_MAX_TIMESTAMP = dt.datetime.max.replace(tzinfo=dt.timezone.utc).timestamp()


def parse_datetime(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        result = value
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            result = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"expected an ISO-8601 datetime, got {show(value)}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        # fromtimestamp raises OverflowError or OSError beyond this range (and on NaN), which
        # would not name the field.
        if not _MIN_TIMESTAMP <= value <= _MAX_TIMESTAMP:
            raise ValueError(f"expected a datetime in years 1 to 9999 (seconds since 1970), got {show(value)}")
        try:
            result = dt.datetime.fromtimestamp(value, tz=dt.timezone.utc)
        except (OverflowError, OSError, ValueError):  # within a second of the range's ends
            raise ValueError(f"expected a datetime in years 1 to 9999 (seconds since 1970), got {show(value)}") from None
    else:
        raise ValueError(f"expected an ISO-8601 datetime, got {show(value)}")
    if result.tzinfo is None:
        return result.replace(tzinfo=dt.timezone.utc)
    try:
        return result.astimezone(dt.timezone.utc)
    except OverflowError:
        # A valid ISO-8601 instant that UTC puts outside years 1-9999, the range of a datetime
        # (0001-01-01T00:00+00:01 is 23:59 on 31 December of year 0): at most a day beyond it, so
        # the nearest instant a datetime holds stands for it rather than the request failing.
        edge = dt.datetime.min if result.year == 1 else dt.datetime.max
        return edge.replace(tzinfo=dt.timezone.utc)


def format_datetime(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat()


def _int64(number: int, given: Any) -> int:
    """An integer converted from a float or a string, if it fits 64 bits (what any column or JSON
    document stores). JSON parsers hand a long integer literal over as a float (1e24), which
    converts to an integer nobody sent."""
    if not -(2**63) <= number < 2**63:
        raise ValueError(f"expected an integer of at most 64 bits, got {show(given)}")
    return number


def _strict(kind: type, name: str):
    def check(value: Any, _type: type) -> Any:
        if isinstance(_type, type) and issubclass(_type, enum.Enum):
            return _structure_enum(value, _type)
        if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value) is not float:
            # An int, or a number of another type (numpy's float32, int64: libEnsemble and
            # DeepHyper take counts and fractions out of arrays; Balsam 0.7 took them): stored
            # as a plain float, which JSON encodes.
            return float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            return _int64(int(value), value)
        if kind is int and isinstance(value, str) and value.strip().lstrip("-").isdecimal():
            # 20 digits hold any 64-bit integer; int() of a longer text may exceed Python's limit
            # on converted digits, whose own message would be the answer.
            digits = value.strip().lstrip("-").lstrip("0")
            return _int64(int(value) if len(digits) <= 20 else 2**63, value)
        if kind is int and type(value) is not int and not isinstance(value, bool) and hasattr(type(value), "__index__"):
            # An integer of another type (numpy's int64 ...), taken as Balsam 0.7 took it and
            # stored as a plain int. numpy's bool has no __index__: it stays refused, as bool is.
            try:
                return _int64(operator.index(value), value)
            except TypeError:
                raise ValueError(f"expected {name}, got {show(value)}") from None
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            raise ValueError(f"expected {name}, got {show(value)}")
        return value

    return check


def _structure_enum(value: Any, cls: type[enum.Enum]) -> enum.Enum:
    try:
        return cls(value)
    except ValueError:
        valid = ", ".join(str(m.value) for m in cls)
        raise ValueError(f"expected one of {valid}; got {show(value)}") from None


def _is_set(t: Any) -> bool:
    return t in (set, frozenset) or typing.get_origin(t) in (set, frozenset)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(dt.datetime, lambda v, _t: parse_datetime(v))
    conv.register_unstructure_hook(dt.datetime, format_datetime)
    conv.register_structure_hook(Path, lambda v, _t: Path(_strict(str, "a path string")(v, str)))
    conv.register_unstructure_hook(Path, str)
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(float, _strict(float, "a number"))
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(bool, _strict(bool, "true or false"))
    conv.register_unstructure_hook_func(_is_set, lambda v: sorted(conv.unstructure(x) for x in v))
    conv.register_structure_hook_func(lambda t: isinstance(t, type) and issubclass(t, enum.Enum), _structure_enum)
    conv.register_unstructure_hook_func(lambda t: isinstance(t, type) and issubclass(t, enum.Enum), lambda v: v.value)
    _refuse_text_as_collection(conv)
    conv.register_unstructure_hook_factory(_has_omittable_fields, lambda cls: _omitting_unstructure_fn(cls, conv))
    return conv


def _has_omittable_fields(cls: Any) -> bool:
    """An attrs class with a field marked ``metadata={"omit_if_default": True}``: a field newer than
    Balsam 0.7's wire format, left out of the JSON while it has its default (0.7 clients under
    pydantic's extra="allow" refuse a key they do not know)."""
    return attrs.has(cls) and any(f.metadata.get("omit_if_default") for f in attrs.fields(cls))


def _omitting_unstructure_fn(cls: Any, conv: cattrs.Converter) -> Any:
    from cattrs.gen import make_dict_unstructure_fn, override

    attrs.resolve_types(cls)  # string annotations (postponed evaluation) to the types the hooks match
    marked = {f.name: override(omit_if_default=True) for f in attrs.fields(cls) if f.metadata.get("omit_if_default")}
    return make_dict_unstructure_fn(cls, conv, **marked)


def _refuse_text_as_collection(conv: cattrs.Converter) -> None:
    """A string is iterable, so cattrs would turn ``"proj"`` into ``["p", "r", "o", "j"]``: refuse it."""
    from cattrs.cols import list_structure_factory

    def refuse(value: Any, what: str) -> None:
        if value is None:  # cattrs' own answer named neither the field's type nor the null
            raise ValueError(f"expected {what}, got null")
        if isinstance(value, (str, bytes, Mapping)):
            raise ValueError(f"expected {what}, got {show(value)}")

    def list_hook(t: Any) -> Any:
        default = list_structure_factory(t, conv)

        def structure(value: Any, _type: Any) -> Any:
            refuse(value, "a list")
            return default(value, _type)

        return structure

    def set_hook(t: Any) -> Any:
        args = typing.get_args(t)
        item = args[0] if args else Any
        kind = frozenset if (typing.get_origin(t) or t) is frozenset else set

        def structure(value: Any, _type: Any) -> Any:
            refuse(value, "a list")
            return kind(conv.structure(v, item) for v in value)

        return structure

    conv.register_structure_hook_factory(lambda t: (typing.get_origin(t) or t) is list, list_hook)
    conv.register_structure_hook_factory(lambda t: (typing.get_origin(t) or t) in (set, frozenset), set_hook)


converter = _make_converter()


def _flatten(exc: BaseException, path: str = "") -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(exc.extra_fields):
            found.append((f"{path}.{key}".lstrip("."), "unknown field"))
        return found
    if isinstance(exc, (ClassValidationError, IterableValidationError)) or isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            note = next((n for n in getattr(sub, "__notes__", []) if hasattr(n, "name") or hasattr(n, "index")), None)
            sub_path = path
            if note is not None and hasattr(note, "name"):
                sub_path = f"{path}.{note.name}"
            elif note is not None and hasattr(note, "index"):
                sub_path = f"{path}[{note.index!r}]"
            if isinstance(sub, KeyError) and note is not None and hasattr(note, "name"):
                found.append((sub_path.lstrip("."), "field required"))
            else:
                found.extend(_flatten(sub, sub_path))
        return found
    message = str(exc) if not isinstance(exc, KeyError) else "field required"
    if isinstance(exc, AttributeError):
        # cattrs calls e.g. .items() on the value: a null or a scalar where a mapping/list belongs.
        message = "cannot be null" if "'NoneType'" in message else "wrong type (expected an object or a list)"
    if isinstance(exc, TypeError) and "required" in message:
        message = "field required"
    found.append((path.lstrip("."), message))
    return found


def _without_07_kwargs_leak(cls: type, data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``data`` without the ``"kwargs": {}`` Balsam 0.7's client puts in every create and update
    body once pydantic's global ``BaseConfig.extra`` is "allow" (libEnsemble's Balsam executor sets
    it on import): its generated models' ``__init__(**kwargs)`` then keeps its own ``kwargs``. The
    0.7 server ignored unknown keys; ours refuses them (422), and the 0.7 client retried that for
    34 minutes. Only this exact leak is dropped: any other unknown key is still refused."""
    if "kwargs" in data and data["kwargs"] == {} and "kwargs" not in attrs.fields_dict(cls):
        return {k: v for k, v in data.items() if k != "kwargs"}
    return data


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Structure a JSON-ready mapping into ``cls``; raise :class:`PayloadError` naming each bad field."""
    if not isinstance(data, Mapping):
        raise PayloadError(cls.__name__, [("", f"expected a JSON object, got {type(data).__name__}")])
    data = _without_07_kwargs_leak(cls, data)
    try:
        return converter.structure(dict(data), cls)
    except (ClassValidationError, ForbiddenExtraKeysError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PayloadError(cls.__name__, _flatten(exc) or [("", str(exc))]) from None


def to_dict(obj: Any, *, include: "set[str] | None" = None) -> dict[str, Any]:
    """Unstructure a model to a JSON-ready dict (optionally only the ``include``\\d fields)."""
    data = converter.unstructure(obj)
    if include is not None:
        data = {k: v for k, v in data.items() if k in include}
    return data


def partial_from_dict(cls: type, data: Mapping[str, Any], *, allowed: "set[str] | None" = None) -> dict[str, Any]:
    """Validate a partial update: each key must be a field of ``cls`` (and in ``allowed``).

    Returns the values structured to their field types (still a dict: an update names only some fields).
    """
    if not isinstance(data, Mapping):
        raise PayloadError(cls.__name__, [("", f"expected a JSON object, got {type(data).__name__}")])
    data = _without_07_kwargs_leak(cls, data)
    fields = attrs.fields_dict(cls)
    errors: list[tuple[str, str]] = []
    result: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields or (allowed is not None and key not in allowed):
            errors.append((key, "unknown field" if key not in fields else "cannot be changed"))
            continue
        try:
            result[key] = converter.structure(value, fields[key].type)
        except (ClassValidationError, IterableValidationError, ValueError, TypeError, KeyError, AttributeError) as exc:
            errors.extend((f"{key}{'.' if p and not p.startswith('[') else ''}{p}", m) for p, m in _flatten(exc))
    if errors:
        raise PayloadError(cls.__name__, errors)
    return result
