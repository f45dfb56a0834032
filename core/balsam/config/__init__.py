"""Balsam configuration: balsam home, the settings.yml schema and loader, and SiteConfig."""

from .paths import balsam_home
from .schema import (
    AGENT_MODULE_SECTIONS,
    AllowedQueue,
    ElasticQueueSettings,
    FileCleanerSettings,
    LauncherSettings,
    LoggingSettings,
    ProcessingSettings,
    QueueMaintainerSettings,
    SchedulerSettings,
    TransferSettings,
    setting,
)
from .settings import (
    CORE_SECTIONS,
    Settings,
    SettingsError,
    core_section_keys,
    load_settings,
    loads_settings,
    parse_settings,
    render_sample_settings,
    render_settings_yaml,
    section_specs,
)
from .site_config import SITE_MARKER, SiteConfig, SiteNotFoundError

__all__ = [
    "AGENT_MODULE_SECTIONS",
    "AllowedQueue",
    "CORE_SECTIONS",
    "ElasticQueueSettings",
    "FileCleanerSettings",
    "LauncherSettings",
    "LoggingSettings",
    "ProcessingSettings",
    "QueueMaintainerSettings",
    "SITE_MARKER",
    "SchedulerSettings",
    "Settings",
    "SettingsError",
    "SiteConfig",
    "SiteNotFoundError",
    "TransferSettings",
    "balsam_home",
    "core_section_keys",
    "load_settings",
    "loads_settings",
    "parse_settings",
    "render_sample_settings",
    "render_settings_yaml",
    "section_specs",
    "setting",
]
