"""Globus ids (collections, native apps) as settings.yml and the command line may write them, and as
Globus writes them. Shared by the backend and the hook module (``balsam site globus-login``), which
every balsam process imports: this module imports no globus_sdk."""

from __future__ import annotations

import re
from typing import Any, Optional

#: A UUID in one of the forms people copy: ``8-4-4-4-12`` hex digits with hyphens or none at all,
#: in either case, optionally in ``{...}`` and after ``urn:uuid:``. Not ``uuid.UUID``: it drops
#: ``urn:``, ``uuid:`` and hyphens anywhere and ``{}`` at the ends, and reads the rest with ``int(..., 16)``,
#: which also takes a sign, ``_`` between digits and surrounding blanks: a mistyped id of 31 hex digits
#: (``abcdef01_2345678...``, ``+bcdef01...``) passed for the valid-looking ``0abcdef0-1234-...``,
#: another collection's id, which was then sent to Globus and listed in the login command.
UUID_TEXT = re.compile(
    r"(?:urn:uuid:)?(\{)?([0-9a-f]{8})(-?)([0-9a-f]{4})\3([0-9a-f]{4})\3([0-9a-f]{4})\3([0-9a-f]{12})(?(1)\})",
    re.IGNORECASE,
)


def _match(text: Any) -> Optional["re.Match[str]"]:
    # str(): YAML reads an unquoted id of 32 decimal digits as a number.
    return None if text is None else UUID_TEXT.fullmatch(str(text))


def is_uuid(text: Any) -> bool:
    """Whether ``text`` is a UUID in one of the forms of :data:`UUID_TEXT`."""
    return _match(text) is not None


def canonical_id(text: Any) -> str:
    """A UUID as Globus writes it (lowercase, hyphenated: ``ABCD...``, ``abcd...``, ``{abcd...}`` are one
    collection), else ``text`` as it is (the settings check refuses it)."""
    match = _match(text)
    if match is None:
        return str(text)
    return "-".join(match.group(i) for i in (2, 4, 5, 6, 7)).lower()
