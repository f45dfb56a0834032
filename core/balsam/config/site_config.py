"""A site directory on disk: where it is, its settings, its sub-directories and its API id."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .settings import LAUNCHER_SECTIONS, Settings, load_settings

__all__ = ["SITE_MARKER", "SiteConfig", "SiteNotFoundError"]

#: The file that marks a directory as a site; it holds the site's API id.
SITE_MARKER = ".balsam-site"
SITE_PATH_ENV = "BALSAM_SITE_PATH"


class SiteNotFoundError(Exception):
    """No site directory where one was expected. The message says where we looked."""


class SiteConfig:
    """A Balsam site: ``site_path`` with ``.balsam-site``, ``settings.yml``, ``data/``, ``log/``, ``qsubmit/``.

    ``SiteConfig()`` finds the site from ``$BALSAM_SITE_PATH`` or by walking up from the current
    directory; ``SiteConfig(path)`` uses ``path``. Settings are read on first access of
    ``.settings`` (a :class:`~balsam.config.SettingsError` names the file and line of a problem).
    """

    def __init__(self, site_path: Union[str, os.PathLike, None] = None, settings: Optional[Settings] = None) -> None:
        self.site_path: Path = self.resolve_site_path(site_path)
        self._settings = settings
        self._launcher_settings: Optional[Settings] = None
        self._client: Any = None

    @staticmethod
    def resolve_site_path(path: Union[str, os.PathLike, None] = None) -> Path:
        """The site directory: ``path``, else ``$BALSAM_SITE_PATH``, else the nearest parent of the cwd
        holding ``.balsam-site``. Raises SiteNotFoundError saying what was tried."""
        if path is not None:
            candidate = Path(path).expanduser().resolve()
            if not (candidate / SITE_MARKER).is_file():
                raise SiteNotFoundError(f"{candidate} is not a Balsam site (no {SITE_MARKER} file in it)")
            return candidate
        env_path = os.environ.get(SITE_PATH_ENV)
        if env_path:
            candidate = Path(env_path).expanduser().resolve()
            if not (candidate / SITE_MARKER).is_file():
                raise SiteNotFoundError(
                    f"{SITE_PATH_ENV}={env_path} is not a Balsam site (no {SITE_MARKER} file in it)"
                )
            return candidate
        cwd = Path.cwd().resolve()
        for directory in (cwd, *cwd.parents):
            if (directory / SITE_MARKER).is_file():
                return directory
        raise SiteNotFoundError(
            f"not inside a Balsam site: no {SITE_MARKER} in {cwd} or its parents and {SITE_PATH_ENV} is not set "
            "(cd into a site, pass its path, or create one with `balsam site init`)"
        )

    @property
    def settings_path(self) -> Path:
        return self.site_path / "settings.yml"

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            # Warnings unlogged: the agent module of the section logs them into the agent's log.
            self._settings = load_settings(self.settings_path, log_warnings=False)
        return self._settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        self._settings = value

    @property
    def launcher_settings(self) -> Settings:
        """What a launcher reads: the core sections only (``logging``, ``filter_tags``,
        ``launcher``), checked as :attr:`settings` checks them, without importing the agent
        modules for the schemas of the other sections (most of reading :attr:`settings`)."""
        if self._settings is not None:
            return self._settings
        if self._launcher_settings is None:
            self._launcher_settings = load_settings(self.settings_path, only=LAUNCHER_SECTIONS, log_warnings=False)
        return self._launcher_settings

    @property
    def client(self) -> Any:
        """The REST client (:class:`balsam.client.RESTClient`), made on first access and kept.

        Balsam 0.7's docs tell app hooks to use ``SiteConfig().client`` and its bound models
        (``client.Job``, ``client.App``, ``client.BatchJob``, ``client.Site``, ``client.EventLog``
        ...) rather than ``balsam.api``. 0.7 read the login in the constructor; here it is read on
        first use, so a SiteConfig made without a login (``balsam site init``, a launcher's
        settings) still works. It is the process's default client (the stored login, or the one
        :func:`balsam.api.set_default_client` set), so hooks talk to the server their agent uses.
        Raises :class:`balsam.client.NotLoggedIn` without a login."""
        if self._client is None:
            from balsam.client.default import get_default_client  # not at import: the client is only loaded when used

            self._client = get_default_client()
        return self._client

    @client.setter
    def client(self, value: Any) -> None:
        # 0.7's SiteConfig had a plain attribute: code that assigned its own client keeps working.
        self._client = value

    def reload_settings(self) -> Settings:
        self._settings = None
        self._launcher_settings = None
        return self.settings

    @property
    def site_id(self) -> Optional[int]:
        """The API id stored in ``.balsam-site`` (a bare integer, or ``site_id: N``); None when empty."""
        marker = self.site_path / SITE_MARKER
        text = marker.read_text().strip()
        if not text:
            return None
        if text.isdecimal():
            return int(text)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict) and str(data.get("site_id", "")).isdecimal():
            return int(data["site_id"])
        raise SiteNotFoundError(f"{marker}: expected the site id (an integer), got {text.splitlines()[0]!r}")

    @property
    def data_path(self) -> Path:
        return self.site_path / "data"

    @property
    def log_path(self) -> Path:
        return self.site_path / "log"

    @property
    def spool_path(self) -> Path:
        """Job updates a launcher could not send at shutdown (the agent sends them later)."""
        return self.site_path / "spool"

    @property
    def job_path(self) -> Path:
        """Where rendered batch scripts go (``qsubmit/``)."""
        return self.site_path / "qsubmit"

    @property
    def job_template_path(self) -> Path:
        scheduler = self.settings.sections.get("scheduler")
        relative = getattr(scheduler, "job_template_path", None) or "job-template.sh"
        return self.site_path / relative

    @property
    def pid_path(self) -> Path:
        return self.site_path / "balsam-service.pid"

    def __getstate__(self) -> dict:
        # A SiteConfig sent to another process (a worker) leaves its client behind: a client holds
        # locks and sockets, and the other process makes its own on first use.
        return {**self.__dict__, "_client": None}

    def __repr__(self) -> str:
        return f"SiteConfig({str(self.site_path)!r})"
