"""What the plugin manager found: one :class:`PluginRecord` per hook module or named driver, the
statuses ``balsam plugins ls`` shows, and the one-line error texts."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Iterable

import attrs

__all__ = [
    "CONFLICT", "DISABLED", "FAILED", "NOT_LOADED", "OK", "PluginError", "PluginRecord", "did_you_mean",
    "normalize", "one_line",
]

OK, FAILED, DISABLED, CONFLICT, NOT_LOADED = "ok", "failed", "disabled", "conflict", "not loaded"
BUILTIN_DISTRIBUTION = "balsam"


class PluginError(Exception):
    """A plugin or driver cannot be used. The message is one line meant for users."""


def normalize(name: str) -> str:
    """Distribution and entry-point names compare like pip compares them."""
    return name.lower().replace("_", "-").replace(".", "-")


@attrs.define(eq=False)
class PluginRecord:
    """One row of the load report: a hook module or a named driver."""

    kind: str  #: ``plugin`` for hook modules, else a driver kind
    name: str
    distribution: str = ""
    version: str = ""
    status: str = NOT_LOADED
    error: str = ""
    #: ``module:attr`` of the entry point (``module:qualname`` of an in-process plugin).
    target: str = ""
    #: ``entry point <group>`` or ``registered in-process``.
    source: str = ""
    description: str = ""
    #: Where the code lives on disk (filled once loaded).
    location: str = ""
    obj: Any = attrs.field(default=None, repr=False)

    @property
    def builtin(self) -> bool:
        return normalize(self.distribution) == BUILTIN_DISTRIBUTION

    def as_row(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "error": self.error,
        }

    def loaded(self, obj: Any) -> None:
        """Mark the record usable with its imported object."""
        self.status, self.obj = OK, obj
        self.description = self.description or describe(obj)
        self.location = location(obj) or self.location


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def describe(obj: Any) -> str:
    desc = getattr(obj, "description", "")
    if isinstance(desc, str) and desc:
        return desc.strip().splitlines()[0]
    if inspect.isclass(obj):
        # The class's own docstring, else its module's: inspect.getdoc falls back to a base class's,
        # and an agent module without one was described by AgentModule's ("One periodic task of the
        # site agent."), which says nothing of it.
        module = inspect.getmodule(obj)
        doc = inspect.cleandoc(obj.__dict__.get("__doc__") or (module.__doc__ if module is not None else None) or "")
    else:
        doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def location(obj: Any) -> str:
    try:
        return inspect.getsourcefile(obj) or inspect.getfile(obj)
    except (TypeError, OSError):
        return ""


def target_of(obj: Any) -> str:
    if inspect.ismodule(obj):
        return obj.__name__
    module = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")
    qualname = getattr(obj, "__qualname__", None)
    return f"{module}:{qualname}" if qualname else str(module)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"did you mean 'x'?"``, or ``""`` when nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{matches[0]}'?" if matches else ""
