"""Balsam's plugin system: pluggy hooks (``hookspecs``) and named drivers (``manager``)."""

from .hookspecs import hookimpl, hookspec
from .manager import (
    DRIVER_GROUPS,
    HOOK_GROUP,
    KINDS,
    PluginError,
    PluginManager,
    PluginRecord,
    get_plugin_manager,
    reset_plugin_manager,
)

__all__ = [
    "DRIVER_GROUPS",
    "HOOK_GROUP",
    "KINDS",
    "PluginError",
    "PluginManager",
    "PluginRecord",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "reset_plugin_manager",
]
