"""Size limits of request bodies and of the fields in them (documented in docs/rest-api.md).

A body larger than ``BALSAM_MAX_BODY_BYTES`` (64 MiB) is refused with 413 before it is read
(routing.read_body); within a body, every string and object key is checked here, and those too
long are named in a 422 (the first ones: the walk stops after them). The limits keep one request
from storing (or making the database build) values that no workflow needs: a 100 MB tag, a
multi-gigabyte JSONB value.
"""

from __future__ import annotations

from typing import Any

from balsam.models import MAX_SERIALIZED_CLASS_CHARS, MAX_SERIALIZED_PAYLOAD_CHARS

from .errors import CappedErrors, ValidationFailed, WalkStopped, unwalked_within

#: Any key of a JSON object (tag names, data keys, parameter names, ...).
MAX_KEY_CHARS = 256
#: Values of ``tags`` and ``filter_tags`` (they are matched by filters and indexed).
MAX_TAG_VALUE_CHARS = 1024
#: ``workdir``, site ``path``, transfer paths (Linux PATH_MAX).
MAX_PATH_CHARS = 4096
#: Application source code.
MAX_SOURCE_CHARS = 1_048_576
#: Any other string.
MAX_TEXT_CHARS = 1_048_576
#: A query-string value (filters).
MAX_QUERY_VALUE_CHARS = 4096

#: Limits of a record's own fields of these names; inside free-form JSON values a key of the same
#: name is the user's own, its string limited as any other (see ``_walk_record``).
FIELD_CHARS: dict[str, int] = {
    "workdir": MAX_PATH_CHARS,
    "path": MAX_PATH_CHARS,
    "local_path": MAX_PATH_CHARS,
    "remote_path": MAX_PATH_CHARS,
    "serialized_parameters": MAX_SERIALIZED_PAYLOAD_CHARS,
    "serialized_return_value": MAX_SERIALIZED_PAYLOAD_CHARS,
    "serialized_exception": MAX_SERIALIZED_PAYLOAD_CHARS,
    "serialized_class": MAX_SERIALIZED_CLASS_CHARS,
    "source_code": MAX_SOURCE_CHARS,
}
TAG_FIELDS = frozenset({"tags", "filter_tags"})
#: Fields whose value maps names to records of their own: an app's transfer slots
#: (``{slot: {local_path, ...}}``) and a job's transfer items (``{slot: {location_alias, path}}``).
#: Their fields (``local_path``, ``path``) have their limits as a record's own fields do.
SUB_RECORD_FIELDS = frozenset({"transfers"})
#: Nesting of arrays and objects in a body, counting the body itself as level 1. The parser
#: accepts 1024 levels, but serializing a value (orjson.dumps, for the database and the answer)
#: fails beyond about 250 and the recursive walks below beyond the interpreter's stack; no
#: workflow's data needs more than a few levels.
MAX_JSON_DEPTH = 64
#: JSON values are stored as they come; integers must fit 64 bits (orjson, JSONB).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


# Where a limit applies: ``FIELD_CHARS`` and the tag limit are limits of a record's own fields (the
# body, an item of a list body, a transfer slot or item), named by the API. Inside a free-form JSON
# value (``data``, ``state_data``, ``transfer_info``, ``launch_params``, ``optional_batch_job_params``,
# ``status_info``, ...) the keys are the user's own: a ``path`` there is just text (1 MiB), like any
# other string.


def check_depth(data: Any) -> None:
    """422 naming the first array or object nested deeper than ``MAX_JSON_DEPTH`` levels.
    Iterative (the point is to refuse what would overflow recursive code), one level at a time
    without building paths (a 5,000-job create is walked in a few milliseconds); the path of the
    first too-deep point is searched for only once there is one."""
    level, depth = [data], 1
    while level:
        if depth > MAX_JSON_DEPTH:
            raise ValidationFailed.field(_first_too_deep(data), f"nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects")
        below = []
        for value in level:
            for item in (value.values() if type(value) is dict else value):
                if type(item) is dict or type(item) is list:  # an empty one too: it is a level
                    below.append(item)
        level, depth = below, depth + 1


