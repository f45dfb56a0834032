"""The stored login (``client.yml``): where it lives, how it is read and written.

Path: ``$BALSAM_CLIENT_PATH``, else ``$BALSAM_HOME/client.yml``, else ``~/.balsam/client.yml``.
The file holds a bearer token, so it is written with mode 0600 in a 0700 directory.
Keys are those of Balsam 0.7 (``api_root, client_class, token, token_expiry, connect_timeout,
read_timeout, retry_count``) plus:

- ``username``;
- ``refresh_token`` / ``refresh_expiry``: the long-lived, revocable refresh credential that the
  client exchanges for short access tokens (so a site agent runs unattended for weeks);
- ``credential_id``: the server's id of a launcher credential (files the site agent writes);
- ``server_certificate`` / ``server_fingerprint``: the HTTPS server certificate pinned at login
  (PEM and SHA-256), for servers whose certificate no authority on this machine vouches for;
- ``allow_insecure_http``: send credentials over plain http to a host that is not this machine
  (off unless ``balsam login --insecure-http``).

``api_root`` is ``https://...``, ``http://...`` or ``unix:///path/to/balsam.sock`` (the embedded
server's socket in a private directory).
"""

from __future__ import annotations

import datetime as dt
import difflib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import attrs

logger = logging.getLogger(__name__)

NOT_LOGGED_IN = "Not logged in: run `balsam login` (or `balsam server start` for a local server)"
DEFAULT_CLIENT_CLASS = "balsam.client.RESTClient"
#: Warnings about a login file already logged by this process (each once, not at every load).
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning("%s", message)


class ClientSettingsError(RuntimeError):
    """The client file is missing or cannot be used (message says which and why)."""


class NotLoggedIn(ClientSettingsError):
    def __init__(self, detail: str = "") -> None:
        super().__init__(NOT_LOGGED_IN + (f" ({detail})" if detail else ""))


def balsam_home() -> Path:
    return Path(os.environ.get("BALSAM_HOME") or Path.home() / ".balsam").expanduser()


def client_path() -> Path:
    env = os.environ.get("BALSAM_CLIENT_PATH")
    if env:
        return Path(env).expanduser()
    return balsam_home() / "client.yml"


