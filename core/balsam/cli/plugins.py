"""``balsam plugins ls`` and ``balsam plugins show NAME``: what is installed and what loaded."""

from __future__ import annotations

import json

import attrs
import click

from balsam.config import section_specs
from balsam.options import option_help
from balsam.plugins.manager import HOOK_KIND, KINDS, PluginError, PluginRecord, did_you_mean, get_plugin_manager

from .plugin_scaffold import new

COLUMNS = ("kind", "name", "distribution", "version", "status", "error")


def format_table(rows: list[dict[str, str]], columns: tuple[str, ...]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    for row in rows:
        lines.append("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns).rstrip())
    return "\n".join(lines)


@click.group("plugins")
def plugins() -> None:
    """Installed plugins and drivers, and whether they loaded."""


@plugins.command("ls")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice([HOOK_KIND, *KINDS]),
    help="Only rows of this kind (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def ls(kinds: tuple[str, ...], as_json: bool) -> None:
    """List hook plugins and named drivers: kind, name, distribution, version, status, error."""
    pm = get_plugin_manager()
    section_specs()  # so that an agent module's unusable settings section shows on its row
    rows = pm.report()
    if kinds:
        rows = [r for r in rows if r["kind"] in kinds]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(format_table(rows, COLUMNS))


def _describe_record(pm, record: PluginRecord) -> list[str]:
    lines = [f"{record.kind} {record.name}"]
    lines.append(f"  distribution: {record.distribution or '-'} {record.version}".rstrip())
    lines.append(f"  status: {record.status}" + (f" ({record.error})" if record.error else ""))
    lines.append(f"  target: {record.target or '-'}")
    lines.append(f"  source: {record.source or '-'}")
    lines.append(f"  loaded from: {record.location or '-'}")
    if record.description:
        lines.append(f"  description: {record.description}")
    if record.kind == HOOK_KIND:
        hooks = pm.plugin_hooks(record.name)
        lines.append("  hooks: " + (", ".join(hooks) if hooks else "none"))
        commands = pm.cli_commands.get(record.name)
        if commands:
            lines.append("  commands: " + ", ".join(commands))
    if record.kind == "agent_module":
        lines.append(f"  settings section: {record.name}")
    schema = getattr(record.obj, "options_schema", None) if record.status == "ok" else None
    if schema is not None and attrs.has(schema):
        help_texts = option_help(schema)
        where = {"scheduler": " (scheduler.options)", "platform": " (launcher.platform_options)",
                 "agent_module": f" (the {record.name} section)"}.get(record.kind, "")
        lines.append(f"  options{where}:" + ("" if help_texts else " none"))
        for field in attrs.fields(schema):
            default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default  # type: ignore[attr-defined]
            lines.append(f"    {field.name} (default {default!r}): {help_texts[field.name]}")
    return lines


@plugins.command("show")
@click.argument("name")
def show(name: str) -> None:
    """Details of one plugin, driver or distribution: hooks, settings section, where it came from."""
    pm = get_plugin_manager()
    # Attach commands so that `commands:` can be listed for each plugin.
    root = click.get_current_context().find_root().command
    if hasattr(root, "attach_plugin_commands"):
        root.attach_plugin_commands()
    records = pm.find(name)
    if not records:
        hint = did_you_mean(name, pm.known_names())
        raise PluginError(f"no plugin, driver or distribution named '{name}'" + (f" ({hint})" if hint else ""))
    blocks = ["\n".join(_describe_record(pm, r)) for r in records]
    click.echo("\n\n".join(blocks))


plugins.add_command(new)

commands = [plugins]