def _first_too_deep(data: Any) -> list[Any]:
    """The loc of the first container, in document order, nested deeper than ``MAX_JSON_DEPTH``."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ("body",))]
    while stack:
        value, loc = stack.pop()
        if len(loc) > MAX_JSON_DEPTH:  # the body is level 1, with loc ["body"]
            return list(loc)
        items = value.items() if type(value) is dict else enumerate(value)
        for key, item in reversed(list(items)):  # reversed: popped in document order
            if type(item) is dict or type(item) is list:
                stack.append((item, loc + (key,)))
    return ["body"]


def _walk_json(value: Any, loc: list[Any], errors: list[tuple[list[Any], str]]) -> None:
    """A free-form JSON value: keys of at most MAX_KEY_CHARS, strings of MAX_TEXT_CHARS, 64-bit ints."""
    # Hot on bulk creates (5,000 jobs): strings are checked inline, only containers recurse.
    if isinstance(value, dict):
        for key, item in value.items():
            if len(key) > MAX_KEY_CHARS:
                errors.append((loc + [key[:40] + "..."], f"key longer than {MAX_KEY_CHARS} characters ({len(key)})"))
            elif type(item) is str:
                if len(item) > MAX_TEXT_CHARS:
                    errors.append((loc + [key], f"longer than {MAX_TEXT_CHARS} characters ({len(item)})"))
            elif item and isinstance(item, (dict, list)):
                _walk_json(item, loc + [key], errors)
            elif type(item) is int and not INT64_MIN <= item <= INT64_MAX:
                errors.append((loc + [key], "integer out of the 64-bit range"))
    elif isinstance(value, list):
        _walk_list(value, loc, MAX_TEXT_CHARS, errors)
    elif isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
        errors.append((loc, f"longer than {MAX_TEXT_CHARS} characters ({len(value)})"))


def _walk_list(value: list[Any], loc: list[Any], limit: int, errors: list[tuple[list[Any], str]]) -> None:
    """A list's strings up to ``limit`` (its field's), its containers as free-form JSON."""
    for index, item in enumerate(value):
        if type(item) is str:
            if len(item) > limit:
                errors.append((loc + [index], f"longer than {limit} characters ({len(item)})"))
        elif item and isinstance(item, (dict, list)):
            _walk_json(item, loc + [index], errors)
        elif type(item) is int and not INT64_MIN <= item <= INT64_MAX:
            errors.append((loc + [index], "integer out of the 64-bit range"))


def _walk_record(record: dict, loc: list[Any], errors: list[tuple[list[Any], str]], *, sub_records: bool = True) -> None:
    """A record's own fields with their limits (``FIELD_CHARS``, tag values); their values that are
    free-form JSON with ``_walk_json``."""
    for key, item in record.items():
        if len(key) > MAX_KEY_CHARS:
            errors.append((loc + [key[:40] + "..."], f"key longer than {MAX_KEY_CHARS} characters ({len(key)})"))
        elif type(item) is str:
            limit = FIELD_CHARS.get(key, MAX_TEXT_CHARS)
            if len(item) > limit:
                errors.append((loc + [key], f"longer than {limit} characters ({len(item)})"))
        elif item and isinstance(item, dict):
            if key in TAG_FIELDS:
                _walk_tags(item, loc + [key], errors)
            elif sub_records and key in SUB_RECORD_FIELDS:
                for name, sub in item.items():
                    if len(name) > MAX_KEY_CHARS:
                        errors.append((loc + [key, name[:40] + "..."],
                                       f"key longer than {MAX_KEY_CHARS} characters ({len(name)})"))
                    elif isinstance(sub, dict):
                        _walk_record(sub, loc + [key, name], errors, sub_records=False)
                    else:
                        _walk_json(sub, loc + [key, name], errors)
            else:
                _walk_json(item, loc + [key], errors)
        elif item and isinstance(item, list):
            _walk_list(item, loc + [key], FIELD_CHARS.get(key, MAX_TEXT_CHARS), errors)
        elif type(item) is int and not INT64_MIN <= item <= INT64_MAX:
            errors.append((loc + [key], "integer out of the 64-bit range"))


def _walk_tags(tags: dict, loc: list[Any], errors: list[tuple[list[Any], str]]) -> None:
    for key, item in tags.items():
        if len(key) > MAX_KEY_CHARS:
            errors.append((loc + [key[:40] + "..."], f"key longer than {MAX_KEY_CHARS} characters ({len(key)})"))
        elif type(item) is str:
            if len(item) > MAX_TAG_VALUE_CHARS:
                errors.append((loc + [key], f"longer than {MAX_TAG_VALUE_CHARS} characters ({len(item)})"))
        else:  # not a tag value (refused by the route's own checks): checked as any JSON
            _walk_json(item, loc + [key], errors)


def _walk_item(item: Any, loc: list[Any], errors: list[tuple[list[Any], str]]) -> None:
    """A body, or an item of a list body: an object is a record, anything else free-form JSON."""
    if isinstance(item, dict):
        _walk_record(item, loc, errors)
    elif type(item) is int:
        if not INT64_MIN <= item <= INT64_MAX:
            errors.append((loc, "integer out of the 64-bit range"))
    else:
        _walk_json(item, loc, errors)


def field_size_errors(data: Any, loc: "list[Any] | None" = None) -> list[tuple[list[Any], str]]:
    """The strings, keys and integers of a body over their limits (a list body: each item a
    record), up to the first ``MAX_REPORTED_ERRORS + 1``: the walk stops there
    (:class:`CappedErrors`). Walking on to count them all cost up to 18 times the walk of a valid
    body of the same size."""
    errors = CappedErrors()
    loc = ["body"] if loc is None else loc
    try:
        if isinstance(data, list):
            for index, item in enumerate(data):
                _walk_item(item, loc + [index], errors)
        else:
            _walk_item(data, loc, errors)
    except WalkStopped:
        errors.unchecked_within = unwalked_within(data, loc, errors[-1][0])
    return errors


class _Found(Exception):
    pass


class _FirstProblem(list):
    """Stops a walk at its first problem: a yes/no check."""

    def append(self, error: tuple[list[Any], str]) -> None:
        raise _Found


def json_value_within_limits(value: Any) -> bool:
    """Whether a free-form JSON value (a job's ``data``) has no string, key or integer over its
    limit: the walk stops at the first one (a bulk create's fast path asks only this; a bad
    ``data`` was walked whole there, twice, before its errors were collected)."""
    try:
        _walk_json(value, [], _FirstProblem())
    except _Found:
        return False
    return True


def list_item_size_errors(items: list[Any], indices: list[int]) -> list[tuple[list[Any], str]]:
    """``field_size_errors`` of a list body, walking only the items at ``indices`` (bulk creates
    check the other items field by field as they parse them)."""
    errors = CappedErrors()
    try:
        for index in indices:
            _walk_item(items[index], ["body", index], errors)
    except WalkStopped:
        # Items left to walk after this one: anywhere in the body.
        errors.unchecked_within = (unwalked_within(items[index], ["body", index], errors[-1][0])
                                   if index == indices[-1] else ["body"])
    return errors


def list_size_errors_of_unchecked(items: list[Any], unchecked: "list[dict[str, Any] | None]") -> list[tuple[list[Any], str]]:
    """``field_size_errors`` of a list body, the same errors in the same order, where the caller has
    already checked some items field by field: ``unchecked[i]`` None walks item ``i`` whole; else it
    holds the item's free-form JSON values that its own checks did not bound (field name -> value),
    walked here, the item's other fields known to be within their limits (short known keys, ints in
    range, strings the caller measured). A bulk state update is mostly such items (launchers'
    reports, checked as they are parsed): the whole walk of every record was a fifth of its
    server time."""
    errors = CappedErrors()
    try:
        for index, item in enumerate(items):
            rest = unchecked[index]
            if rest is None:
                _walk_item(item, ["body", index], errors)
                continue
            for key, value in rest.items():
                # A record's own field that is free-form JSON is walked by _walk_record as here.
                _walk_json(value, ["body", index, key], errors)
    except WalkStopped:
        walked = item if rest is None else rest  # (the fields of it walked, in this order)
        errors.unchecked_within = (unwalked_within(walked, ["body", index], errors[-1][0])
                                   if index == len(items) - 1 else ["body"])
    return errors


#: The shortest JSON text of an integer out of the 64-bit range (``9223372036854775808``, 19
#: characters; the negative ones are longer). A body shorter than this holds no value over any
#: limit (the string limits are longer still) and is not walked; a 64-bit limit was the one a body
#: of up to MAX_KEY_CHARS bytes could exceed (``{"data": {"x": 18446744073709551615}}``, stored as
#: it came while a longer body with it was refused).
MIN_OUT_OF_RANGE_INT_CHARS = len(str(INT64_MAX + 1))


def check_field_sizes(data: Any, body_bytes: int) -> None:
    """422 naming the strings, keys or integers over their limit (the first ones: see
    ``field_size_errors``; a body too short to hold one is not walked: see
    ``MIN_OUT_OF_RANGE_INT_CHARS``)."""
    if body_bytes < MIN_OUT_OF_RANGE_INT_CHARS:
        return
    errors = field_size_errors(data)
    if errors:
        raise ValidationFailed(errors)
