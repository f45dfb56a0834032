"""``balsam login`` and ``balsam register``: store a login in the client file (mode 0600)."""

from __future__ import annotations

import datetime as dt
import getpass
import os
import sys
from typing import Any, Optional
from urllib.parse import urlparse

import click

DEFAULT_URL = "http://127.0.0.1:8765"
MAX_PASSWORD_ATTEMPTS = 3


def normalize_url(url: str) -> str:
    """Add a scheme if missing: http for this machine, https for anything else."""
    url = url.strip().rstrip("/")
    if not url:
        raise click.UsageError("the server URL is empty")
    if "://" not in url:
        host = url.split("/")[0].split(":")[0]
        scheme = "http" if host in ("localhost", "127.0.0.1", "::1", "[::1]") else "https"
        url = f"{scheme}://{url}"
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise click.UsageError(f"not an http(s) URL: {url}")
    return url


def _stored_settings() -> Any:
    from balsam.client import ClientSettings

    try:
        return ClientSettings.load()
    except Exception:  # noqa: BLE001 - no or unreadable login: nothing stored
        return None


def _login_works(settings: Any) -> bool:
    from balsam.client import APIError, RESTClient, ServerUnavailable

    if settings is None or not settings.token or settings.token_expired(margin_sec=60):
        return False
    client = RESTClient.from_settings(settings)
    client.retry_count = 0
    try:
        client.get("/sites/", params={"limit": 0})
        return True
    except (APIError, ServerUnavailable):
        return False
    finally:
        client.close()


def _parse_expiry(value: Any) -> Optional[dt.datetime]:
    from balsam.serialization import parse_datetime

    if value in (None, ""):
        return None
    try:
        return parse_datetime(value)
    except ValueError:
        return None


def _read_password(password_stdin: bool, prompt: str = "Balsam password") -> str:
    if password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise click.UsageError("--password-stdin: no password on standard input")
        return line.rstrip("\r\n")
    value = click.prompt(prompt, hide_input=True, default="", show_default=False)
    return value


@click.command("login")
@click.option("-u", "--url", default=None, help=f"Balsam server URL (default: the stored one, else {DEFAULT_URL})")
@click.option("-f", "--force", is_flag=True, help="Log in again even if the stored login works")
@click.option("--username", default=None, help="Balsam username (prompted if absent)")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input")
def login(url: Optional[str], force: bool, username: Optional[str], password_stdin: bool) -> None:
    """Log in to a Balsam server and store the token in the client file."""
    from balsam.client import APIError, AuthenticationError, ClientSettings, RESTClient, client_path

    stored = _stored_settings()
    api_root = normalize_url(url or (stored.api_root if stored else DEFAULT_URL))
    if not force and stored is not None and stored.api_root.rstrip("/") == api_root and _login_works(stored):
        click.echo("You already have a good login stored. (Use --force to log in again.)")
        return

    client = RESTClient(api_root, retry_count=2)
    methods = client.auth_methods()
    if methods and not any("password" in m for m in methods):
        raise click.ClickException(f"{api_root} offers no password login (login methods: {', '.join(methods)})")

    default_user = username or (stored.username if stored and stored.username else None) or getpass.getuser()
    attempts = 1 if password_stdin else MAX_PASSWORD_ATTEMPTS
    for attempt in range(1, attempts + 1):
        user = username or click.prompt("Balsam username", default=default_user)
        password = _read_password(password_stdin)
        try:
            result = client.password_login(user, password)
            break
        except AuthenticationError as exc:
            remaining = attempts - attempt
            if remaining <= 0:
                raise click.ClickException(f"Login failed: wrong username or password ({exc.detail})") from None
            click.echo(f"Wrong username or password; {remaining} attempt(s) left.", err=True)
        except APIError as exc:
            raise click.ClickException(f"Login failed: {exc}") from None
    else:  # pragma: no cover - the loop always breaks or raises
        raise click.ClickException("Login failed")

    settings = ClientSettings(
        api_root=api_root,
        token=result["access_token"],
        token_expiry=_parse_expiry(result.get("expiration")),
        username=user,
        connect_timeout=stored.connect_timeout if stored else 6.2,
        read_timeout=stored.read_timeout if stored else 120.0,
        retry_count=stored.retry_count if stored else 10,
    )
    path = settings.save(client_path())
    expiry = f" (valid until {settings.token_expiry:%Y-%m-%d %H:%M} UTC)" if settings.token_expiry else ""
    click.echo(f"Logged in to {api_root} as {user}{expiry}; login stored in {path}")


@click.command("register")
@click.option("-a", "--address", default=None, help=f"Balsam server URL (prompted; default {DEFAULT_URL})")
@click.option("-u", "--username", default=None, help="New username (prompted if absent)")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input")
def register(address: Optional[str], username: Optional[str], password_stdin: bool) -> None:
    """Create a user account on a Balsam server (then run `balsam login`)."""
    from balsam.client import APIError, RESTClient

    if not address:
        stored = _stored_settings()
        address = click.prompt("Balsam server address", default=stored.api_root if stored else DEFAULT_URL)
    api_root = normalize_url(address or DEFAULT_URL)
    if not username:
        username = click.prompt("Balsam username", default=os.environ.get("USER") or None)
    if password_stdin:
        password = _read_password(True)
    else:
        password = click.prompt("Balsam password", hide_input=True, confirmation_prompt=True)
    if not password:
        raise click.UsageError("the password must not be empty")
    client = RESTClient(api_root, retry_count=2)
    try:
        user = client.register(username, password)
    except APIError as exc:
        raise click.ClickException(f"Registration failed: {exc.detail}") from None
    click.echo(f"Registration success! {user}")
    click.echo(f"Now run: balsam login -u {api_root}")


commands = [login, register]
