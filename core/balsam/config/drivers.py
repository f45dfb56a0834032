"""Build a site's drivers from its settings: the one place that turns ``scheduler.name`` +
``scheduler.options`` and ``launcher.platform`` + ``launcher.platform_options`` into instances.

The settings loader has already checked the options against the driver's ``options_schema`` (and
replaced the mapping with an instance of it); a mapping given programmatically is checked here by
:func:`balsam.options.build_options`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DRIVER_OPTION_FIELDS", "site_platform", "site_scheduler"]

#: (settings section, field naming the driver, field holding its options, driver kind).
DRIVER_OPTION_FIELDS: tuple[tuple[str, str, str, str], ...] = (
    ("scheduler", "name", "options", "scheduler"),
    ("launcher", "platform", "platform_options", "platform"),
)


def _section(settings: Any, key: str) -> Any:
    sections = getattr(settings, "sections", None)
    if isinstance(sections, dict):
        return sections.get(key)
    return getattr(settings, key, None)


def _build(settings: Any, key: str) -> Any:
    from balsam.plugins.manager import get_plugin_manager

    _key, name_field, options_field, kind = next(entry for entry in DRIVER_OPTION_FIELDS if entry[0] == key)
    section = _section(settings, key)
    if section is None:
        raise ValueError(f"settings.yml has no `{key}:` section (it is disabled)")
    driver = get_plugin_manager().load_driver(kind, getattr(section, name_field))
    return driver(options=getattr(section, options_field))


def site_scheduler(settings: Any) -> Any:
    """The scheduler driver of ``settings.scheduler`` (name and options)."""
    return _build(settings, "scheduler")


def site_platform(settings: Any) -> Any:
    """The platform driver of ``settings.launcher`` (platform and platform_options)."""
    return _build(settings, "launcher")
