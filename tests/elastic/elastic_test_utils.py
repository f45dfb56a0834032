"""Helpers of the elastic-queue tests (a module of its own: conftest modules are not importable by name)."""

from __future__ import annotations

import pytest


def core_defines_the_section() -> bool:
    """True while the core still declares ``elastic_queue`` itself (before issue 8's loader reads
    agent-module sections from their ``options_schema``): settings.yml then knows 0.7's keys only."""
    import balsam.config

    return hasattr(balsam.config, "ElasticQueueSettings")


#: For tests that set ``strategy``/``strategy_options`` in settings.yml.
needs_module_sections = pytest.mark.skipif(
    core_defines_the_section(), reason="settings.yml's elastic_queue section is still the core's (0.7 keys only)")

