"""The base class of site agent modules (entry-point group ``balsam.agent_modules``).

An agent module is enabled by a top-level section of the site's ``settings.yml`` whose key is the
module's entry-point name (``scheduler:``, ``processing:`` ...); ``null`` or an absent key disables it.
The agent builds one instance per enabled section and calls :meth:`AgentModule.run_cycle` every
:attr:`AgentModule.period` seconds in a thread of its own, until the agent stops; then it calls
:meth:`AgentModule.close` once. A third-party module is a subclass listed in its distribution's
``balsam.agent_modules`` entry points (see docs/site.md, "Writing an agent module").
"""

from __future__ import annotations

import abc
import logging
from typing import Any, ClassVar, Optional

from ..config.drivers import site_scheduler
from ..options import NoOptions

__all__ = ["AgentModule"]


class AgentModule(abc.ABC):
    """One periodic task of the site agent.

    Subclasses set :attr:`section` (the settings.yml key, normally the entry-point name) and
    implement :meth:`run_cycle`. ``self.config`` is the loaded settings section (an attrs object or a
    dict, as the section's schema says), ``self.site_config`` the site's ``SiteConfig`` and
    ``self.client`` a REST client (``balsam.client.RESTClient``) logged in as the site owner.
    """

    #: The settings.yml key that enables this module (defaults to the entry-point name).
    section: ClassVar[str] = ""
    #: Seconds between cycles when the settings section has no period of its own.
    default_period: ClassVar[float] = 10.0
    #: Names of settings fields that hold the period, tried in order.
    period_fields: ClassVar[tuple[str, ...]] = ("period", "service_period", "sync_period", "submit_period")
    #: The attrs class of this module's settings.yml section (see balsam.options): the one source of
    #: its defaults and help texts. ``self.config`` (also ``self.options``) is an instance of it.
    options_schema: ClassVar[type] = NoOptions
    #: The comment ``site init`` and ``sample-settings`` write above the section.
    section_comment: ClassVar[str] = ""
    #: Whether ``site init`` writes the section enabled (else as ``null``).
    enabled_by_default: ClassVar[bool] = False

    def __init__(self, site_config: Any, config: Any, client: Any) -> None:
        self.site_config = site_config
        self.config = config
        self.client = client
        self.logger = logging.getLogger(f"balsam.site.modules.{self.section or type(self).__name__}")

    @property
    def options(self) -> Any:
        """This module's settings section (an instance of :attr:`options_schema`)."""
        return self.config

    def site_scheduler(self) -> Any:
        """The site's scheduler driver, built from settings.yml's ``scheduler`` section (name and options)."""
        return site_scheduler(self.site_config.settings)

    @property
    def name(self) -> str:
        return self.section or type(self).__name__

    @property
    def site_id(self) -> int:
        return int(self.site_config.site_id)

    @property
    def period(self) -> float:
        for field in self.period_fields:
            value = _config_value(self.config, field)
            if value is not None:
                return float(value)
        return float(self.default_period)

    @abc.abstractmethod
    def run_cycle(self) -> Optional[float]:
        """Do one round of work. Return None to wait :attr:`period`, or the seconds until the next cycle
        (0 when more work is waiting). An exception is logged by the agent, which carries on."""

    def close(self) -> None:
        """Release what the module holds (sessions, worker pools). Called once when the agent stops."""

    def describe(self) -> str:
        return f"{self.name} (every {self.period:g} s)"


def _config_value(config: Any, field: str) -> Any:
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(field)
    return getattr(config, field, None)

