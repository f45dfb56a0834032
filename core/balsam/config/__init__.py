"""Balsam configuration: balsam home, the settings.yml schema and loader, and SiteConfig.

The schemas of agent-module sections live next to their modules (``options_schema``); see
:mod:`balsam.config.sections` for how settings.yml's top-level keys are found.
"""

from .drivers import site_platform, site_scheduler
from .paths import balsam_home
from .schema import AllowedQueue, LauncherSettings, LoggingSettings, setting
from .sections import CORE_SECTIONS, SectionSpec, core_section_keys, section_specs
from .settings import (
    LAUNCHER_SECTIONS,
    Settings,
    SettingsError,
    SettingsWarning,
    load_settings,
    loads_settings,
    parse_settings,
    render_sample_settings,
    render_settings_yaml,
)
from .site_config import SITE_MARKER, SiteConfig, SiteNotFoundError

__all__ = [
    "AllowedQueue",
    "CORE_SECTIONS",
    "LAUNCHER_SECTIONS",
    "LauncherSettings",
    "LoggingSettings",
    "SITE_MARKER",
    "SectionSpec",
    "Settings",
    "SettingsError",
    "SettingsWarning",
    "SiteConfig",
    "SiteNotFoundError",
    "balsam_home",
    "core_section_keys",
    "load_settings",
    "loads_settings",
    "parse_settings",
    "render_sample_settings",
    "render_settings_yaml",
    "section_specs",
    "setting",
    "site_platform",
    "site_scheduler",
]


def __getattr__(name: str):
    # Balsam 0.7 kept the client's login settings here (``from balsam.config import ClientSettings``);
    # they live in balsam.client now. Imported on use: most users of balsam.config never need the client.
    if name == "ClientSettings":
        from balsam.client import ClientSettings

        return ClientSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
