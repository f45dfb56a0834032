"""``balsam dashboard``: open the web dashboard of the server you are logged in to.

It asks the server (with your stored login) for a one-time login link valid for two minutes and
prints it, or opens it with ``--open``. Users of a shared server with a password can also go to
``<server>/dashboard/`` and log in there.
"""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit

import click


def _ssh_hint(api_root: str) -> str:
    parts = urlsplit(api_root)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    if host not in ("127.0.0.1", "localhost", "::1"):
        return ""
    return (f"The server listens on this machine only. From your laptop, forward its port first:\n"
            f"  ssh -L {port}:127.0.0.1:{port} <this-login-node>\n"
            f"then open the link in your laptop's browser.")


def _browser_root(api_root: str) -> str:
    """Where a browser reaches the server: the embedded server's TCP address when the client talks to
    it through its Unix socket (browsers cannot), else the client's own address."""
    from balsam.client.transport import is_unix

    if not is_unix(api_root):
        return api_root
    from .server import _info

    info = _info()
    if info.get("api_root") == api_root and info.get("url"):
        return str(info["url"])
    raise click.ClickException("the local server has no TCP port for browsers: restart it with one "
                               "(`balsam server stop; balsam server start --port 8765`)")


@click.command("dashboard")
@click.option("--open", "open_browser", is_flag=True, help="Open the link in a browser on this machine.")
def dashboard(open_browser: bool) -> None:
    """Print a one-time login link to the web dashboard (valid for two minutes)."""
    from balsam._api.model import get_default_client

    client = get_default_client()
    # The client's api_root already carries any path prefix of a reverse proxy.
    root = _browser_root(client.api_root)
    answer = client.post("/dashboard/login-link")
    link = f"{root.rstrip('/')}/dashboard/ticket?{urlencode({'t': answer['ticket']})}"
    click.echo(f"Dashboard login link (valid {int(answer.get('expires_in', 120))} s, one browser session):")
    click.echo(f"  {link}")
    hint = _ssh_hint(root)
    if hint and not open_browser:
        click.echo(hint)
    if open_browser:
        import webbrowser

        if not webbrowser.open(link):
            click.echo("No browser could be started here; open the link above by hand.", err=True)


commands = [dashboard]
