"""Balsam 0.7's ``balsam.schemas.serializer``: the dill + base64 payloads of job parameters,
return values and exceptions (:mod:`balsam._api.codec` does the work, in 0.7's wire format)."""

from __future__ import annotations

from typing import NoReturn

from balsam._api.codec import (
    DeserializeError,
    EmptyPayload,
    SerializeError,
    deserialize,
    deserialize_exception,
    get_source,
    serialize,
    serialize_exception,
)


def raise_from_serialized(payload: str) -> NoReturn:
    """Raise the exception that :func:`serialize_exception` stored in ``payload``, with its
    traceback (as 0.7's did). A payload that cannot be read raises :class:`DeserializeError`."""
    raise deserialize_exception(payload)


__all__ = [
    "DeserializeError",
    "EmptyPayload",
    "SerializeError",
    "deserialize",
    "deserialize_exception",
    "get_source",
    "raise_from_serialized",
    "serialize",
    "serialize_exception",
]
