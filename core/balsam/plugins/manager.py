"""The process-wide plugin manager: a small facade over discovery, the driver registry, the hook
modules and the load report.

* **Named drivers** (``balsam.schedulers``, ``balsam.platforms``, ``balsam.transfers``,
  ``balsam.job_modes``, ``balsam.agent_modules``) come from their entry-point groups only: listed
  from package metadata without importing them, imported with stevedore when asked for
  (:mod:`balsam.plugins.registry`).
* **Hook modules** (``balsam.plugins``) are imported when the manager first loads and registered
  with pluggy; a misspelt ``@hookimpl`` stops the process at start-up (:mod:`balsam.plugins.hooks`).
* Which third-party distributions load is decided by the environment
  (:mod:`balsam.plugins.discovery`):

  - ``BALSAM_PLUGINS=a,b`` - load only these third-party plugins (entry-point names or
    distribution names). Built-ins (the ``balsam`` distribution) always load.
  - ``BALSAM_DISABLE_PLUGIN_AUTOLOAD=1`` - built-ins only, plus whatever ``BALSAM_PLUGINS`` names.

Nothing raises while discovering: an import error or a name conflict is recorded
(:mod:`balsam.plugins.report`) and shown by ``balsam plugins ls``. Only asking for a driver that
cannot be had (:meth:`PluginManager.load_driver`) and a misspelt hook raise :class:`PluginError`.
The settings.yml sections are not kept here: see :mod:`balsam.config.sections`.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any, Iterable, Optional

import pluggy
import stevedore

from .discovery import (
    DRIVER_GROUPS, ENV_ALLOW, HOOK_GROUP, HOOK_KIND, KINDS, Selection, forget_entry_points, importable_entry_points,
    list_entry_points,
)
from .hooks import HookModules
from .registry import DriverRegistry
from .report import BUILTIN_DISTRIBUTION, OK, PluginError, PluginRecord, did_you_mean, normalize

__all__ = [
    "BUILTIN_DISTRIBUTION",
    "DRIVER_GROUPS",
    "HOOK_GROUP",
    "HOOK_KIND",
    "KINDS",
    "PluginError",
    "PluginManager",
    "PluginRecord",
    "did_you_mean",
    "get_plugin_manager",
    "reset_plugin_manager",
]


class PluginManager:
    """Hooks (``.hook``) and named drivers (``.load_driver``) of every installed balsam plugin."""

    def __init__(self, *, allowed: Optional[Iterable[str]] = None, autoload: Optional[bool] = None) -> None:
        env = Selection.from_environment()
        self._selection = Selection(env.allowed if allowed is None else allowed,
                                    env.autoload if autoload is None else autoload)
        self._other_rows: list[PluginRecord] = []
        self.drivers = DriverRegistry(self._selection, self._other_rows)
        self.hooks = HookModules(self.drivers)
        self._lock = threading.RLock()
        self._loaded = False
        #: CLI commands added per plugin name (filled by the CLI group).
        self.cli_commands: dict[str, list[str]] = {}

    @property
    def hook(self) -> Any:
        """The pluggy hook relay: ``pm.hook.balsam_launch_environment(job=..., env=..., ...)``."""
        self.load()
        return self.hooks.pluggy.hook

    @property
    def pluggy_manager(self) -> pluggy.PluginManager:
        return self.hooks.pluggy

    def load(self) -> "PluginManager":
        """Discover everything once. Raises PluginError only for a misspelt hook implementation."""
        with self._lock:
            if self._loaded:
                return self
            self._loaded = True
            groups = (*DRIVER_GROUPS.values(), HOOK_GROUP)
            # stevedore imports what is asked for from the entry points it is given here, this
            # process's one scan, rather than scanning again: its own scan globs and stats every
            # installed distribution's entry_points.txt and reads a cache file under ~/.cache (a
            # full scan when that is missing or stale), metadata operations that the shared
            # filesystems of HPC sites serve slowly. 3-18 ms of each start-up here.
            for group in groups:
                stevedore.ExtensionManager.ENTRY_POINT_CACHE[group] = importable_entry_points(group)
            everything = [ep for group in groups for ep in list_entry_points(group)]
            self._selection.resolve(everything)
            known = sorted({e.name for e in everything} | {e.distribution for e in everything})
            for name in self._selection.unmatched:
                hint = did_you_mean(name, known)
                self._other_rows.append(PluginRecord(
                    kind=HOOK_KIND, name=name, status="missing", source=ENV_ALLOW,
                    error=f"named in {ENV_ALLOW} but no installed distribution provides it" + (f" ({hint})" if hint else ""),
                ))
            self.drivers.discover()
            self.hooks.load_entry_points()
            self.hooks.check_pending()
            return self

    def check_pending(self) -> None:
        self.hooks.check_pending()

    def add_plugin(self, plugin: Any, name: Optional[str] = None) -> PluginRecord:
        """Register an in-process hook plugin (a module or an object), e.g. from an embedding app."""
        self.load()
        with self._lock:
            return self.hooks.add(plugin, name)

    # -- drivers --------------------------------------------------------------------------------
    def load_driver(self, kind: str, name: str) -> Any:
        """The driver class registered as ``name`` for ``kind``, or a one-line PluginError."""
        self.load()
        with self._lock:
            return self.drivers.load(kind, name)

    def list_drivers(self, kind: str, *, resolve: bool = True) -> dict[str, PluginRecord]:
        """Every driver name of ``kind`` -> its record (``.status``, ``.obj``, ``.description``...).

        With ``resolve`` the drivers are imported so that ``status`` says whether each one works.
        """
        self.load()
        with self._lock:
            return self.drivers.listing(kind, resolve)

    # -- reporting ------------------------------------------------------------------------------
    def records(self, resolve: bool = True) -> list[PluginRecord]:
        """Every hook module and driver, loaded, failed, disabled or in conflict."""
        self.load()
        with self._lock:
            rows: list[PluginRecord] = list(self.hooks.plugins.values())
            for kind in KINDS:
                rows.extend(self.drivers.listing(kind, resolve).values())
            rows.extend(self._other_rows)
            order = {HOOK_KIND: -1, **{k: i for i, k in enumerate(KINDS)}}
            return sorted(rows, key=lambda r: (order.get(r.kind, 99), r.name, r.status != OK))

    def report(self) -> list[dict[str, str]]:
        """Rows for ``balsam plugins ls``: kind, name, distribution, version, status, error."""
        return [r.as_row() for r in self.records()]

    def plugin_hooks(self, plugin_name: str) -> list[str]:
        """Names of the hooks a loaded hook module implements."""
        return self.hooks.hooks_of(plugin_name)

    def find(self, name: str) -> list[PluginRecord]:
        """Records whose plugin name, driver name or distribution is ``name``."""
        wanted = normalize(name)
        return [r for r in self.records()
                if normalize(r.name) == wanted or (r.distribution and normalize(r.distribution) == wanted)]

    def known_names(self) -> list[str]:
        names = set()
        for r in self.records(resolve=False):
            names.add(r.name)
            if r.distribution:
                names.add(r.distribution)
        return sorted(names)


_manager: Optional[PluginManager] = None
# Re-entrant: a plugin module that calls get_plugin_manager() while being imported gets the
# manager being loaded instead of a deadlock.
_manager_lock = threading.RLock()


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loaded on first use (raises PluginError on a misspelt hook)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = PluginManager()
            try:
                _manager.load()
            except BaseException:
                _manager = None
                raise
        return _manager


def reset_plugin_manager() -> None:
    """Forget the process-wide manager and stevedore's in-process entry-point cache (tests)."""
    global _manager
    with _manager_lock:
        _manager = None
    stevedore.ExtensionManager.ENTRY_POINT_CACHE.clear()
    importlib.invalidate_caches()
    forget_entry_points()
