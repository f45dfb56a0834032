"""The process-wide plugin manager: pluggy hooks plus stevedore-loaded named drivers.

Two mechanisms, one name space:

* **Hook modules** (entry-point group ``balsam.plugins``) are imported when the manager first loads
  and registered with pluggy. ``check_pending`` runs right after, so a misspelt ``@hookimpl``
  stops the process at start-up with a :class:`PluginError` instead of being silently ignored.
* **Named drivers** (``balsam.schedulers``, ``balsam.platforms``, ``balsam.transfers``,
  ``balsam.job_modes``, ``balsam.agent_modules``) are listed from package metadata without
  importing them, and imported with a stevedore ``DriverManager`` only when asked for (or when the
  load report is built). Hook modules may add drivers through ``balsam_register_drivers``; the
  core checks the names, so a second driver with a taken name is reported as a conflict and the
  first one wins.

Nothing here raises while discovering: an import error, a bad registration or a name conflict is
recorded and shown by ``balsam plugins ls``. Only asking for a driver that cannot be had
(:meth:`PluginManager.load_driver`) and a misspelt hook raise :class:`PluginError`.

Environment:

* ``BALSAM_PLUGINS=a,b`` - load only these third-party plugins (entry-point names or distribution
  names). Built-ins (the ``balsam`` distribution) always load.
* ``BALSAM_DISABLE_PLUGIN_AUTOLOAD=1`` - load built-ins only, plus whatever ``BALSAM_PLUGINS``
  names explicitly (like pytest's ``-p``).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import os
import threading
from typing import Any, Callable, Iterable, Optional

import attrs
import pluggy
import stevedore
from stevedore.exception import NoMatches

from . import hookspecs

__all__ = [
    "BUILTIN_DISTRIBUTION",
    "DRIVER_GROUPS",
    "HOOK_GROUP",
    "KINDS",
    "PluginError",
    "PluginManager",
    "PluginRecord",
    "get_plugin_manager",
    "reset_plugin_manager",
]

#: Driver kind -> entry-point group.
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
BUILTIN_DISTRIBUTION = "balsam"

ENV_ALLOW = "BALSAM_PLUGINS"
ENV_NO_AUTOLOAD = "BALSAM_DISABLE_PLUGIN_AUTOLOAD"

OK, FAILED, DISABLED, CONFLICT, NOT_LOADED = "ok", "failed", "disabled", "conflict", "not loaded"


class PluginError(Exception):
    """A plugin or driver cannot be used. The message is one line meant for users."""


@attrs.define(eq=False)
class PluginRecord:
    """One row of the load report: a hook module or a named driver."""

    kind: str  #: ``plugin`` for hook modules, else a driver kind
    name: str
    distribution: str = ""
    version: str = ""
    status: str = NOT_LOADED
    error: str = ""
    #: ``module:attr`` of the entry point, or ``module:qualname`` of a registered driver.
    target: str = ""
    #: ``entry point <group>`` or ``registered by plugin <name>``.
    source: str = ""
    description: str = ""
    #: Where the code lives on disk (filled once loaded).
    location: str = ""
    obj: Any = attrs.field(default=None, repr=False)

    @property
    def builtin(self) -> bool:
        return _normalize(self.distribution) == BUILTIN_DISTRIBUTION

    def as_row(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "error": self.error,
        }


@attrs.define(eq=False)
class _EntryPointInfo:
    group: str
    name: str
    value: str
    distribution: str
    version: str
    location: str

    def record(self, kind: str) -> PluginRecord:
        """Its row in ``balsam plugins list`` (not loaded yet)."""
        return PluginRecord(kind=kind, name=self.name, distribution=self.distribution, version=self.version,
                            target=self.value, source=f"entry point {self.group}", location=self.location)


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _describe(obj: Any) -> str:
    desc = getattr(obj, "description", "")
    if isinstance(desc, str) and desc:
        return desc.strip().splitlines()[0]
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _location(obj: Any) -> str:
    try:
        return inspect.getsourcefile(obj) or inspect.getfile(obj)
    except (TypeError, OSError):
        return ""


def _target_of(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")
    qualname = getattr(obj, "__qualname__", None)
    if inspect.ismodule(obj):
        return obj.__name__
    return f"{module}:{qualname}" if qualname else str(module)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"``-style suffix text, or ``""`` when nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{matches[0]}'?" if matches else ""


def _list_entry_points(group: str) -> list[_EntryPointInfo]:
    """Entry points of ``group`` with their distribution, from metadata only (nothing imported)."""
    found: list[_EntryPointInfo] = []
    seen: set[tuple[str, str, str]] = set()
    for ep in importlib.metadata.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        dist_name = (dist.metadata["Name"] if dist is not None else "") or ""
        key = (_normalize(dist_name), ep.name, ep.value)
        if key in seen:  # the same distribution seen twice on sys.path
            continue
        seen.add(key)
        location = ""
        if dist is not None:
            try:
                location = str(dist.locate_file(""))
            except Exception:  # pragma: no cover - exotic finders
                location = ""
        found.append(
            _EntryPointInfo(
                group=group,
                name=ep.name,
                value=ep.value,
                distribution=dist_name,
                version=(dist.version if dist is not None else "") or "",
                location=location,
            )
        )
    # Built-ins first, so a third party can never shadow a core name.
    found.sort(key=lambda e: 0 if _normalize(e.distribution) == BUILTIN_DISTRIBUTION else 1)
    return found


class _Selection:
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
    def from_environment(cls) -> "_Selection":
        raw = os.environ.get(ENV_ALLOW)
        allowed = raw.split(",") if raw is not None and raw.strip() else None
        autoload = os.environ.get(ENV_NO_AUTOLOAD, "").strip().lower() not in ("1", "true", "yes", "on")
        return cls(allowed, autoload)

    def resolve(self, entries: Iterable[_EntryPointInfo]) -> None:
        """Turn the allow-list into distribution names, remembering names that match nothing."""
        if self.allowed is None:
            return
        wanted = {_normalize(a): a for a in self.allowed}
        matched: set[str] = set()
        for ep in entries:
            dist = _normalize(ep.distribution)
            for key in (_normalize(ep.name), dist):
                if key in wanted:
                    self.enabled_distributions.add(dist)
                    matched.add(key)
        self.unmatched = [original for key, original in wanted.items() if key not in matched]

    def permits(self, entry_name: str, distribution: str) -> bool:
        if _normalize(distribution) == BUILTIN_DISTRIBUTION:
            return True
        if self.allowed is not None and _normalize(distribution) in self.enabled_distributions:
            return True
        return self.autoload and self.allowed is None

    def reason(self) -> str:
        if self.allowed is not None:
            return f"not selected by {ENV_ALLOW}={','.join(self.allowed)}"
        return f"{ENV_NO_AUTOLOAD} is set"


class PluginManager:
    """Hooks (``.hook``) and named drivers (``.load_driver``) of every installed balsam plugin."""

    def __init__(self, *, allowed: Optional[Iterable[str]] = None, autoload: Optional[bool] = None) -> None:
        env = _Selection.from_environment()
        self._selection = _Selection(
            env.allowed if allowed is None else allowed,
            env.autoload if autoload is None else autoload,
        )
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._lock = threading.RLock()
        self._loaded = False
        #: Hook modules by plugin name.
        self._plugins: dict[str, PluginRecord] = {}
        #: Winning driver per (kind, name).
        self._drivers: dict[str, dict[str, PluginRecord]] = {kind: {} for kind in KINDS}
        #: Losers of name conflicts and entries the allow-list switched off.
        self._other_rows: list[PluginRecord] = []
        #: CLI commands added per plugin name (filled by the CLI group).
        self.cli_commands: dict[str, list[str]] = {}

    # -- loading --------------------------------------------------------------------------------
    @property
    def hook(self) -> Any:
        """The pluggy hook relay: ``pm.hook.balsam_launch_environment(job=..., env=..., ...)``."""
        self.load()
        return self._pm.hook

    @property
    def pluggy_manager(self) -> pluggy.PluginManager:
        return self._pm

    def load(self) -> "PluginManager":
        """Discover everything once. Raises PluginError only for a misspelt hook implementation."""
        with self._lock:
            if self._loaded:
                return self
            self._loaded = True
            everything = [ep for group in (*DRIVER_GROUPS.values(), HOOK_GROUP) for ep in _list_entry_points(group)]
            self._selection.resolve(everything)
            for name in self._selection.unmatched:
                hint = did_you_mean(name, sorted({e.name for e in everything} | {e.distribution for e in everything}))
                self._other_rows.append(
                    PluginRecord(
                        kind=HOOK_KIND,
                        name=name,
                        status="missing",
                        error=f"named in {ENV_ALLOW} but no installed distribution provides it"
                        + (f" ({hint})" if hint else ""),
                        source=ENV_ALLOW,
                    )
                )
            self._discover_drivers()
            self._load_hook_modules()
            self.check_pending()
            for name in list(self._plugins):
                record = self._plugins[name]
                if record.status == OK:
                    self._call_register_drivers(name, record.obj)
            return self

    def check_pending(self) -> None:
        """Fail when a plugin marks a function ``@hookimpl`` that matches no hook (a misspelling)."""
        problems = []
        hook_names = [n for n in dir(hookspecs) if n.startswith("balsam_")]
        for name in dir(self._pm.hook):
            if name.startswith("_"):
                continue
            caller = getattr(self._pm.hook, name)
            if caller.spec is not None:
                continue
            for impl in caller.get_hookimpls():
                if impl.hookwrapper or impl.optionalhook:
                    continue
                if name in hookspecs.RETIRED_HOOKS:
                    problems.append(
                        f"plugin '{impl.plugin_name}' implements the retired hook '{name}': "
                        f"{hookspecs.RETIRED_HOOKS[name]}"
                    )
                    continue
                hint = did_you_mean(name, hook_names)
                problems.append(
                    f"plugin '{impl.plugin_name}' implements unknown hook '{name}'"
                    + (f" ({hint})" if hint else "")
                )
        if problems:
            raise PluginError("; ".join(sorted(problems)))

    def _discover_drivers(self) -> None:
        for kind, group in DRIVER_GROUPS.items():
            for ep in _list_entry_points(group):
                record = ep.record(kind)
                if not self._report_if_disabled(record):
                    self._claim(record)

    def _report_if_disabled(self, record: PluginRecord) -> bool:
        """A plugin that ``BALSAM_PLUGINS`` leaves out is listed as disabled (and not loaded)."""
        if self._selection.permits(record.name, record.distribution):
            return False
        record.status, record.error = DISABLED, self._selection.reason()
        self._other_rows.append(record)
        return True

    def _claim(self, record: PluginRecord) -> bool:
        """Put a driver in the name space; a taken name makes ``record`` a reported conflict."""
        table = self._drivers[record.kind]
        first = table.get(record.name)
        if first is None:
            table[record.name] = record
            return True
        record.status = CONFLICT
        who = first.distribution or first.source
        record.error = f"{record.kind} name '{record.name}' is already taken by {who} ({first.target}); the first one wins"
        self._other_rows.append(record)
        return False

    def _load_hook_modules(self) -> None:
        entries = _list_entry_points(HOOK_GROUP)
        wanted: list[_EntryPointInfo] = []
        for ep in entries:
            record = ep.record(HOOK_KIND)
            if self._report_if_disabled(record):
                continue
            if ep.name in self._plugins:
                record.status = CONFLICT
                record.error = f"plugin name '{ep.name}' is already taken by {self._plugins[ep.name].distribution}"
                self._other_rows.append(record)
            else:
                self._plugins[ep.name] = record
                wanted.append(ep)
        if not wanted:
            return
        by_value = {ep.value: self._plugins[ep.name] for ep in wanted}

        def failed(_manager: Any, entry_point: Any, err: BaseException) -> None:
            record = by_value.get(entry_point.value)
            if record is not None:
                record.status, record.error = FAILED, _one_line(err)

        manager = stevedore.NamedExtensionManager(
            namespace=HOOK_GROUP,
            names=[ep.name for ep in wanted],
            name_order=False,
            on_load_failure_callback=failed,
            on_missing_entrypoints_callback=None,
        )
        for ext in manager.extensions:
            record = by_value.get(ext.entry_point.value)
            if record is None or record.status != NOT_LOADED:
                continue
            self._register_hook_module(record, ext.plugin)
        for record in by_value.values():
            if record.status == NOT_LOADED:  # stale metadata: listed but not found by stevedore
                record.status, record.error = FAILED, "entry point not found (reinstall the distribution)"

    def _register_hook_module(self, record: PluginRecord, module: Any) -> None:
        try:
            self._pm.register(module, name=record.name)
        except pluggy.PluginValidationError as exc:
            # Wrong argument names in a hookimpl: as fatal as a misspelt hook name.
            raise PluginError(f"plugin '{record.name}' ({record.target}): {exc}") from None
        except ValueError as exc:
            record.status, record.error = CONFLICT, _one_line(exc)
            return
        record.status, record.obj = OK, module
        record.location = _location(module) or record.location
        record.description = record.description or _describe(module)

    def add_plugin(self, plugin: Any, name: Optional[str] = None) -> PluginRecord:
        """Register an in-process hook plugin (a module or an object), e.g. from an embedding app."""
        self.load()
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        with self._lock:
            if name in self._plugins:
                raise PluginError(f"plugin name '{name}' is already registered")
            record = PluginRecord(kind=HOOK_KIND, name=name, target=_target_of(plugin), source="registered in-process")
            self._plugins[name] = record
            self._register_hook_module(record, plugin)
            try:
                self.check_pending()
            except PluginError:
                self._pm.unregister(plugin)
                del self._plugins[name]
                raise
            self._call_register_drivers(name, plugin)
            return record

    def _impl_of(self, hook_name: str, plugin_name: str) -> Optional[Callable[..., Any]]:
        caller = getattr(self._pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            if impl.plugin_name == plugin_name:
                return impl.function
        return None

    def _call_register_drivers(self, plugin_name: str, plugin: Any) -> None:
        function = self._impl_of("balsam_register_drivers", plugin_name)
        if function is None:
            return
        record = self._plugins[plugin_name]

        def register(kind: str, name: str, driver: Any, description: str = "") -> None:
            if kind not in DRIVER_GROUPS:
                raise PluginError(f"unknown driver kind {kind!r} (kinds: {', '.join(KINDS)})")
            if not isinstance(name, str) or not name:
                raise PluginError(f"a {kind} driver needs a non-empty name, got {name!r}")
            row = PluginRecord(
                kind=kind,
                name=name,
                distribution=record.distribution,
                version=record.version,
                status=OK,
                target=_target_of(driver),
                source=f"registered by plugin {plugin_name}",
                description=description or _describe(driver),
                location=_location(driver),
                obj=driver,
            )
            self._claim(row)

        try:
            function(register=register)
        except Exception as exc:
            record.status = FAILED
            record.error = f"balsam_register_drivers: {_one_line(exc) if not isinstance(exc, PluginError) else exc}"

    # -- drivers --------------------------------------------------------------------------------
    def _resolve(self, record: PluginRecord) -> None:
        """Import an entry-point driver with stevedore (once); failures land in the record."""
        if record.status != NOT_LOADED:
            return
        group = DRIVER_GROUPS[record.kind]
        errors: list[BaseException] = []

        def failed(_manager: Any, entry_point: Any, err: BaseException) -> None:
            if entry_point.value == record.target:
                errors.append(err)

        def pick(_namespace: str, _name: str, extensions: list[Any]) -> Any:
            for ext in extensions:
                if ext.entry_point.value == record.target:
                    return ext
            return extensions[0]

        try:
            manager = stevedore.DriverManager(
                namespace=group,
                name=record.name,
                on_load_failure_callback=failed,
                on_missing_entrypoints_callback=None,
                conflict_resolver=pick,
            )
        except NoMatches:
            record.status = FAILED
            record.error = errors and _one_line(errors[0]) or "entry point not found (reinstall the distribution)"
            return
        ext = manager.extensions[0]
        if ext.entry_point.value != record.target:
            record.status, record.error = FAILED, _one_line(errors[0]) if errors else "entry point not found"
            return
        record.status, record.obj = OK, ext.plugin
        record.description = record.description or _describe(ext.plugin)
        record.location = _location(ext.plugin) or record.location

    def load_driver(self, kind: str, name: str) -> Any:
        """The driver class registered as ``name`` for ``kind``, or a one-line PluginError."""
        self.load()
        if kind not in DRIVER_GROUPS:
            hint = did_you_mean(kind, KINDS)
            raise PluginError(f"unknown driver kind '{kind}' (kinds: {', '.join(KINDS)}" + (f"; {hint})" if hint else ")"))
        with self._lock:
            record = self._drivers[kind].get(name)
            if record is None:
                disabled = [r for r in self._other_rows if r.kind == kind and r.name == name and r.status == DISABLED]
                if disabled:
                    raise PluginError(
                        f"{kind} '{name}' comes from distribution '{disabled[0].distribution}', "
                        f"which is not enabled ({disabled[0].error})"
                    )
                available = sorted(self._drivers[kind])
                hint = did_you_mean(name, available)
                listing = ", ".join(available) or "none"
                raise PluginError(f"unknown {kind} '{name}' (available: {listing}" + (f"; {hint})" if hint else ")"))
            self._resolve(record)
            if record.status != OK:
                where = record.distribution or record.source
                raise PluginError(f"{kind} '{name}' from {where} could not be loaded ({record.target}): {record.error}")
            return record.obj

    def list_drivers(self, kind: str, *, resolve: bool = True) -> dict[str, PluginRecord]:
        """Every driver name of ``kind`` -> its record (``.status``, ``.obj``, ``.description``...).

        With ``resolve`` the drivers are imported so that ``status`` says whether each one works.
        """
        self.load()
        if kind not in DRIVER_GROUPS:
            raise PluginError(f"unknown driver kind '{kind}' (kinds: {', '.join(KINDS)})")
        with self._lock:
            if resolve:
                for record in self._drivers[kind].values():
                    self._resolve(record)
            return dict(sorted(self._drivers[kind].items()))

    # -- reporting ------------------------------------------------------------------------------
    def records(self, resolve: bool = True) -> list[PluginRecord]:
        """Every hook module and driver, loaded, failed, disabled or in conflict."""
        self.load()
        with self._lock:
            rows: list[PluginRecord] = list(self._plugins.values())
            for kind in KINDS:
                for record in self._drivers[kind].values():
                    if resolve:
                        self._resolve(record)
                    rows.append(record)
            rows.extend(self._other_rows)
            order = {HOOK_KIND: -1, **{k: i for i, k in enumerate(KINDS)}}
            return sorted(rows, key=lambda r: (order.get(r.kind, 99), r.name, r.status != OK))

    def report(self) -> list[dict[str, str]]:
        """Rows for ``balsam plugins ls``: kind, name, distribution, version, status, error."""
        return [r.as_row() for r in self.records()]

    def plugin_hooks(self, plugin_name: str) -> list[str]:
        """Names of the hooks a loaded hook module implements."""
        plugin = self._pm.get_plugin(plugin_name)
        if plugin is None:
            return []
        callers = self._pm.get_hookcallers(plugin) or []
        return sorted(c.name for c in callers)

    def find(self, name: str) -> list[PluginRecord]:
        """Records whose plugin name, driver name or distribution is ``name``."""
        wanted = _normalize(name)
        return [
            r
            for r in self.records()
            if _normalize(r.name) == wanted or (r.distribution and _normalize(r.distribution) == wanted)
        ]

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
