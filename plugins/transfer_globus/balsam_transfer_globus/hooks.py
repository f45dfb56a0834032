"""Hook module of the Globus plugin: adds ``balsam site globus-login`` to the command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Optional

import click
from click.core import ParameterSource

from balsam.plugins.hookspecs import hookimpl

from .ids import canonical_id, is_uuid

CLIENT_ID_ENV = "BALSAM_GLOBUS_CLIENT_ID"


class SiteGlobusSettings(NamedTuple):
    """What ``globus-login`` takes from the current site's settings.yml (``transfers``)."""

    client_id: Optional[str] = None
    collections: tuple[str, ...] = ()
    #: ``backend_options.globus.tokens_file``, resolved as the agent's backend resolves it.
    tokens_file: Optional[Path] = None


def _site_settings() -> SiteGlobusSettings:
    """The Globus settings of the site the command runs in (found as every ``balsam site`` command
    finds it: ``$BALSAM_SITE_PATH`` or the current directory's parents); empty outside a site."""
    try:
        from balsam.config import SiteConfig, SiteNotFoundError

        site = SiteConfig()
    except SiteNotFoundError:
        return SiteGlobusSettings()
    except Exception as exc:  # noqa: BLE001 - the login works without the site's settings
        click.echo(f"warning: not using the site's settings.yml: {type(exc).__name__}: {exc}", err=True)
        return SiteGlobusSettings()
    try:
        sections = site.settings.sections
    except Exception as exc:  # noqa: BLE001
        click.echo(f"warning: not using {site.settings_path}: {exc}", err=True)
        return SiteGlobusSettings()
    section = sections.get("transfers")
    if section is None:
        return SiteGlobusSettings()
    get = (lambda k: section.get(k)) if isinstance(section, dict) else (lambda k: getattr(section, k, None))
    options = (get("backend_options") or {}).get("globus") or {}
    collections = [c for c in (options.get("endpoint_id"), get("globus_endpoint_id")) if c]
    for url in (get("transfer_locations") or {}).values():
        if isinstance(url, str) and url.lower().startswith("globus://"):
            collections.append(url.split("://", 1)[1].strip("/"))
    from .auth import tokens_path

    configured = options.get("tokens_file")
    return SiteGlobusSettings(
        client_id=options.get("client_id"),
        collections=tuple(dict.fromkeys(str(c) for c in collections)),
        tokens_file=tokens_path(str(configured), base=site.site_path) if configured else None,
    )


def _refusal(exc: Any) -> str:
    """One line for a Globus Auth error of the login. OAuth errors (the code exchange) carry their
    name in the body's ``error`` ("invalid_grant"), not in ``code``, which globus-sdk leaves None."""
    body = exc.raw_json if isinstance(getattr(exc, "raw_json", None), dict) else {}
    code = str(exc.code or body.get("error") or "").strip()
    said = " ".join(filter(None, (f"HTTP {exc.http_status}", code)))
    if code == "invalid_grant":
        return (f"Globus Auth refused the login ({said}): the authorization code was wrong or has expired "
                "(it is good for one use, within minutes): run the command again and paste the new code")
    detail = " ".join(str(body.get("error_description") or getattr(exc, "message", None) or "").split())
    return f"Globus Auth refused the login ({said}){f': {detail}' if detail else ''}"


def _canonical(text: str) -> str:
    """A UUID as Globus writes it (lowercase, hyphenated), else ``text`` as it is (the check the
    agent's settings get: :func:`ids.canonical_id`)."""
    return canonical_id(text)


def _uuids(ctx: Any, param: Any, value: Any) -> Any:
    """Refuse what is no UUID before it goes into the login link (an alias such as ``aps`` for
    ``-e`` made Globus Auth show an error page about a scope the user never wrote); a UUID is
    returned as Globus writes it: ``{...}``, ``urn:uuid:...``, capitals and no hyphens went into the
    scope as typed (a scope no collection has). Checked as settings.yml's ids are (:mod:`.ids`, not
    ``uuid.UUID``, which read a mistyped id such as ``+bcdef01...`` as another collection's)."""
    if value is None:
        return None
    canonical = []
    for text in (value if isinstance(value, tuple) else (value,)):
        if is_uuid(text):
            canonical.append(canonical_id(text))
        else:
            what = ("a collection UUID (the id of a globus://<collection-id> location, not its alias)"
                    if param.name == "endpoints" else "the UUID of a native app registered at app.globus.org")
            hint = None
            if ctx.get_parameter_source(param.name) == ParameterSource.ENVIRONMENT and param.envvar:
                # Not typed on the command line: "Invalid value for '--client-id'" sent the user
                # looking for an option they never gave.
                hint = f"${param.envvar} (environment)"
            raise click.BadParameter(f"{text!r} is not {what}", ctx=ctx, param=param, param_hint=hint) from None
    return tuple(canonical) if isinstance(value, tuple) else canonical[0]


