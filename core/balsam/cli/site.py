"""``balsam site ...``: the site group. The foundation provides ``sample-settings``; the site agent
adds ``init``, ``start``, ``stop`` and the rest to this same group."""

from __future__ import annotations

import click


@click.group("site")
def site() -> None:
    """Create and run Balsam sites (a directory with settings.yml, data and logs)."""


@site.command("sample-settings")
def sample_settings() -> None:
    """Print a complete, commented settings.yml with the default values."""
    from balsam.config import render_sample_settings

    click.echo(render_sample_settings(), nl=False)


@site.command("check-settings")
@click.argument("path", required=False, type=click.Path(dir_okay=True, path_type=str))
def check_settings(path: str | None) -> None:
    """Check a settings.yml (a file, or the settings of the site at PATH / the current site); lists every problem."""
    from pathlib import Path

    from balsam.config import SettingsError, SiteConfig, load_settings

    target = Path(path) if path else None
    if target is not None and target.is_file():
        settings_path = target
    elif target is not None and target.suffix.lower() in (".yml", ".yaml") and not target.exists():
        # A file was meant: "missing.yml is not a Balsam site (no .balsam-site file in it)" misled.
        raise click.ClickException(f"{path}: file not found")
    else:
        settings_path = SiteConfig(target).settings_path
    try:
        settings = load_settings(settings_path)
    except SettingsError as exc:
        # Every problem, one per line (ordered by line), so that one run shows all there is to fix.
        for problem in exc.errors:
            click.echo(f"Error: {problem}", err=True)
        if len(exc.errors) > 1:
            click.echo(f"{len(exc.errors)} problems in {settings_path}", err=True)
        raise SystemExit(1) from None
    enabled = [key for key, value in settings.sections.items() if value is not None]
    click.echo(f"{settings_path}: OK (sections in effect: {', '.join(enabled)})")


# init/start/stop/sync/ls/rm/mv/rename (site agent engineer)
from balsam.cli.site_commands import attach as _attach_site_commands  # noqa: E402

_attach_site_commands(site)

commands = [site]
