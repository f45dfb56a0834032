"""App classes for the site agent: fetched in bulk by id, deserialized once, and inspected.

The processing module needs to know, per app, which hooks the user overrode (jobs whose hook is the
default are moved in bulk, with no worker process) and whether it is a ``run()`` app (its results
are read from ``job.out``). The file cleaner needs ``cleanup_files``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable, Optional

from .service_client import list_all

logger = logging.getLogger(__name__)

HOOK_NAMES = ("preprocess", "postprocess", "handle_error", "handle_timeout")


def application_definition_base() -> type:
    from ..api import ApplicationDefinition

    return ApplicationDefinition


def load_app_class(app_record: dict) -> type:
    """The ApplicationDefinition subclass stored in an App record (raises with a one-line reason)."""
    base = application_definition_base()
    loader = getattr(base, "from_serialized", None)
    if loader is None:  # pragma: no cover - the client API always has it
        raise RuntimeError("balsam.api.ApplicationDefinition has no from_serialized()")
    try:
        return loader(app_record)
    except TypeError:
        # Some versions take the App model rather than its dict.
        from ..api import App  # type: ignore[attr-defined]

        return loader(App._from_api(app_record))  # type: ignore[attr-defined]


def overridden_hooks(app_cls: type) -> frozenset[str]:
    """Names of the hooks that ``app_cls`` (or a user base class of it) defines itself."""
    base = application_definition_base()
    found = set()
    for name in HOOK_NAMES:
        for klass in app_cls.__mro__:
            if klass is base or klass is object:
                break
            if name in vars(klass):
                found.add(name)
                break
    return frozenset(found)


def is_python_app(app_cls: type) -> bool:
    template = getattr(app_cls, "command_template", None)
    run = getattr(app_cls, "run", None)
    return not template and callable(run)


class AppInfo:
    __slots__ = ("app_id", "record", "cls", "hooks", "python_app", "error")

    def __init__(self, app_id: int, record: Optional[dict], cls: Optional[type], error: Optional[str]) -> None:
        self.app_id = app_id
        self.record = record
        self.cls = cls
        self.error = error
        self.hooks = overridden_hooks(cls) if cls is not None else frozenset()
        self.python_app = is_python_app(cls) if cls is not None else False


class AppCache:
    """App id -> :class:`AppInfo`, fetched with one GET per batch of unknown ids."""

    #: Seconds an app class is trusted before it is fetched again (users re-sync changed apps): the
    #: launchers' limit too (``balsam.launcher.app_run.APP_REFRESH_SEC``), so that a re-synced app's
    #: hooks and runs change together. One small request per 10 s while hooks run.
    ttl_sec = 10.0

    def __init__(self, client: Any) -> None:
        self.client = client
        self._infos: dict[int, AppInfo] = {}
        self._fetched: dict[int, float] = {}
        self._lock = threading.Lock()

    def prefetch(self, app_ids: Iterable[int]) -> None:
        now = time.monotonic()
        wanted = {int(a) for a in app_ids}
        missing = sorted(a for a in wanted if a not in self._infos or now - self._fetched.get(a, 0) > self.ttl_sec)
        if not missing:
            return
        records = {r["id"]: r for r in list_all(self.client, "/apps/", {"id": missing})}
        with self._lock:
            for app_id in missing:
                self._fetched[app_id] = now
                old = self._infos.get(app_id)
                if old is not None and old.record is not None and old.record == records.get(app_id):
                    continue
                record = records.get(app_id)
                if record is None:
                    self._infos[app_id] = AppInfo(app_id, None, None, f"app {app_id} does not exist")
                    continue
                try:
                    cls = load_app_class(record)
                    self._infos[app_id] = AppInfo(app_id, record, cls, None)
                except Exception as exc:
                    message = f"app {record.get('name', app_id)} (id {app_id}) cannot be loaded: {exc}"
                    logger.warning(message)
                    self._infos[app_id] = AppInfo(app_id, record, None, message)

    def info(self, app_id: int) -> AppInfo:
        self.prefetch([app_id])
        return self._infos[int(app_id)]

    def app_class(self, app_id: int) -> type:
        info = self.info(app_id)
        if info.cls is None:
            raise RuntimeError(info.error or f"app {app_id} cannot be loaded")
        return info.cls

    def forget(self, app_id: int) -> None:
        with self._lock:
            self._infos.pop(int(app_id), None)
