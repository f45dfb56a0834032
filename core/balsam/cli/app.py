"""``balsam app ls`` / ``balsam app rm``. Apps are defined and synced from Python
(``ApplicationDefinition.sync()``)."""

from __future__ import annotations

from typing import Optional

import click

from . import confirm_or_yes
from ._site_selector import (dump_yaml, format_table, json_option, json_record, site_filter, site_names,
                             site_option_short, write_json_array)


@click.group("app")
def app() -> None:
    """List and remove the apps registered at your sites."""


@app.command("ls")
@site_option_short
@click.option("-v", "--verbose", is_flag=True, help="Show every field (parameters, transfers, source code)")
@json_option
def ls(site_selector: str, verbose: bool, as_json: bool) -> None:
    """List apps."""
    from balsam.api import App

    apps = sorted(App.objects.filter(**site_filter(site_selector)), key=lambda a: (a.site_id, a.id))
    if as_json:
        # serialized_class whole (-v shortens it): a value cut short is no value for a script.
        write_json_array(json_record(a) for a in apps)
        return
    if not apps:
        click.echo("No apps found. Define an ApplicationDefinition and call its sync() to add one.")
        return
    if verbose:
        docs = []
        for a in apps:
            data = a.display_dict()
            payload = data.get("serialized_class") or ""
            if len(payload) > 60:  # base64 of the class: show that it is there, not all of it
                data["serialized_class"] = f"{payload[:40]}...({len(payload)} chars)"
            docs.append(dump_yaml(data))
        click.echo("----\n".join(docs), nl=False)
        return
    names = site_names(sorted({a.site_id for a in apps}))
    rows = [[a.id, a.name, names.get(a.site_id, a.site_id), len(a.parameters)] for a in apps]
    click.echo(format_table(["ID", "Name", "Site", "Params"], rows, right={0, 3}))


@app.command("rm")
@click.option("-n", "--name", default=None, help="Name of the app to remove")
@click.option("-a", "--all", "remove_all", is_flag=True, help="Remove every app of the selected site(s)")
@site_option_short
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation")
def rm(name: Optional[str], remove_all: bool, site_selector: str, yes: bool) -> None:
    """Remove apps (their jobs are deleted with them)."""
    from balsam.api import App, Job

    if bool(name) == remove_all:
        raise click.UsageError("give either --name NAME or --all")
    if remove_all and not site_selector:
        raise click.UsageError("--all needs an explicit --site")
    filters = site_filter(site_selector)
    if name:
        filters["name"] = name
    apps = list(App.objects.filter(**filters))
    if not apps:
        raise click.ClickException(f"no app{' named ' + repr(name) if name else ''} at the selected site(s)")
    if remove_all:
        _remove_all(apps, filters, site_selector, yes)
        return
    if name and len(apps) > 1 and not yes:
        click.echo(f"{len(apps)} sites have an app named {name!r}: " + ", ".join(f"id {a.id} (site {a.site_id})" for a in apps))
    for a in apps:
        n_jobs = Job.objects.filter(app_id=a.id).count()
        if not yes:
            warning = f" There are {n_jobs} Jobs that will be ERASED!" if n_jobs else ""
            if not confirm_or_yes(f"Really delete App(id={a.id}, name={a.name}, site_id={a.site_id})?{warning}"):
                click.echo(f"Kept {a.name}")
                continue
        a.delete()
        click.echo(f"Deleted App {a.name} ({n_jobs} jobs removed)")


def _remove_all(apps: list, filters: dict, site_selector: str, yes: bool) -> None:
    """``app rm --all``: one count of the jobs (every job of the selected sites belongs to one of
    their apps), one confirmation for them all, as Balsam 0.7 asked, then one DELETE per app: the
    API deletes apps one at a time (``DELETE /apps/{id}``, 0.7's route; there is no bulk one), and
    the server deletes each app's jobs with it. It was a count and a confirmation per app."""
    from balsam.api import Job

    n_jobs = Job.objects.filter(**filters).count()
    if not yes:
        names = ", ".join(a.name for a in apps[:10]) + (", ..." if len(apps) > 10 else "")
        if not confirm_or_yes(f"Really delete {len(apps)} app(s) ({names}) of --site {site_selector}? There are "
                              f"{n_jobs} Jobs that will be ERASED!"):
            click.echo("Nothing deleted.")
            return
    for a in apps:
        app_id = a.id  # delete() clears it
        a.delete()
        click.echo(f"Deleted App {a.name} (id {app_id}, site {a.site_id})")
    click.echo(f"Deleted {len(apps)} app(s) and their {n_jobs} job(s)")


commands = [app]
