"""``balsam login``, ``balsam logout`` and ``balsam register``: the login in the client file (mode 0600).

``balsam login`` asks the server for a refresh credential (``scope=offline_access``) so that the
agent and other long-running processes renew their access tokens without a human. It talks to
https servers with the machine's certificate authorities; a certificate no authority vouches for
is shown by its SHA-256 fingerprint and, once accepted (or given with ``--fingerprint``), pinned
for this login. Plain http is used only with this machine unless ``--insecure-http``.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import socket
import ssl
import sys
from typing import Any, Optional
from urllib.parse import urlparse

import click

from ._streams import refuse_unseen_question

DEFAULT_URL = "http://127.0.0.1:8765"
MAX_PASSWORD_ATTEMPTS = 3


def _prompt(*args: Any, **kwargs: Any) -> Any:
    """``click.prompt``, not asked when no one sees the question (``balsam login | head -0``,
    ``>&-``): an answer waiting on stdin is for a question not shown (pinning a certificate)."""
    refuse_unseen_question()
    answer = click.prompt(*args, **kwargs)
    refuse_unseen_question()  # the question's own write failed
    return answer


def _confirm(*args: Any, **kwargs: Any) -> bool:
    """``click.confirm``, not asked when no one sees the question (see :func:`_prompt`)."""
    refuse_unseen_question()
    answer = click.confirm(*args, **kwargs)
    refuse_unseen_question()
    return answer


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
    from balsam.client import APIError, RESTClient, ServerUnavailable, TransportRefused

    if settings is None or not (settings.token or settings.refresh_token):
        return False
    if not settings.refresh_token and settings.token_expired(margin_sec=60):
        return False
    client = RESTClient.from_settings(settings)
    client.retry_count = 0
    try:
        client.get("/sites/", params={"limit": 0})
        return True
    except (APIError, ServerUnavailable, TransportRefused):
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
    value = _prompt(prompt, hide_input=True, default="", show_default=False)
    return value


def _is_certificate_error(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _server_certificate(api_root: str, stored: Any, fingerprint: Optional[str], interactive: bool) -> Optional[str]:
    """The certificate to pin for an https server, or None when the machine's authorities verify it.

    A certificate no authority vouches for is accepted only if it is the one pinned before, the one
    whose fingerprint was given (``--fingerprint``), or the one the user accepts when shown.
    """
    import httpx

    from balsam.client.transport import fetch_server_certificate, fingerprint_of_pem, normalize_fingerprint

    if not api_root.startswith("https://"):
        return None
    try:
        httpx.get(f"{api_root}/auth/how", timeout=10)
        return None  # verified by the machine's certificate authorities
    except httpx.HTTPError as exc:
        if not _is_certificate_error(exc):
            return None  # not a certificate problem: the login request reports it
    try:
        pem = fetch_server_certificate(api_root)
    except OSError as exc:
        raise click.ClickException(f"cannot read the certificate of {api_root}: {exc}") from None
    seen = fingerprint_of_pem(pem)
    if stored is not None and stored.api_root.rstrip("/") == api_root and stored.server_certificate:
        if fingerprint_of_pem(stored.server_certificate) == seen:
            return pem
        if not fingerprint or normalize_fingerprint(fingerprint) != seen:
            raise click.ClickException(
                f"the certificate of {api_root} CHANGED since you pinned it (now SHA-256 {seen}); someone may be "
                "posing as the server. If its administrator confirms the new fingerprint, run "
                f"`balsam login -u {api_root} --fingerprint {seen}`")
    if fingerprint:
        if normalize_fingerprint(fingerprint) != seen:
            raise click.ClickException(f"the certificate of {api_root} has SHA-256 fingerprint {seen}, not the one given")
        click.echo(f"Pinning the certificate of {api_root} (SHA-256 {seen})")
        return pem
    click.echo(f"The certificate of {api_root} is not signed by an authority this machine trusts.")
    click.echo(f"Its SHA-256 fingerprint is {seen}")
    if not interactive:
        raise click.ClickException(
            "compare it with the one the server's administrator gives you, then log in again with "
            f"--fingerprint {seen}")
    if not _confirm("Is this the fingerprint the server's administrator gave you (pin it for this login)?",
                         default=False):
        raise click.ClickException("certificate not accepted; nothing stored")
    return pem


@click.command("login")
@click.option("-u", "--url", default=None, help=f"Balsam server URL (default: the stored one, else {DEFAULT_URL})")
@click.option("-f", "--force", is_flag=True, help="Log in again even if the stored login works")
@click.option("--username", default=None, help="Balsam username (prompted if absent)")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input")
@click.option("--fingerprint", default=None,
              help="SHA-256 fingerprint of the server certificate to pin (for a certificate no authority vouches for)")
@click.option("--insecure-http", is_flag=True,
              help="Allow plain http to a host other than this machine (password and tokens travel in clear text)")
def login(url: Optional[str], force: bool, username: Optional[str], password_stdin: bool, fingerprint: Optional[str],
          insecure_http: bool) -> None:
    """Log in to a Balsam server and store a refresh credential in the client file."""
    from balsam.client import APIError, AuthenticationError, ClientSettings, RESTClient, TransportRefused, client_path

    stored = _stored_settings()
    target = url or (stored.api_root if stored else DEFAULT_URL)
    if target.startswith("unix://"):
        # The embedded server's socket (what `balsam server start` stores): no password there.
        if not force and stored is not None and url is None and _login_works(stored):
            click.echo("You already have a good login stored, to the local server. (Use `balsam login -u URL` "
                       "for another server.)")
            return
        raise click.ClickException("the local server's login comes from `balsam server login` (it needs no "
                                   "password); for another server, `balsam login -u URL`")
    api_root = normalize_url(target)
    if not force and stored is not None and stored.api_root.rstrip("/") == api_root and _login_works(stored):
        click.echo("You already have a good login stored. (Use --force to log in again.)")
        return

    certificate = _server_certificate(api_root, stored, fingerprint, interactive=not password_stdin)
    client = RESTClient(api_root, retry_count=2, server_certificate=certificate, allow_insecure_http=insecure_http)
    try:
        methods = client.auth_methods()
    except TransportRefused as exc:
        raise click.ClickException(str(exc)) from None
    if methods and not any("password" in m for m in methods):
        raise click.ClickException(f"{api_root} offers no password login (login methods: {', '.join(methods)})")

    default_user = username or (stored.username if stored and stored.username else None) or getpass.getuser()
    attempts = 1 if password_stdin else MAX_PASSWORD_ATTEMPTS
    for attempt in range(1, attempts + 1):
        user = username or _prompt("Balsam username", default=default_user)
        password = _read_password(password_stdin)
        try:
            result = client.password_login(user, password, refresh=True, label=f"balsam login on {socket.gethostname()}")
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
        refresh_token=result.get("refresh_token"),
        refresh_expiry=_parse_expiry(result.get("refresh_expiration")),
        server_certificate=certificate,
        server_fingerprint=_fingerprint(certificate),
        allow_insecure_http=insecure_http,
        username=user,
        connect_timeout=stored.connect_timeout if stored else 6.2,
        read_timeout=stored.read_timeout if stored else 120.0,
        retry_count=stored.retry_count if stored else 10,
    )
    path = settings.save(client_path())
    if settings.refresh_token:
        expiry = (f" (renewed while in use; unused it expires {settings.refresh_expiry:%Y-%m-%d} UTC)"
                  if settings.refresh_expiry else "")
    else:
        expiry = f" (valid until {settings.token_expiry:%Y-%m-%d %H:%M} UTC)" if settings.token_expiry else ""
    click.echo(f"Logged in to {api_root} as {user}{expiry}; login stored in {path}")


def _fingerprint(certificate: Optional[str]) -> Optional[str]:
    from balsam.client.transport import fingerprint_of_pem

    return fingerprint_of_pem(certificate) if certificate else None


@click.command("logout")
def logout() -> None:
    """Revoke the stored login on the server and remove it from the client file."""
    from balsam.client import APIError, ClientSettings, RESTClient, ServerUnavailable, TransportRefused, client_path

    stored = _stored_settings()
    if stored is None or not (stored.token or stored.refresh_token):
        click.echo("Not logged in.")
        return
    client = RESTClient.from_settings(stored, settings_path=client_path())
    client.retry_count = 2
    try:
        client.post("/auth/logout")
        revoked = "revoked on the server"
    except (APIError, ServerUnavailable, TransportRefused) as exc:
        revoked = f"NOT revoked on the server ({exc}); it stops working when it expires"
    finally:
        client.close()
    cleared = ClientSettings(**{**{f: getattr(stored, f) for f in ("api_root", "client_class", "username",
                                                                   "connect_timeout", "read_timeout", "retry_count",
                                                                   "server_certificate", "server_fingerprint",
                                                                   "allow_insecure_http")}})
    path = cleared.save(client_path())
    click.echo(f"Logged out of {stored.api_root}: the login is {revoked}; removed from {path}")


#: Where `balsam register` also finds the invitation code: a process's environment is readable by
#: its owner and root only (/proc/<pid>/environ is 0400), unlike its command line.
INVITATION_ENV = "BALSAM_INVITATION"


def _read_invitation(argument: Optional[str], from_stdin: bool, interactive: bool) -> Optional[str]:
    """The invitation code, never from the command line unless the user insists: every user of the
    machine reads command lines (``ps``, /proc/<pid>/cmdline) while the command waits at its
    password prompt, and could register the account first with a password of their own."""
    if argument is not None and from_stdin:
        raise click.UsageError("give the invitation with --invitation-stdin or --invitation, not both")
    if argument is not None:
        click.echo("Warning: --invitation puts the code on the command line, where every user of this "
                   f"machine can read it (ps); use the prompt, --invitation-stdin or ${INVITATION_ENV}", err=True)
        return argument.strip() or None
    if from_stdin:
        line = sys.stdin.readline().strip()
        if not line:
            raise click.UsageError("--invitation-stdin: no invitation code on standard input")
        return line
    if os.environ.get(INVITATION_ENV, "").strip():
        return os.environ[INVITATION_ENV].strip()
    if interactive:
        return _prompt("Invitation code (Enter if you have none)", hide_input=True, default="",
                            show_default=False).strip() or None
    return None


@click.command("register")
@click.option("-a", "--address", default=None, help=f"Balsam server URL (prompted; default {DEFAULT_URL})")
@click.option("-u", "--username", default=None, help="New username (prompted if absent)")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input")
@click.option("--invitation-stdin", is_flag=True,
              help="Read the invitation code from the first line of standard input (with --password-stdin, "
                   f"the password follows on the second); also read from ${INVITATION_ENV}, else prompted for")
@click.option("--invitation", default=None,
              help="Invitation code: visible to every user of this machine while the command runs; "
                   "prefer the prompt, --invitation-stdin or $" + INVITATION_ENV)
def register(address: Optional[str], username: Optional[str], password_stdin: bool, invitation_stdin: bool,
             invitation: Optional[str]) -> None:
    """Create a user account on a Balsam server that allows it (then run `balsam login`)."""
    from balsam.client import APIError, RESTClient

    if not address:
        stored = _stored_settings()
        address = _prompt("Balsam server address", default=stored.api_root if stored else DEFAULT_URL)
    api_root = normalize_url(address or DEFAULT_URL)
    if not username:
        username = _prompt("Balsam username", default=os.environ.get("USER") or None)
    # Asked for (hidden) only at a terminal: scripts give it with --invitation-stdin or the environment.
    code = _read_invitation(invitation, invitation_stdin, interactive=not password_stdin and sys.stdin.isatty())
    if password_stdin:
        password = _read_password(True)
    else:
        password = _prompt("Balsam password", hide_input=True, confirmation_prompt=True)
    if not password:
        raise click.UsageError("the password must not be empty")
    client = RESTClient(api_root, retry_count=2)
    try:
        user = client.register(username, password, invitation=code)
    except APIError as exc:
        raise click.ClickException(f"Registration failed: {exc.detail}") from None
    click.echo(f"Registration success! {user}")
    click.echo(f"Now run: balsam login -u {api_root}")


commands = [login, logout, register]