@attrs.define(kw_only=True)
class ClientSettings:
    api_root: str
    client_class: str = DEFAULT_CLIENT_CLASS
    token: Optional[str] = None
    token_expiry: Optional[dt.datetime] = None
    username: Optional[str] = None
    connect_timeout: float = 6.2
    read_timeout: float = 120.0
    retry_count: int = 10
    refresh_token: Optional[str] = None
    refresh_expiry: Optional[dt.datetime] = None
    credential_id: Optional[int] = None
    server_certificate: Optional[str] = None
    server_fingerprint: Optional[str] = None
    allow_insecure_http: bool = False

    @classmethod
    def load(cls, path: "Path | str | None" = None) -> "ClientSettings":
        path = Path(path) if path is not None else client_path()
        if not path.is_file():
            raise NotLoggedIn(f"no login file at {path}")
        import yaml  # here, not at the top: ~10 ms that a run() job which never reads client.yml does not need

        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ClientSettingsError(f"{path}: cannot read the stored login: {exc}") from None
        if not isinstance(data, dict) or not data.get("api_root"):
            raise ClientSettingsError(f"{path}: the stored login has no api_root; run `balsam login` again")
        known = {f.name for f in attrs.fields(cls)}
        cls._warn_about_keys(path, data, known)
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in known and v is not None}
        try:
            for name in ("token_expiry", "refresh_expiry"):
                if name in kwargs and not isinstance(kwargs[name], dt.datetime):
                    kwargs[name] = dt.datetime.fromisoformat(str(kwargs[name]).replace("Z", "+00:00"))
            kwargs["allow_insecure_http"] = bool(kwargs.get("allow_insecure_http", False))
            for name, kind in (("connect_timeout", float), ("read_timeout", float), ("retry_count", int),
                               ("credential_id", int)):
                if name in kwargs:
                    kwargs[name] = kind(kwargs[name])
        except (TypeError, ValueError) as exc:
            raise ClientSettingsError(f"{path}: bad value in the stored login: {exc}") from None
        return cls(**kwargs)

    @staticmethod
    def _warn_about_keys(path: Path, data: dict, known: "set[str]") -> None:
        """One warning line (once per process) for each key the client does not use: a key it does
        not know (a misspelling: it would silently do nothing), and ``client_class`` set to another
        class (Balsam 0.7 built that class; this client is always the REST client)."""
        for key in data:
            if str(key) in known:
                continue
            match = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean '{match[0]}'?" if match else f"known keys: {', '.join(sorted(known))}"
            _warn_once(f"{path}: unknown key '{key}' is ignored ({hint})")
        client_class = data.get("client_class")
        if client_class is not None and client_class != DEFAULT_CLIENT_CLASS:
            _warn_once(f"{path}: client_class {client_class!r} is ignored (kept for Balsam 0.7 compatibility; the "
                       f"client is always {DEFAULT_CLIENT_CLASS}); `balsam login` writes the default")

    # Balsam 0.7's names (``from balsam.config import ClientSettings``;
    # ``ClientSettings.load_from_file().build_client()`` in its docs and users' scripts).
    @classmethod
    def load_from_file(cls, path: "Path | str | None" = None) -> "ClientSettings":
        return cls.load(path)

    def save_to_file(self, path: "Path | str | None" = None) -> Path:
        return self.save(path)

    def build_client(self) -> Any:
        """A :class:`~balsam.client.RESTClient` for this login (0.7's ``build_client``)."""
        from .rest import RESTClient  # rest imports this module

        return RESTClient.from_settings(self)

    def to_yaml_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        for name in ("token_expiry", "refresh_expiry"):
            expiry = getattr(self, name)
            if expiry is not None:
                if expiry.tzinfo is None:
                    expiry = expiry.replace(tzinfo=dt.timezone.utc)
                data[name] = expiry.isoformat()
        # Keep the file short and 0.7-shaped: optional keys only when set.
        for name in ("refresh_token", "refresh_expiry", "credential_id", "server_certificate", "server_fingerprint"):
            if data[name] is None:
                del data[name]
        if not data["allow_insecure_http"]:
            del data["allow_insecure_http"]
        return data

    def save(self, path: "Path | str | None" = None) -> Path:
        """Write atomically with mode 0600 (directory 0700)."""
        import yaml  # see load()

        path = Path(path) if path is not None else client_path()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".client-", suffix=".yml")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as fp:
                yaml.safe_dump(self.to_yaml_dict(), fp, sort_keys=False)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        os.chmod(path, 0o600)
        return path

    def token_expired(self, margin_sec: float = 0.0) -> bool:
        if self.token_expiry is None:
            return False
        expiry = self.token_expiry
        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=dt.timezone.utc)
        return expiry - dt.timedelta(seconds=margin_sec) <= dt.datetime.now(dt.timezone.utc)


def store_refreshed_token(path: "Path | str | None", refresh_token: str, token: str,
                          token_expiry: Optional[dt.datetime], refresh_expiry: Optional[dt.datetime]) -> bool:
    """Write a refreshed access token into the login file, but only if the file still holds this
    refresh credential (a newer ``balsam login`` or ``balsam logout`` wins). True if written."""
    # Only token refreshes need the lock (filelock: ~15 ms of every client's, and launcher's, start).
    import filelock

    path = Path(path) if path is not None else client_path()
    try:
        with filelock.FileLock(str(path) + ".lock", timeout=10):
            try:
                settings = ClientSettings.load(path)
            except ClientSettingsError:
                return False
            if settings.refresh_token != refresh_token:
                return False
            settings.token, settings.token_expiry = token, token_expiry
            if refresh_expiry is not None:
                settings.refresh_expiry = refresh_expiry
            settings.save(path)
            return True
    except (filelock.Timeout, OSError):
        return False  # the token still works in this process; others refresh on their own
