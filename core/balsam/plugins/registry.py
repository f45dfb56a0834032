"""The named-driver registry: one name space per driver kind, filled from the entry-point groups
only (``balsam.schedulers``, ``balsam.platforms`` ...), imported with stevedore when asked for.

The core owns the names: built-ins are claimed first, and a second driver with a taken name is a
reported conflict (the first keeps it). Nothing here raises while discovering; asking for a driver
that cannot be had (:meth:`DriverRegistry.load`) raises a one-line :class:`PluginError`.
"""

from __future__ import annotations

from typing import Any

import stevedore
from stevedore.exception import NoMatches

from .discovery import DRIVER_GROUPS, KINDS, Selection, list_entry_points
from .report import CONFLICT, DISABLED, FAILED, NOT_LOADED, OK, PluginError, PluginRecord, did_you_mean, one_line

__all__ = ["DriverRegistry"]


class DriverRegistry:
    def __init__(self, selection: Selection, other_rows: list[PluginRecord]) -> None:
        self.selection = selection
        #: Losers of name conflicts and entries the allow-list switched off (shared with the hooks).
        self.other_rows = other_rows
        #: Winning driver per kind and name.
        self.drivers: dict[str, dict[str, PluginRecord]] = {kind: {} for kind in KINDS}

    def discover(self) -> None:
        for kind, group in DRIVER_GROUPS.items():
            for ep in list_entry_points(group):
                record = ep.record(kind)
                if not self.report_if_disabled(record):
                    self.claim(record)

    def report_if_disabled(self, record: PluginRecord) -> bool:
        """A plugin that ``BALSAM_PLUGINS`` leaves out is listed as disabled (and not loaded)."""
        if self.selection.permits(record.distribution):
            return False
        record.status, record.error = DISABLED, self.selection.reason()
        self.other_rows.append(record)
        return True

    def claim(self, record: PluginRecord) -> bool:
        """Put a driver in the name space; a taken name makes ``record`` a reported conflict."""
        table = self.drivers[record.kind]
        first = table.get(record.name)
        if first is None:
            table[record.name] = record
            return True
        record.status = CONFLICT
        who = first.distribution or first.source
        record.error = f"{record.kind} name '{record.name}' is already taken by {who} ({first.target}); the first one wins"
        self.other_rows.append(record)
        return False

    def resolve(self, record: PluginRecord) -> None:
        """Import an entry-point driver with stevedore (once); failures land in the record."""
        if record.status != NOT_LOADED:
            return
        errors: list[BaseException] = []

        def failed(_manager: Any, entry_point: Any, err: BaseException) -> None:
            if entry_point.value == record.target:
                errors.append(err)

        def pick(_namespace: str, _name: str, extensions: list[Any]) -> Any:
            # Two distributions may ship the same name: import the one that won the name.
            return next((ext for ext in extensions if ext.entry_point.value == record.target), extensions[0])

        try:
            manager = stevedore.DriverManager(
                namespace=DRIVER_GROUPS[record.kind],
                name=record.name,
                on_load_failure_callback=failed,
                on_missing_entrypoints_callback=None,
                conflict_resolver=pick,
            )
        except NoMatches:
            record.status = FAILED
            record.error = one_line(errors[0]) if errors else "entry point not found (reinstall the distribution)"
            return
        ext = manager.extensions[0]
        if ext.entry_point.value != record.target:
            record.status, record.error = FAILED, one_line(errors[0]) if errors else "entry point not found"
            return
        record.loaded(ext.plugin)

    def check_kind(self, kind: str) -> None:
        if kind not in DRIVER_GROUPS:
            hint = did_you_mean(kind, KINDS)
            raise PluginError(f"unknown driver kind '{kind}' (kinds: {', '.join(KINDS)}" + (f"; {hint})" if hint else ")"))

    def load(self, kind: str, name: str) -> Any:
        """The driver class registered as ``name`` for ``kind``, or a one-line PluginError."""
        self.check_kind(kind)
        record = self.drivers[kind].get(name)
        if record is None:
            disabled = [r for r in self.other_rows if r.kind == kind and r.name == name and r.status == DISABLED]
            if disabled:
                raise PluginError(
                    f"{kind} '{name}' comes from distribution '{disabled[0].distribution}', "
                    f"which is not enabled ({disabled[0].error})"
                )
            available = sorted(self.drivers[kind])
            hint = did_you_mean(name, available)
            listing = ", ".join(available) or "none"
            raise PluginError(f"unknown {kind} '{name}' (available: {listing}" + (f"; {hint})" if hint else ")"))
        self.resolve(record)
        if record.status != OK:
            where = record.distribution or record.source
            raise PluginError(f"{kind} '{name}' from {where} could not be loaded ({record.target}): {record.error}")
        return record.obj

    def listing(self, kind: str, resolve: bool) -> dict[str, PluginRecord]:
        self.check_kind(kind)
        if resolve:
            for record in self.drivers[kind].values():
                self.resolve(record)
        return dict(sorted(self.drivers[kind].items()))
