"""Size limits of request bodies and of the fields in them (documented in docs/rest-api.md).

A body larger than ``BALSAM_MAX_BODY_BYTES`` (64 MiB) is refused with 413 before it is read
(routing.read_body); within a body, every string and object key is checked here, and each one too
long is named in a 422. The limits keep one request from storing (or making the database build)
values that no workflow needs: a 100 MB tag, a multi-gigabyte JSONB value.
"""

from __future__ import annotations

from typing import Any

from balsam.models import MAX_SERIALIZED_CLASS_CHARS, MAX_SERIALIZED_PAYLOAD_CHARS

from .errors import ValidationFailed

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
_MAX_ERRORS = 20
#: JSON values are stored as they come; integers must fit 64 bits (orjson, JSONB).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _walk(value: Any, loc: list[Any], limit: int, errors: list[tuple[list[Any], str]]) -> None:
    # Hot on bulk creates (5,000 jobs): strings are checked inline, only containers recurse.
    if isinstance(value, dict):
        tag_map = bool(loc) and loc[-1] in TAG_FIELDS
        for key, item in value.items():
            if len(key) > MAX_KEY_CHARS:
                errors.append((loc + [key[:40] + "..."], f"key longer than {MAX_KEY_CHARS} characters ({len(key)})"))
            elif type(item) is str:
                inner = MAX_TAG_VALUE_CHARS if tag_map else FIELD_CHARS.get(key, MAX_TEXT_CHARS)
                if len(item) > inner:
                    errors.append((loc + [key], f"longer than {inner} characters ({len(item)})"))
            elif item and isinstance(item, (dict, list)):
                _walk(item, loc + [key], FIELD_CHARS.get(key, MAX_TEXT_CHARS), errors)
            elif type(item) is int and not INT64_MIN <= item <= INT64_MAX:
                errors.append((loc + [key], "integer out of the 64-bit range"))
            if len(errors) >= _MAX_ERRORS:
                return
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if type(item) is str:
                if len(item) > limit:
                    errors.append((loc + [index], f"longer than {limit} characters ({len(item)})"))
            elif item and isinstance(item, (dict, list)):
                _walk(item, loc + [index], limit, errors)
            elif type(item) is int and not INT64_MIN <= item <= INT64_MAX:
                errors.append((loc + [index], "integer out of the 64-bit range"))
            if len(errors) >= _MAX_ERRORS:
                return
    elif isinstance(value, str) and len(value) > limit:
        errors.append((loc, f"longer than {limit} characters ({len(value)})"))


def field_size_errors(data: Any, loc: "list[Any] | None" = None) -> list[tuple[list[Any], str]]:
    """Every string or key of ``data`` (a body, or a part of one at ``loc``) over its limit."""
    errors: list[tuple[list[Any], str]] = []
    _walk(data, ["body"] if loc is None else loc, MAX_TEXT_CHARS, errors)
    return errors


def list_item_size_errors(items: list[Any], indices: list[int]) -> list[tuple[list[Any], str]]:
    """``field_size_errors`` of a list body, walking only the items at ``indices`` (bulk creates
    check the other items field by field as they parse them)."""
    errors: list[tuple[list[Any], str]] = []
    loc: list[Any] = ["body"]
    for index in indices:
        item = items[index]
        if type(item) is str:
            if len(item) > MAX_TEXT_CHARS:
                errors.append((loc + [index], f"longer than {MAX_TEXT_CHARS} characters ({len(item)})"))
        elif item and isinstance(item, (dict, list)):
            _walk(item, loc + [index], MAX_TEXT_CHARS, errors)
        elif type(item) is int and not INT64_MIN <= item <= INT64_MAX:
            errors.append((loc + [index], "integer out of the 64-bit range"))
        if len(errors) >= _MAX_ERRORS:
            break
    return errors[:_MAX_ERRORS]


def check_field_sizes(data: Any, body_bytes: int) -> None:
    """422 naming every string or key over its limit (a body shorter than the smallest limit
    cannot hold one, and is not walked)."""
    if body_bytes <= MAX_KEY_CHARS:
        return
    errors = field_size_errors(data)
    if errors:
        raise ValidationFailed(errors)
