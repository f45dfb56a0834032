"""Finding plugins without importing them: entry points from package metadata, and which
third-party distributions the environment lets load (``BALSAM_PLUGINS``,
``BALSAM_DISABLE_PLUGIN_AUTOLOAD``)."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import sys
from typing import Any, Iterable, Optional

import attrs

from .report import BUILTIN_DISTRIBUTION, PluginRecord, normalize

__all__ = [
    "DRIVER_GROUPS", "ENV_ALLOW", "ENV_NO_AUTOLOAD", "EntryPointInfo", "HOOK_GROUP", "HOOK_KIND", "KINDS",
    "Selection", "importable_entry_points", "list_entry_points",
]

#: Driver kind -> entry-point group. The only way a driver is registered.
DRIVER_GROUPS: dict[str, str] = {
    "scheduler": "balsam.schedulers",
    "platform": "balsam.platforms",
    "transfer": "balsam.transfers",
    "job_mode": "balsam.job_modes",
    "agent_module": "balsam.agent_modules",
}
KINDS: tuple[str, ...] = tuple(DRIVER_GROUPS)
HOOK_GROUP = "balsam.plugins"
#: Kind shown in the load report for pluggy hook modules.
HOOK_KIND = "plugin"

ENV_ALLOW = "BALSAM_PLUGINS"
ENV_NO_AUTOLOAD = "BALSAM_DISABLE_PLUGIN_AUTOLOAD"


@attrs.define(eq=False)
class EntryPointInfo:
    group: str
    name: str
    value: str
    distribution: str
    version: str
    location: str

    def record(self, kind: str) -> PluginRecord:
        """Its row in ``balsam plugins ls`` (not loaded yet)."""
        return PluginRecord(kind=kind, name=self.name, distribution=self.distribution, version=self.version,
                            target=self.value, source=f"entry point {self.group}", location=self.location)


def list_entry_points(group: str) -> list[EntryPointInfo]:
    """Entry points of ``group`` with their distribution, from metadata only (nothing imported).
    Built-ins first, so that a third party can never shadow a core name."""
    return list(_entry_points_of(tuple(sys.path), group))


@functools.lru_cache(maxsize=64)
def _all_entry_points(path_key: tuple[str, ...]) -> Any:
    # One metadata scan per process (per sys.path): each scan reads every installed distribution's
    # metadata, and a launcher asked for a dozen groups spent ~0.4 s of its start-up scanning.
    return importlib.metadata.entry_points()


@functools.lru_cache(maxsize=64)
def _distributions(path_key: tuple[str, ...]) -> dict[int, tuple[str, str, str]]:
    """(name, version, location) per distribution object of that scan, filled as they are met.

    ``Distribution.metadata`` parses the METADATA file again at every access (an e-mail parser:
    ~0.3 ms), and each of a distribution's entry points asked for its name and version; keyed by
    ``id()``, which is safe because the scan (cached with the same key) keeps the objects alive."""
    return {}


def _identity(path_key: tuple[str, ...], dist: Any) -> tuple[str, str, str]:
    if dist is None:
        return "", "", ""
    known = _distributions(path_key)
    found = known.get(id(dist))
    if found is None:
        name_version = _name_and_version(dist)
        if name_version is None:
            metadata = dist.metadata
            name_version = (metadata["Name"] or "", metadata["Version"] or "")
        try:
            where = str(dist.locate_file(""))
        except Exception:  # pragma: no cover - exotic finders
            where = ""
        found = known[id(dist)] = (*name_version, where)
    return found


def _name_and_version(dist: Any) -> Optional[tuple[str, str]]:
    """``Name`` and ``Version`` read off the head of the METADATA (or PKG-INFO) file, or None when
    either is not there as a plain ``Key: value`` line (then the e-mail parser reads them).

    Why: ``dist.metadata`` runs the e-mail parser over the whole file (the long description
    included), 0.15-0.2 ms per distribution: ~2 ms of every launcher's start-up for the dozen
    distributions with balsam entry points, against 0.4 ms for this. Both keys are single-line
    headers, before the first blank line (the core metadata specification)."""
    try:
        text = dist.read_text("METADATA") or dist.read_text("PKG-INFO")
    except Exception:  # pragma: no cover - exotic distributions
        return None
    name = version = None
    for line in (text or "").splitlines():
        if not line:
            break
        if name is None and line.startswith("Name:"):
            name = line[5:].strip()
        elif version is None and line.startswith("Version:"):
            version = line[8:].strip()
    if not name or version is None:
        return None
    return name, version


@functools.lru_cache(maxsize=256)
def _entry_points_of(path_key: tuple[str, ...], group: str) -> tuple[EntryPointInfo, ...]:
    found: list[EntryPointInfo] = []
    seen: set[tuple[str, str, str]] = set()
    for ep in _all_entry_points(path_key).select(group=group):
        dist_name, version, where = _identity(path_key, getattr(ep, "dist", None))
        key = (normalize(dist_name), ep.name, ep.value)
        if key in seen:  # the same distribution seen twice on sys.path
            continue
        seen.add(key)
        found.append(EntryPointInfo(group=group, name=ep.name, value=ep.value, distribution=dist_name,
                                    version=version, location=where))
    found.sort(key=lambda e: 0 if normalize(e.distribution) == BUILTIN_DISTRIBUTION else 1)
    return tuple(found)


def importable_entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """``group``'s entry points as ``importlib.metadata`` objects, from this process's one scan: the
    list stevedore builds from a scan of its own (the same duplicates dropped), for it to import
    from (see :meth:`balsam.plugins.manager.PluginManager.load`)."""
    seen: set[tuple[str, str, str]] = set()
    found = []
    for ep in _all_entry_points(tuple(sys.path)).select(group=group):
        key = (ep.name, ep.value, ep.group)
        if key not in seen:
            seen.add(key)
            found.append(ep)
    return found


def forget_entry_points() -> None:
    """Drop the cached scan (after installing a distribution into the running interpreter)."""
    _all_entry_points.cache_clear()
    _distributions.cache_clear()
    _entry_points_of.cache_clear()


class Selection:
    """Which third-party distributions may load, from the environment (or given explicitly).

    A name in the allow-list selects a whole distribution: either its distribution name or the
    name of any of its entry points (so ``BALSAM_PLUGINS=slurm`` enables everything that
    ``balsam-scheduler-slurm`` ships, its hook module included).
    """

    def __init__(self, allowed: Optional[Iterable[str]], autoload: bool) -> None:
        self.allowed = None if allowed is None else sorted({a.strip() for a in allowed if a.strip()})
        self.autoload = autoload
        self.enabled_distributions: set[str] = set()
        self.unmatched: list[str] = []

    @classmethod
    def from_environment(cls) -> "Selection":
        raw = os.environ.get(ENV_ALLOW)
        allowed = raw.split(",") if raw is not None and raw.strip() else None
        autoload = os.environ.get(ENV_NO_AUTOLOAD, "").strip().lower() not in ("1", "true", "yes", "on")
        return cls(allowed, autoload)

    def resolve(self, entries: Iterable[EntryPointInfo]) -> None:
        """Turn the allow-list into distribution names, remembering names that match nothing."""
        if self.allowed is None:
            return
        wanted = {normalize(a): a for a in self.allowed}
        matched: set[str] = set()
        for ep in entries:
            dist = normalize(ep.distribution)
            for key in (normalize(ep.name), dist):
                if key in wanted:
                    self.enabled_distributions.add(dist)
                    matched.add(key)
        self.unmatched = [original for key, original in wanted.items() if key not in matched]

    def permits(self, distribution: str) -> bool:
        if normalize(distribution) == BUILTIN_DISTRIBUTION:
            return True
        if self.allowed is not None and normalize(distribution) in self.enabled_distributions:
            return True
        return self.autoload and self.allowed is None

    def reason(self) -> str:
        if self.allowed is not None:
            return f"not selected by {ENV_ALLOW}={','.join(self.allowed)}"
        return f"{ENV_NO_AUTOLOAD} is set"
