"""Typed driver options: the one way a driver (scheduler, platform, transfer backend, job mode,
agent module) declares the settings it accepts.

A driver class sets ``options_schema`` to a frozen attrs class whose every field has a default and a
help text (declared with :func:`option`). ``settings.yml`` carries the values (``scheduler.options``,
``launcher.platform_options``, an agent module's own section ...); the settings loader checks them
against the schema and reports ``settings.yml:LINE key: reason``; ``balsam site sample-settings``
prints every installed driver's options with their help. The driver receives an instance as
``self.options`` — it never reads settings.yml itself and never falls back to a default of its own
(the schema is the one source of defaults).

Example::

    @attrs.frozen
    class SlurmOptions:
        queue_flag: str = option("--partition", "sbatch flag the BatchJob's queue goes to (--qos at NERSC).")

    class SlurmScheduler(Scheduler):
        options_schema = SlurmOptions
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import attrs

__all__ = ["NoOptions", "OptionsError", "build_options", "option", "option_help"]


def option(default: Any = attrs.NOTHING, help: str = "", *, factory: Any = None, **kwargs: Any) -> Any:
    """An attrs field with a default (or ``factory`` for mutable ones) and a help text."""
    if not help:
        raise TypeError("every driver option needs a help text")
    metadata = {"help": help}
    if factory is not None:
        return attrs.field(factory=factory, metadata=metadata, **kwargs)
    if default is attrs.NOTHING:
        raise TypeError("every driver option needs a default (the schema is the one source of defaults)")
    return attrs.field(default=default, metadata=metadata, **kwargs)


def option_help(schema: type) -> dict[str, str]:
    """``{field name: help text}`` of an options schema, in declaration order."""
    return {f.name: f.metadata.get("help", "") for f in attrs.fields(schema)}


@attrs.frozen
class NoOptions:
    """The options schema of a driver that takes none."""


class OptionsError(ValueError):
    """Options that do not fit their schema; the message is one line naming the key."""


def build_options(schema: type, values: Optional[Mapping[str, Any]] = None, *, where: str = "options") -> Any:
    """An instance of ``schema`` from a plain mapping (for programmatic use and tests).

    The settings loader does the full type check with file and line; this only refuses unknown
    keys, so a misspelt option is never silently ignored.
    """
    if values is None:
        return schema()
    if isinstance(values, schema):
        return values
    if not isinstance(values, Mapping):
        raise OptionsError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in attrs.fields(schema)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionsError(
            f"{where}.{unknown[0]}: unknown option (known: {', '.join(sorted(known)) or 'none'})"
        )
    return schema(**values)
