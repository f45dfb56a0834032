"""The ``balsam`` command line: a click group whose commands come from plugins.

Command modules are attached through the ``balsam_cli_commands`` hook (the core's own modules are
listed in ``balsam.builtin.core_plugin.CORE_COMMAND_MODULES``). The commands are attached on first
use, so ``import balsam.cli`` stays cheap and ``balsam --version`` needs no plugin at all.

Any error ends the command with one line ``Error: ...`` on stderr and exit status 1;
``BALSAM_CLI_TRACEBACK=1`` re-raises it with the full traceback instead. A closed output
(``balsam job ls | head -1``) ends it with status 141, as SIGPIPE would, and nothing on stderr; a
command that changes something first finishes (:mod:`balsam.cli._streams`).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterator, NoReturn, Optional

import click

from balsam import __version__

from ._streams import StreamGuard, changes_something, read_only, refuse_unseen_question, tell

__all__ = ["APP_REF", "BATCH_JOB_ID", "BalsamGroup", "IdOrNameType", "IdType", "Interrupted", "JOB_ID", "SCHEDULER_ID",
           "changes_something", "confirm_or_yes", "main", "error_line", "newest_pages", "read_only", "refuse_unseen_question"]

TRACEBACK_ENV = "BALSAM_CLI_TRACEBACK"


def _traceback_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def error_line(exc: BaseException) -> str:
    """One line describing ``exc`` for users (domain errors carry their own message)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if type(exc).__module__ == "builtins" and not isinstance(exc, (ValueError, RuntimeError)):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text or type(exc).__name__


