"""Hook modules (entry-point group ``balsam.plugins``) registered with pluggy.

A misspelt ``@hookimpl`` (or one of a retired hook) stops the process at start-up with a
:class:`PluginError`, instead of being silently ignored; an import error is recorded and shown by
``balsam plugins ls``.
"""

from __future__ import annotations

from typing import Any, Optional

import pluggy
import stevedore

from . import hookspecs
from .discovery import HOOK_GROUP, HOOK_KIND, EntryPointInfo, list_entry_points
from .registry import DriverRegistry
from .report import CONFLICT, FAILED, NOT_LOADED, PluginError, PluginRecord, did_you_mean, one_line, target_of

__all__ = ["HookModules"]


class HookModules:
    def __init__(self, registry: DriverRegistry) -> None:
        #: Shares the registry's selection and report rows.
        self.registry = registry
        self.pluggy = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pluggy.add_hookspecs(hookspecs)
        #: Hook modules by plugin name.
        self.plugins: dict[str, PluginRecord] = {}

    def check_pending(self) -> None:
        """Fail when a plugin marks a function ``@hookimpl`` that matches no hook (a misspelling)."""
        problems = []
        hook_names = [n for n in dir(hookspecs) if n.startswith("balsam_")]
        for name in dir(self.pluggy.hook):
            if name.startswith("_"):
                continue
            caller = getattr(self.pluggy.hook, name)
            if caller.spec is not None:
                continue
            for impl in caller.get_hookimpls():
                if impl.hookwrapper or impl.optionalhook:
                    continue
                if name in hookspecs.RETIRED_HOOKS:
                    problems.append(f"plugin '{impl.plugin_name}' implements the retired hook '{name}': "
                                    f"{hookspecs.RETIRED_HOOKS[name]}")
                    continue
                hint = did_you_mean(name, hook_names)
                problems.append(f"plugin '{impl.plugin_name}' implements unknown hook '{name}'"
                                + (f" ({hint})" if hint else ""))
        if problems:
            raise PluginError("; ".join(sorted(problems)))

    def load_entry_points(self) -> None:
        wanted: list[EntryPointInfo] = []
        for ep in list_entry_points(HOOK_GROUP):
            record = ep.record(HOOK_KIND)
            if self.registry.report_if_disabled(record):
                continue
            if ep.name in self.plugins:
                record.status = CONFLICT
                record.error = f"plugin name '{ep.name}' is already taken by {self.plugins[ep.name].distribution}"
                self.registry.other_rows.append(record)
            else:
                self.plugins[ep.name] = record
                wanted.append(ep)
        if not wanted:
            return
        by_value = {ep.value: self.plugins[ep.name] for ep in wanted}

        def failed(_manager: Any, entry_point: Any, err: BaseException) -> None:
            record = by_value.get(entry_point.value)
            if record is not None:
                record.status, record.error = FAILED, one_line(err)

        manager = stevedore.NamedExtensionManager(
            namespace=HOOK_GROUP,
            names=[ep.name for ep in wanted],
            name_order=False,
            on_load_failure_callback=failed,
            on_missing_entrypoints_callback=None,
        )
        for ext in manager.extensions:
            record = by_value.get(ext.entry_point.value)
            if record is not None and record.status == NOT_LOADED:
                self.register(record, ext.plugin)
        for record in by_value.values():
            if record.status == NOT_LOADED:  # stale metadata: listed but not found by stevedore
                record.status, record.error = FAILED, "entry point not found (reinstall the distribution)"

    def register(self, record: PluginRecord, module: Any) -> None:
        try:
            self.pluggy.register(module, name=record.name)
        except pluggy.PluginValidationError as exc:
            # Wrong argument names in a hookimpl: as fatal as a misspelt hook name.
            raise PluginError(f"plugin '{record.name}' ({record.target}): {exc}") from None
        except ValueError as exc:
            record.status, record.error = CONFLICT, one_line(exc)
            return
        record.loaded(module)

    def add(self, plugin: Any, name: Optional[str] = None) -> PluginRecord:
        """Register an in-process hook plugin (a module or an object); a misspelt hook is refused."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if name in self.plugins:
            raise PluginError(f"plugin name '{name}' is already registered")
        record = PluginRecord(kind=HOOK_KIND, name=name, target=target_of(plugin), source="registered in-process")
        self.plugins[name] = record
        self.register(record, plugin)
        try:
            self.check_pending()
        except PluginError:
            self.pluggy.unregister(plugin)
            del self.plugins[name]
            raise
        return record

    def hooks_of(self, plugin_name: str) -> list[str]:
        """Names of the hooks a loaded hook module implements."""
        plugin = self.pluggy.get_plugin(plugin_name)
        if plugin is None:
            return []
        return sorted(c.name for c in self.pluggy.get_hookcallers(plugin) or [])
