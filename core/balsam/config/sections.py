"""The settings-section registry: which top-level keys settings.yml may have, and their schemas.

Two sources, nothing else:

* the core sections (``logging``, ``filter_tags``, ``launcher``), declared here;
* one section per installed agent module (entry-point group ``balsam.agent_modules``): the key is
  the entry-point name, the schema the class's ``options_schema``, the comment its
  ``section_comment``, and ``enabled_by_default`` says whether ``site init`` writes it enabled.
  Present enables the module; ``null`` or absent disables it.

A top-level key that is neither is an *orphan*: nothing would act on it, so the loader refuses it
when it is enabled (see :func:`orphan_message`).
"""

from __future__ import annotations

import typing
from typing import Any, Optional

import attrs

from .schema import LauncherSettings, LoggingSettings

__all__ = ["CORE_SECTIONS", "FILTER_TAGS_TYPE", "SectionSpec", "core_section_keys", "orphan_message", "section_specs"]

FILTER_TAGS_TYPE = dict[str, str]


@attrs.define
class SectionSpec:
    """One top-level key of settings.yml."""

    key: str
    #: An attrs class, or a plain type such as ``dict[str, str]`` (filter_tags).
    schema: Any
    comment: str = ""
    #: Distribution that provides the section ("core" for the core sections).
    plugin: str = "core"
    #: In a new settings.yml: written with its defaults (True) or as ``key: null`` (False).
    enabled_by_default: bool = True
    #: None is allowed (and absence means None): the key enables an agent module.
    disableable: bool = False
    #: Why the agent module behind this section cannot be loaded ("" when it can).
    error: str = ""

    def default(self) -> Any:
        if attrs.has(self.schema):
            return self.schema()
        if typing.get_origin(self.schema) is dict:
            return {}
        return None


CORE_SECTIONS: tuple[SectionSpec, ...] = (
    SectionSpec("logging", LoggingSettings, "Logging of the site agent and its launchers."),
    SectionSpec(
        "filter_tags",
        FILTER_TAGS_TYPE,
        "This site only runs jobs whose tags include all of these (e.g. {workflow: demo}); {} runs every job.",
    ),
    SectionSpec("launcher", LauncherSettings, "Pilot-job launchers: platform plugin and job placement."),
)


#: The core's own agent modules, in the order a new settings.yml shows them; other modules follow
#: by name.
BUILTIN_MODULE_ORDER = ("scheduler", "processing", "transfers", "file_cleaner", "queue_maintainer")


def core_section_keys() -> list[str]:
    return [s.key for s in CORE_SECTIONS]


def section_specs() -> list[SectionSpec]:
    """The core sections, then one per installed agent module (the core's first)."""
    from balsam.plugins.manager import get_plugin_manager

    specs = list(CORE_SECTIONS)
    reserved = set(core_section_keys())
    modules = get_plugin_manager().list_drivers("agent_module")
    order = {name: index for index, name in enumerate(BUILTIN_MODULE_ORDER)}
    for name in sorted(modules, key=lambda n: (order.get(n, len(order)), n)):
        record = modules[name]
        if name in reserved:  # never overrides a core section; `balsam plugins ls` shows why it is unused
            record.error = f"agent module name '{name}' is a core settings section: the module is never enabled"
            continue
        cls = record.obj if record.status == "ok" else None
        schema = getattr(cls, "options_schema", None)
        if cls is not None and not attrs.has(schema):
            record.error = f"options_schema {schema!r} is not an attrs class"
            cls = None
        if cls is None:
            specs.append(
                SectionSpec(
                    key=name,
                    schema=None,
                    plugin=record.distribution,
                    enabled_by_default=False,
                    disableable=True,
                    error=record.error or record.status,
                )
            )
            continue
        specs.append(
            SectionSpec(
                key=name,
                schema=schema,
                comment=str(getattr(cls, "section_comment", "") or ""),
                plugin=record.distribution,
                enabled_by_default=bool(getattr(cls, "enabled_by_default", False)),
                disableable=True,
            )
        )
    return specs


def orphan_message(key: str, suggestion: Optional[str] = None) -> str:
    """The one-line reason an enabled section that no installed agent module consumes is refused."""
    # Here, as in section_specs: balsam.plugins imports pluggy and stevedore, which a launcher
    # reading its settings (balsam.config) does not need.
    from balsam.plugins.manager import get_plugin_manager
    from balsam.plugins.report import DISABLED

    # An installed module that BALSAM_PLUGINS (or BALSAM_DISABLE_PLUGIN_AUTOLOAD) leaves out: "install
    # the distribution" sent the user after one that is installed.
    left_out = [r for r in get_plugin_manager().records(resolve=False)
                if r.kind == "agent_module" and r.name == key and r.status == DISABLED]
    if left_out:
        return (f"the agent module '{key}' of {left_out[0].distribution} is installed but not enabled "
                f"({left_out[0].error}): enable that distribution, or set this section to null")
    hint = f"did you mean '{suggestion}'? If not, install" if suggestion else "install"
    return (
        f"no installed agent module consumes this section ({hint} the distribution that provides the "
        f"'{key}' agent module, or set it to null)"
    )