@click.command("globus-login")
# --endpoint_id: Balsam 0.7's spelling, kept so its command lines still work.
@click.option("-e", "--endpoint-id", "--endpoint_id", "endpoints", multiple=True, metavar="COLLECTION_ID",
              callback=_uuids,
              help="Collection needing data_access consent (repeat); those in the site's settings.yml are added.")
@click.option("--client-id", envvar=CLIENT_ID_ENV, default=None, metavar="UUID", callback=_uuids,
              help=f"Native-app client id registered at app.globus.org (or ${CLIENT_ID_ENV}; "
                   "default: the site's transfers.backend_options.globus.client_id).")
@click.option("--tokens-file", type=click.Path(dir_okay=False), default=None,
              help="Where to store the tokens (default: the site's transfers.backend_options.globus.tokens_file "
                   "when run in a site, else $BALSAM_HOME/globus-tokens.json).")
@click.option("--session-domain", "session_domains", multiple=True, metavar="DOMAIN",
              help="Log in anew with an identity of this domain (repeat), as a collection's authentication "
                   "policy requires (the agent's message names it).")
def globus_login(endpoints: tuple[str, ...], client_id: Optional[str], tokens_file: Optional[str],
                 session_domains: tuple[str, ...] = ()) -> None:
    """Log in to Globus so the site agent can run transfers (refresh token stored mode 0600).

    Run in a site, the options not given here come from its settings.yml
    (transfers.backend_options.globus), so the tokens go to the file the site's agent reads."""
    # Imported here: this hook module is loaded by every balsam process (launchers too), and
    # globus_sdk is ~0.1 s of a start-up that never logs in.
    import globus_sdk

    from .auth import load_tokens, login, tokens_path

    site = _site_settings()
    # The command line wins; a relative --tokens-file is relative to the current directory.
    path = tokens_path(tokens_file) if tokens_file else (site.tokens_file or tokens_path())
    try:
        previous = load_tokens(path)
    except ValueError:
        previous = None
    client_id = client_id or site.client_id or (previous or {}).get("client_id")
    if not client_id:
        raise click.UsageError(
            f"no Globus client id: register a native app at https://app.globus.org/settings/developers and pass "
            f"--client-id (or set ${CLIENT_ID_ENV})"
        )
    # One consent per collection however settings.yml spells its id (the command line's are canonical).
    collections = list(dict.fromkeys([*endpoints, *map(_canonical, site.collections)]))
    try:
        # The code is a credential until exchanged: not echoed, nor left in a terminal's scrollback.
        login(client_id, collections, path, prompt=lambda text: click.prompt(text, hide_input=True),
              echo=click.echo, session_domains=session_domains)
    except globus_sdk.GlobusAPIError as exc:
        raise click.ClickException(_refusal(exc)) from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    shown = ", ".join(collections) or "none"
    click.echo(f"Logged in to Globus; tokens saved to {path} (mode {oct(os.stat(path).st_mode & 0o777)}); "
               f"data_access consent for: {shown}")
    if site.tokens_file is not None and tokens_file and os.path.abspath(path) != os.path.abspath(site.tokens_file):
        click.echo(f"warning: this site's agent reads {site.tokens_file} (transfers.backend_options.globus.tokens_file), "
                   f"not {path}", err=True)


@hookimpl
def balsam_cli_commands(cli: Any) -> None:
    # Attach to the core's `site` group object itself, so the order in which plugins add their
    # commands does not matter (the core adds this same object).
    from balsam.cli.site import site as site_group

    site_group.add_command(globus_login)
    if "site" not in cli.commands:
        cli.add_command(site_group)
