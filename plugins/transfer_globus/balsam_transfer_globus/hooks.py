"""Hook module of the Globus plugin: adds ``balsam site globus-login`` to the command line."""

from __future__ import annotations

import os
from typing import Any, Optional

import click

from balsam.plugins.hookspecs import hookimpl

CLIENT_ID_ENV = "BALSAM_GLOBUS_CLIENT_ID"


def _site_settings_collections() -> tuple[Optional[str], list[str]]:
    """(client id, collection ids) from the current site's settings.yml, when run inside a site."""
    try:
        from balsam.config import SiteConfig

        site = SiteConfig()
    except Exception:
        return None, []
    section = site.settings.sections.get("transfers") if hasattr(site.settings, "sections") else None
    if section is None:
        return None, []
    get = (lambda k: section.get(k)) if isinstance(section, dict) else (lambda k: getattr(section, k, None))
    collections = [get("globus_endpoint_id")] if get("globus_endpoint_id") else []
    for url in (get("transfer_locations") or {}).values():
        if isinstance(url, str) and url.lower().startswith("globus://"):
            collections.append(url.split("://", 1)[1].strip("/"))
    options = (get("backend_options") or {}).get("globus") or {}
    return options.get("client_id"), collections


@click.command("globus-login")
@click.option("-e", "--endpoint-id", "endpoints", multiple=True, metavar="COLLECTION_ID",
              help="Collection needing data_access consent (repeat). Default: those in the site's settings.yml.")
@click.option("--client-id", envvar=CLIENT_ID_ENV, default=None, metavar="UUID",
              help=f"Native-app client id registered at app.globus.org (or ${CLIENT_ID_ENV}).")
@click.option("--tokens-file", type=click.Path(dir_okay=False), default=None,
              help="Where to store the tokens (default $BALSAM_HOME/globus-tokens.json).")
def globus_login(endpoints: tuple[str, ...], client_id: Optional[str], tokens_file: Optional[str]) -> None:
    """Log in to Globus so the site agent can run transfers (refresh token stored mode 0600)."""
    # Imported here: this hook module is loaded by every balsam process (launchers too), and
    # globus_sdk is ~0.1 s of a start-up that never logs in.
    import globus_sdk

    from .auth import load_tokens, login, tokens_path

    site_client, site_collections = _site_settings_collections()
    path = tokens_path(tokens_file)
    try:
        previous = load_tokens(path)
    except ValueError:
        previous = None
    client_id = client_id or site_client or (previous or {}).get("client_id")
    if not client_id:
        raise click.UsageError(
            f"no Globus client id: register a native app at https://app.globus.org/settings/developers and pass "
            f"--client-id (or set ${CLIENT_ID_ENV})"
        )
    collections = list(dict.fromkeys([*endpoints, *site_collections]))
    try:
        login(client_id, collections, path, prompt=lambda text: click.prompt(text, hide_input=False),
              echo=click.echo)
    except globus_sdk.GlobusAPIError as exc:
        raise click.ClickException(f"Globus Auth refused the login (HTTP {exc.http_status} {exc.code})") from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    shown = ", ".join(collections) or "none"
    click.echo(f"Logged in to Globus; tokens saved to {path} (mode {oct(os.stat(path).st_mode & 0o777)}); "
               f"data_access consent for: {shown}")


@hookimpl
def balsam_cli_commands(cli: Any) -> None:
    # Attach to the core's `site` group object itself, so the order in which plugins add their
    # commands does not matter (the core adds this same object).
    from balsam.cli.site import site as site_group

    site_group.add_command(globus_login)
    if "site" not in cli.commands:
        cli.add_command(site_group)