#: The exit status of a command stopped by Ctrl-C (SIGINT): 128 + 2, as a shell reports it.
INTERRUPTED_EXIT_CODE = 130


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C that a command caught to say what it leaves behind (``Interrupted: 5000 of 12000
    jobs were updated ...``): printed instead of the plain "Interrupted."."""


class IdType(click.ParamType):
    """An integer option naming a record by id, within its API column (``bits`` wide): a larger one
    is a usage error naming the option (it was sent, and the server's answer named its own query
    parameter: ``query.id: integer out of range``)."""

    name = "integer"

    def __init__(self, bits: int, what: str) -> None:
        self.bits = bits
        self.what = what

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int:
        number = click.INT.convert(value, param, ctx)
        low, high = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        if not low <= number <= high:
            # The range, not "at most": -10**20 is past it too.
            self.fail(f"{value}: {self.what} are {self.bits}-bit integers ({low} to {high})", param, ctx)
        return number


class IdOrNameType(click.ParamType):
    """A record given by id or by name (``job ls -a 12``, ``-a Hello``: app names are never all
    digits): an id beyond its API column is a usage error naming the option, as :class:`IdType`'s
    (the server answered ``query.id: integer out of range``). The value stays text."""

    name = "text"

    def __init__(self, ids: IdType) -> None:
        self.ids = ids

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if isinstance(value, str) and value.isdecimal():
            self.ids.convert(value, param, ctx)
        return value


#: Ids of the API's 64-bit columns (jobs; batch systems' ids are stored 64-bit too) and 32-bit ones.
#: (``server revoke --id`` keeps int: an id out of range is "no credential N" there, docs/security.md.)
JOB_ID = IdType(64, "job ids")
SCHEDULER_ID = IdType(64, "scheduler ids")
BATCH_JOB_ID = IdType(32, "BatchJob ids")
#: ``-a/--app``: an app id (32-bit, as the server's apps.id) or name.
APP_REF = IdOrNameType(IdType(32, "app ids"))


def confirm_or_yes(text: str) -> bool:
    """``click.confirm(text)`` for a command that takes ``-y/--yes``: when standard input ends
    before an answer (a script, cron, a batch job), one line naming the question and ``-y``
    (click's answer was a bare "Aborted!": Balsam 0.7's ``job modify`` never asked, so its scripts
    stopped there with nothing to say why). Ctrl-C at the prompt stays an interruption."""
    refuse_unseen_question()  # `job rm ... | head`, the reader gone: no one sees the question
    try:
        answer = click.confirm(text)
    except click.Abort as exc:
        refuse_unseen_question()  # the question was not shown: that, not the answer, stops it
        if isinstance(exc.__context__, EOFError):
            click.echo("", err=True)  # ends the prompt's line
            raise click.ClickException(f"no answer to {text!r}: standard input ended; pass -y/--yes to go on "
                                       "without asking") from None
        raise
    refuse_unseen_question()  # the question's own write failed: an answer to a question not shown
    return answer


def newest_pages(query: Any, limit: int, size: int) -> Iterator[tuple[list[Any], bool]]:
    """The newest ``limit`` records of ``query`` (Job or TransferItem), listed oldest to newest, a
    page of ``size`` (one request) at a time, each with whether more may follow: ``-n N``.

    Up to ``size``, one request of the newest N. More: the N-th newest id first (one record,
    ``ordering=-id``), then id-ordered pages from it on (``id__gt``, as every id-ordered listing):
    records that leave the query meanwhile (deleted, a state change under ``-s`` on a live
    campaign) move none of the newest N. (A count, then pages from offset count - N, dropped one
    of the newest N for each record leaving below between the count and the first page.) A server
    without ``id__gt`` is read from that offset, taken from the same request as the id."""
    if limit <= size:
        newest = sorted(query.order_by("-id")[:limit], key=lambda record: record.id)
        yield newest, False
        return
    nth = query.order_by("-id")[limit - 1:limit]
    found = list(nth)
    if not found:  # fewer than N match: all of them
        pages = query.order_by("id")[:limit].pages(size)
    else:
        total = nth.count()  # the matches as that request found them (its own count: no request)
        pages = query.order_by("id")[max(0, total - limit):total].pages(size, after=found[0].id - 1)
    for page, more in pages:
        if page:  # an offset page of records listed already (an older server) adds nothing
            yield page, more


def _interrupted(exc: "BaseException | None" = None) -> NoReturn:
    """End a command stopped by Ctrl-C: one line on stderr, exit status 130 (click's own answer is
    "Aborted!" and status 1, which a script cannot tell from a failure)."""
    message = str(exc) if isinstance(exc, Interrupted) and str(exc) else "Interrupted."
    tell("")  # ends the terminal's "^C" line
    tell(message)  # a closed stderr (`2>&-`, a reader gone) loses the line, not the status
    raise click.exceptions.Exit(INTERRUPTED_EXIT_CODE)


class BalsamGroup(click.Group):
    """A click group that attaches plugin commands lazily and reports duplicate names.

    ``add_command`` refuses to replace an existing command: the attempt is reported on stderr and
    recorded, so two plugins cannot silently shadow each other.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plugins_attached = False
        self._current_plugin: Optional[str] = None
        #: Problems met while attaching commands ("plugin X: command 'y' already exists").
        self.problems: list[str] = []

    def add_command(self, cmd: click.Command, name: Optional[str] = None) -> None:
        name = name or cmd.name
        if name in self.commands and self.commands[name] is not cmd:
            who = f"plugin '{self._current_plugin}'" if self._current_plugin else "a second registration"
            message = f"{who} tried to add command '{name}', which already exists; kept the first one"
            self.problems.append(message)
            click.echo(f"balsam: {message}", err=True)
            return
        super().add_command(cmd, name)

    def attach_plugin_commands(self) -> None:
        """Call every plugin's ``balsam_cli_commands(cli)`` once, one plugin at a time."""
        if self._plugins_attached:
            return
        self._plugins_attached = True
        from balsam.plugins.manager import get_plugin_manager

        pm = get_plugin_manager()
        hook = pm.hook.balsam_cli_commands
        for impl in hook.get_hookimpls():  # registration order: the core first
            self._current_plugin = impl.plugin_name
            before = set(self.commands)
            try:
                impl.function(cli=self)
            except Exception as exc:  # a broken plugin must not take the CLI down
                if _traceback_wanted():
                    raise
                message = f"plugin '{impl.plugin_name}' could not add its commands: {error_line(exc)}"
                self.problems.append(message)
                click.echo(f"balsam: {message}", err=True)
            finally:
                self._current_plugin = None
            pm.cli_commands[impl.plugin_name] = sorted(set(self.commands) - before)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.attach_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> Optional[click.Command]:
        self.attach_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if ctx.parent is None and args and not args[0].startswith("-"):
            # A Balsam 0.x command line gets the command to use instead, not a bare click error.
            from .legacy import legacy_hint

            self.attach_plugin_commands()
            groups = {name: frozenset(cmd.commands) for name, cmd in self.commands.items() if isinstance(cmd, click.Group)}
            hint = legacy_hint(list(args), frozenset(self.commands), groups)
            if hint:
                raise click.UsageError(hint, ctx)
        return super().parse_args(ctx, args)

    def make_context(self, info_name: Optional[str], args: list[str], parent: Optional[click.Context] = None,
                     **extra: Any) -> click.Context:
        if parent is not None:
            return super().make_context(info_name, args, parent=parent, **extra)
        try:  # the plugins' commands are imported while the arguments are parsed
            return super().make_context(info_name, args, parent=parent, **extra)
        except KeyboardInterrupt:
            _interrupted()
        except OSError as exc:  # `balsam --help | head -1`
            if _guard is not None and _guard.owns(exc):
                raise _guard.stop(exc) from None
            raise

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.parent is not None:
            return super().invoke(ctx)
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            _interrupted(exc)
        except click.Abort as exc:
            # click turns Ctrl-C at a prompt into Abort (``from None``: the KeyboardInterrupt is
            # its __context__); end of input (EOFError) stays "Aborted!", status 1.
            if isinstance(exc.__context__, KeyboardInterrupt):
                _interrupted()
            raise
        except OSError as exc:
            # A write to a closed output (`| head -1`) stopped a command: 141 quietly, before click's
            # own answer (a silent status 1) gets it.
            if _guard is not None and _guard.owns(exc):
                raise _guard.stop(exc) from None
            raise

    def main(self, *args: Any, **kwargs: Any) -> Any:
        global _guard
        outer, _guard = _guard, StreamGuard()  # a command run from a command (tests) keeps its own
        guard = _guard
        guard.install()
        try:
            try:
                return super().main(*args, **kwargs)
            except Exception as exc:
                # click handles its own exceptions (usage errors, Abort, Exit); anything else is ours.
                if _traceback_wanted():
                    raise
                tell(f"Error: {error_line(exc)}")
                sys.exit(1)
        except SystemExit as exc:
            raise SystemExit(guard.exit_status(exc.code)) from None
        finally:
            guard.uninstall()
            _guard = outer


#: The streams of the command running in this process (:mod:`balsam.cli._streams`).
_guard: Optional[StreamGuard] = None


#: Commands that run for a long time and must ride out API outages with the full retry budget.
LONG_RUNNING_COMMANDS = frozenset({"launcher", "demo"})
#: Retries of a short interactive command against an unreachable server (about 3.5 s in all).
INTERACTIVE_RETRY_COUNT = 3


@click.group(cls=BalsamGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="balsam")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Balsam: HPC workflows through a REST service, site agents and pilot-job launchers."""
    from balsam.scheduler import reset_ignored_sigchld  # here: `balsam --help` stays off the models' import

    # Commands run scheduler commands in this process (`balsam queue ls`, `site start` in the
    # foreground): a SIGCHLD ignored by what started it (inherited across exec) discards their exit status.
    reset_ignored_sigchld()
    if ctx.invoked_subcommand not in LONG_RUNNING_COMMANDS:
        from balsam.client.rest import cap_retries_for_interactive_use

        cap_retries_for_interactive_use(INTERACTIVE_RETRY_COUNT)
