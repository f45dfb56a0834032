"""Balsam 0.x command lines (``balsam ls``, ``balsam submit-launch``, ``balsam job --name ...``) answered
with the command to use instead, their options translated where there is an equivalent.

:class:`balsam.cli.BalsamGroup` asks :func:`legacy_hint` before click would print a bare
"No such command" / "No such option".
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Callable, Optional, Union

#: A translated option: (new option, its value), the value quoted by :func:`_translate` (the one
#: place, so a 0.x value with a space or a shell character prints a line that runs as given).
Option = tuple[str, str]
#: A 0.x option -> its new spelling (the 0.x value follows it), a function of the value giving the
#: new options and a note ("" when none), or None (no equivalent).
Translation = Union[str, Callable[[str], tuple[list[Option], str]], None]


def _key_value(option: str, key: str) -> Callable[[str], tuple[list[Option], str]]:
    """0.x ``--workflow V`` -> ``--tag workflow=V`` and the like."""
    return lambda value: ([(option, f"{key}={value}")], "")


def _args(value: str) -> tuple[list[Option], str]:
    """0.x ``--args "A B"``: 0.x appended the string to the app's command line and its launcher
    split that with ``shlex.split`` (or a shell): each word an argument. A ``-p`` value is rendered
    shell-quoted, ONE argument, and no template form splits it into words (app.py quotes every
    value, so a parameter cannot inject shell code). One word stays ``-p args=A`` (the parameter
    the app hint's ``{{ args }}`` names); several words become one parameter each, with a note
    saying which template takes them."""
    try:
        words = shlex.split(value)
    except ValueError:  # an unbalanced quote, which 0.x's shlex.split refused too: split on spaces
        words = value.split()
    # 0.x's MPI mode ran the line through /bin/bash; a -p value reaches the program as it is.
    shell = (" A -p value is passed literally: $VARIABLES, globs and ; | & in it are not expanded or run "
             "(0.x's MPI mode ran the line through bash): give the expanded value, or put the shell syntax in "
             "the command_template") if any(ch in value for ch in "$*?;|&<>`") else ""
    if not words:  # an empty --args gave the program no argument; -p args= would give it one, ''
        return [], ("--args is empty: no -p args; the app's command_template must not contain `{{ args }}` "
                    "(the `balsam app` hint adds it)")
    if len(words) == 1:
        return [("-p", f"args={words[0]}")], shell.lstrip()
    names = [f"arg{i}" for i in range(1, len(words) + 1)]
    template = " ".join(f"{{{{ {n} }}}}" for n in names)
    note = (f"each -p value reaches the program as one quoted argument (no command_template form splits a value "
            f"into words), so the {len(words)} words of --args are {len(words)} parameters: the app's "
            f"command_template takes `{template}` where the `balsam app` hint has `{{{{ args }}}}`.{shell}")
    return [("-p", f"{n}={w}") for n, w in zip(names, words)], note


def _app_class_name(name: str) -> str:
    """An app's name now is its ApplicationDefinition class's: a 0.x name as a Python identifier."""
    name = "".join(ch for ch in name if ch.isalnum() or ch == "_") or "MyApp"
    return "App" + name if name[0].isdecimal() else name


def _app(value: str) -> tuple[list[Option], str]:
    """0.x ``--application say-hello`` -> ``-a sayhello``, the class the ``balsam app`` hint writes."""
    return [("-a", _app_class_name(value))], ""


def _stage(direction: str) -> Callable[[str], tuple[list[Option], str]]:
    """0.x ``--url-in URL``: a 0.x URL is no ``-s`` value (a slot of the app and an alias of the
    site's transfer_locations), so it goes in a note and the printed line still runs."""
    return lambda value: ([], f"stage-{direction} is `-s SLOT=ALIAS:/path`: the app's transfer slot and an alias "
                              f"of the site's transfer_locations (docs/transfers.md); the 0.x URL given: {value}")


_stage_in, _stage_out = _stage("in"), _stage("out")


def _job_id(value: str) -> tuple[list[Option], str]:
    """0.x ``--id 3f2a``: a prefix of a job's UUID, which ``--id`` (an integer now) refuses, so the
    placeholder stays and a note says why; an id of ASCII digits is kept."""
    if value.isascii() and value.isdecimal():
        return [("--id", value)], ""
    return [("--id", "ID")], (f"job ids are integers now (`balsam job ls` lists them); 0.x's --id {value} was part "
                              f"of a UUID")


#: Options of 0.x ``balsam job`` (create a BalsamJob) -> ``balsam job create`` options.
_JOB_OPTIONS: dict[str, Translation] = {
    "--name": "-w", "--workflow": _key_value("--tag", "workflow"), "--application": _app, "--app": _app,
    # The app hint below appends `{{ args }}` to a 0.x --executable, so the job hint names that
    # parameter: a user following both hints, as the 0.x README's SayHello lines do, gets a job
    # that runs instead of a placeholder to guess.
    "--args": _args,
    "--description": None, "--input-files": None, "--stage-out-files": None, "--mpi-flags": None,
    # 0.x's mkchild and early `balsam job` required --wall-minutes; later ones took --wall-time-minutes
    "--wall-minutes": "-t", "--wall-time-minutes": "-t", "--num-nodes": "-n", "--ranks-per-node": "-rpn",
    "--threads-per-rank": "-tpr", "--threads-per-core": "-tpc", "--node-packing-count": "-npc",
    "--cpu-affinity": _key_value("-lp", "cpu_bind"), "--yes": "-y", "--stage-in-url": _stage_in,
    "--url-in": _stage_in, "--stage-out-url": _stage_out, "--url-out": _stage_out,
}
_JOB_FLAGS = {"--yes"}
#: 0.x options that took every following word (argparse nargs='*'). Not ``--args``: the 0.x
#: README's own lines give it one quoted value, and ``--args --yes`` was refused there ("expected
#: one argument": tests/compat/test_seed_snippets_audit.py).
_SEVERAL_WORDS = {"--description", "--input-files", "--stage-out-files", "--mpi-flags"}

_SUBMIT_OPTIONS: dict[str, Translation] = {
    "-A": "-A", "--project": "-A", "-q": "-q", "--queue": "-q", "-t": "-t", "--time-minutes": "-t",
    "-n": "-n", "--nodes": "-n", "--job-mode": "-j", "--wf-filter": _key_value("--tag", "workflow"),
    "--save-only": None, "--sort-by": None, "--prescheduled-only": None,
}
_SUBMIT_FLAGS = {"--save-only", "--prescheduled-only"}

_LS_OPTIONS: dict[str, Translation] = {
    "--state": "-s", "--wf": _key_value("-t", "workflow"), "--name": "-w", "--id": _job_id, "--verbose": "-v",
    "--by-states": "--by-state", "--history": None, "--tree": None,
}
_LS_FLAGS = {"--verbose", "--by-states", "--history", "--tree"}

#: 0.x ``balsam rm jobs --id ID | --all`` (the word ``jobs`` is skipped as any positional word).
_RM_OPTIONS: dict[str, Translation] = {"--id": _job_id, "--all": "--all", "--force": "-y"}
_RM_FLAGS = {"--all", "--force"}

def _modify_attr(value: str) -> tuple[list[Option], str]:
    """0.x ``balsam modify --attr A --value V``: only a job's state is set now (``-s V``)."""
    if value == "state":
        return [], ""
    return [], f"only a job's state is set by `balsam job modify` (-s); --attr {value}: from Python, `Job.objects`"


def _modify_type(value: str) -> tuple[list[Option], str]:
    """0.x ``balsam modify ... --type apps`` (or ``modify apps ...``) changed an ApplicationDefinition."""
    if value == "apps":
        return [], "apps are ApplicationDefinition classes now: change the class in Python and .sync() it"
    return [], ""


#: 0.x ``balsam modify jobs ID --attr A --value V`` (early) and ``modify ID ATTR VALUE [--type
#: jobs|apps]`` (final), as options by :func:`_modify_options`.
_MODIFY_OPTIONS: dict[str, Translation] = {"--id": _job_id, "--attr": _modify_attr, "--value": "-s",
                                           "--type": _modify_type}
#: 0.x ``balsam killjob --id ID [--recursive]``: its descendants too, which no option does now.
_KILL_OPTIONS: dict[str, Translation] = {"--id": _job_id, "--recursive": None}
_KILL_FLAGS = {"--recursive"}

#: 0.x ``balsam init PATH [--db-type postgres]``: its PATH is the site directory (see :func:`_init_hint`).
_INIT_OPTIONS: dict[str, Translation] = {"--db-type": None}


def _split_words(args: list[str], *, end_of_options: bool = False) -> tuple[list[str], list[str]]:
    """0.x words as (positional words, options with their values), read as _translate reads them
    (an option's value is no positional word; "-" is one). ``end_of_options``: after "--" every
    word is positional, as argparse reads it."""
    positional: list[str] = []
    options: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if end_of_options and arg == "--":
            positional += args[i + 1:]
            break
        if arg.startswith("-") and arg != "-":
            takes_value = "=" not in arg and i + 1 < len(args) and not _looks_like_option(args[i + 1])
            options += args[i:i + 2] if takes_value else [arg]
            i += 2 if takes_value else 1
            continue
        positional.append(arg)
        i += 1
    return positional, options


def _modify_options(args: list[str]) -> list[str]:
    """0.x ``modify``'s positional words as the options :data:`_MODIFY_OPTIONS` reads: ``jobs 3f2a
    --attr A --value V`` and ``3f2a state RUN_DONE --type jobs`` (0.x never took ``--id`` there, the
    hint of an earlier release did: it is read too)."""
    positional, options = _split_words(args)
    if positional and positional[0] in ("jobs", "apps"):
        options += ["--type", positional.pop(0)]
    return [word for option, value in zip(("--id", "--attr", "--value"), positional)
            for word in (option, value)] + options


def _init_hint(args: list[str]) -> tuple[str, str]:
    """The ``balsam site init`` line and the note for 0.x ``balsam init ARGS``: the user's own path
    (a placeholder PATH, pasted as printed, created a directory named PATH), ``~`` expanded and
    shell-quoted; no ``-n``, as site init names the site after the directory."""
    positional, _options = _split_words(args, end_of_options=True)
    path = positional[0] if positional else ""
    if not path:
        return "balsam site init PATH", "then `cd PATH && balsam site start`; the site is named after its directory"
    path = os.path.expanduser(path)
    if path.startswith("-"):  # `cd -` goes to the previous directory, `site init -x` reads an option
        path = "./" + path
    quoted = shlex.quote(path)
    return (f"balsam site init {quoted}",
            f"then `cd {quoted} && balsam site start`; the site is named after its directory (-n NAME for another)")


#: 0.x top-level commands: (what to run now, option translations, flags without a value, a note).
LEGACY_COMMANDS: dict[str, tuple[str, dict[str, Translation], set[str], str]] = {
    "ls": ("balsam job ls", _LS_OPTIONS, _LS_FLAGS,
           "a job's state history and error: `balsam job show ID`; a live view: `balsam job ls --by-state --watch`; "
           "apps: `balsam app ls`"),
    "submit-launch": ("balsam queue submit", _SUBMIT_OPTIONS, _SUBMIT_FLAGS,
                      "run it inside a site directory (or pass --site NAME); -j is serial or mpi"),
    "init": ("balsam site init", _INIT_OPTIONS, set(), ""),  # the path and note: _init_hint
    "service": ("balsam site start", {}, set(),
                "the site agent submits BatchJobs itself when the elastic queue module is enabled in settings.yml"),
    "modify": ("balsam job modify --id ID -s STATE", _MODIFY_OPTIONS, set(),
               "e.g. -s RESTART_READY to run a job again"),
    "kill": ("balsam job modify --id ID -s FAILED", _KILL_OPTIONS, _KILL_FLAGS,
             "a running job is stopped by its launcher"),
    "killjob": ("balsam job modify --id ID -s FAILED", _KILL_OPTIONS, _KILL_FLAGS, ""),
    "rm": ("balsam job rm", _RM_OPTIONS, _RM_FLAGS,
           "select the jobs with --id ID (repeatable), -t KEY=VALUE, -s STATE or --all; apps: `balsam app rm -n NAME`"),
    "mkchild": ("balsam job create --parent-id ID", _JOB_OPTIONS, _JOB_FLAGS,
                "the parent is the job that ran mkchild (0.x read its BALSAM_JOB_ID)"),
    "dep": ("balsam job create ... --parent-id ID", {}, set(), "dependencies are given when the child is created"),
    "which": ("balsam site ls", {}, set(), "the server: `balsam server status`"),
    "log": ("balsam job show ID", {}, set(), "agent logs are in the site's log/ directory"),
    "dbserver": ("balsam server start", {}, set(), "or `balsam login` to a shared server"),
    "activate": ("balsam server start", {}, set(), "or `balsam login`; `cd` into a site directory to work with it"),
    "make_dummies": ("Job.objects.bulk_create([...])", {}, set(), "from Python: `from balsam.api import Job`"),
    "submit": ("balsam queue submit", _SUBMIT_OPTIONS, _SUBMIT_FLAGS, ""),
}

#: 0.x option styles of commands that still exist as groups: ``balsam job --name ...`` (``balsam app
#: --name ...`` gets the ApplicationDefinition to write, see :func:`_app_message`).
LEGACY_GROUP_OPTIONS: dict[str, tuple[str, dict[str, Translation], set[str], str]] = {
    "job": ("balsam job create", _JOB_OPTIONS, _JOB_FLAGS,
            "the app must exist first (ApplicationDefinition.sync()); -p takes the parameters its command_template "
            "names (`{{ args }}` in the one `balsam app --name` suggests)"),
}


#: Balsam 0.7 subcommands that are gone: (group, name) -> what replaced them (docs/server.md).
_SHARED_SERVER = ("a shared server on PostgreSQL: `balsam server migrate` with BALSAM_DATABASE_URL set, then run "
                  "`uvicorn balsam.server.app:app` (or gunicorn) under your own process manager; Balsam no longer "
                  "creates a PostgreSQL cluster or starts Redis (docs/server.md, \"Shared deployment on PostgreSQL\")")
LEGACY_SUBCOMMANDS: dict[tuple[str, str], tuple[str, str]] = {
    ("server", "deploy"): ("balsam server start", "that is the embedded server (SQLite, this machine); for " + _SHARED_SERVER),
    ("server", "up"): ("balsam server start", "for " + _SHARED_SERVER),
    ("server", "down"): ("balsam server stop", "a shared deployment: stop the uvicorn/gunicorn processes you started"),
    # Balsam 0.7's docs name it, its CLI never had it: the bare "No such command 'sync'" said nothing.
    ("app", "sync"): ("MyApp.sync()  (in Python, for each ApplicationDefinition subclass)",
                      "apps are synced from Python: `from balsam.api import ApplicationDefinition`, define the "
                      "subclass (site, command_template), then call its .sync(); `balsam app ls` lists the result"),
}

#: The LEGACY_SUBCOMMANDS that 0.7's docs name but its command line never had (not "a 0.7 command").
DOCUMENTED_ONLY = frozenset({("app", "sync")})

#: New options given once per value (``balsam job rm --id 1 --id 2``): every 0.x occurrence is kept.
#: Of any other option 0.x's argparse kept the last occurrence, and so does the printed line.
_REPEATABLE = {"--id"}
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def _looks_like_option(word: str) -> bool:
    """argparse's rule: after an option that takes a value, such a word is not taken as the value
    (0.x exited with "expected one argument"; ``--args=-n`` gave it)."""
    return word.startswith("-") and word != "-" and " " not in word and not _NEGATIVE_NUMBER.match(word)


def _translate(target: str, options: dict[str, Translation], flags: set[str],
               args: list[str]) -> tuple[str, list[str], list[str], list[str]]:
    """The new command line, the 0.x options without an equivalent, those given no value, and the
    translations' notes."""
    # what a 0.x option's place (its translation: aliases share it) gives: (printed options, note)
    given: dict[object, tuple[list[str], str]] = {}
    dropped: list[str] = []
    missing: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":  # argparse's end of options: no option follows
            break
        name, eq, inline = arg.partition("=")
        if not name.startswith("-") or arg == "-":  # "-" is a value (stdin, a path), no option
            i += 1
            continue
        new = options.get(name, "?")
        if name in flags:
            value = ""
            i += 1
        elif eq:
            value = inline
            i += 1
        elif name in _SEVERAL_WORDS and name in options:
            # every word up to the next option (what has no equivalent is listed as one)
            end = i + 1
            while end < len(args) and not args[end].startswith("-"):
                end += 1
            value = " ".join(args[i + 1:end])
            i = end
        elif i + 1 < len(args) and not _looks_like_option(args[i + 1]):
            value = args[i + 1]
            i += 2
        else:
            # an unknown option may be a flag: only a known one is short of its value
            (dropped if new == "?" else missing).append(name)
            i += 1
            continue
        if new == "?" or new is None:
            dropped.append(name)
            continue
        if callable(new):
            produced, note = new(value)
            printed = [f"{option} {shlex.quote(text)}" for option, text in produced]
        else:
            printed, note = [new if name in flags else f"{new} {shlex.quote(value)}"], ""
        given[(name, i) if name in _REPEATABLE else new] = (printed, note)
    produced = [text for printed, _ in given.values() for text in printed]
    # a placeholder of the target ("--id ID", "-s STATE") goes once the user's own value fills it
    for option in {text.split(" ", 1)[0] for text in produced}:
        target = re.sub(rf" {re.escape(option)} [A-Z]+(?= |$)", "", target)
    parts = [target, *produced]
    notes = [note for _, note in given.values() if note]
    return " ".join(parts), list(dict.fromkeys(dropped)), list(dict.fromkeys(missing)), notes


def _message(command: str, target: str, options: dict[str, Translation], flags: set[str], note: str,
             args: list[str]) -> str:
    line, dropped, missing, notes = _translate(target, options, flags, args)
    text = f"`balsam {command}` is a Balsam 0.x command line. Use instead:\n  {line}"
    if dropped:
        text += f"\n(no equivalent for {', '.join(dropped)})"
    if missing:
        text += (f"\n(no value for {', '.join(missing)}: 0.x refused this line too, \"expected one argument\"; "
                 f"a value that starts with - is given as {missing[0]}=VALUE)")
    for each in [note, *notes]:
        if each:
            text += f"\nNote: {each}"
    return text


def _option_values(args: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for i, arg in enumerate(args):
        name, eq, inline = arg.partition("=")
        if name.startswith("--"):
            values[name] = inline if eq else (args[i + 1] if i + 1 < len(args) and not _looks_like_option(args[i + 1])
                                              else "")
    return values


def _app_message(args: list[str]) -> str:
    """0.x ``balsam app --name N --executable CMD`` -> the ApplicationDefinition to write instead."""
    values = _option_values(args)
    name = _app_class_name(values.get("--name") or "MyApp")
    command = values.get("--executable") or "my-program {{ args }}"
    if "{{" not in command:
        command += " {{ args }}"
    return (f"`balsam app --name ...` is a Balsam 0.x command line. Apps are Python classes now "
            f"(docs/api.md); run this once in Python:\n"
            f"  from balsam.api import ApplicationDefinition\n"
            f"  class {name}(ApplicationDefinition):\n"
            f"      site = \"my-site\"\n"
            f"      command_template = {command!r}\n"
            f"  {name}.sync()\n"
            f"then create jobs with `balsam job create -a {name} -w WORKDIR -p args=...` (the value is one argument of "
            f"the program: for several words, `balsam job --args` with them says which template takes them); list apps "
            f"with `balsam app ls`")


def legacy_hint(args: list[str], known_commands: "set[str] | frozenset[str]",
                subcommands: "Optional[dict[str, frozenset[str]]]" = None) -> Optional[str]:
    """The replacement for a 0.x command line ``args`` (the words after ``balsam``), or None.
    ``subcommands``: the subcommands of each group (a 0.7 subcommand a plugin adds again is left alone)."""
    if not args:
        return None
    name, rest = args[0], list(args[1:])
    if name not in known_commands and name in LEGACY_COMMANDS:
        target, options, flags, note = LEGACY_COMMANDS[name]
        if name == "init":
            target, note = _init_hint(rest)
        elif name == "modify":
            rest = _modify_options(rest)
            if _option_values(rest).get("--type") == "apps":  # no job: the --type note says what to do
                target, note = "balsam app ls", ""
                options = {**{key: (lambda value: ([], "")) for key in options}, "--type": _modify_type}
            elif _option_values(rest).get("--attr", "state") != "state":
                options = {**options, "--value": None}  # the value of another attribute is no state
        return _message(" ".join(args[:1]), target, options, flags, note, rest)
    if rest and (name, rest[0]) in LEGACY_SUBCOMMANDS and rest[0] not in (subcommands or {}).get(name, ()):
        target, note = LEGACY_SUBCOMMANDS[(name, rest[0])]
        dropped = [a.split("=", 1)[0] for a in rest[1:] if a.startswith("-")]
        what = ("is no command (Balsam 0.7's docs name it; its command line never had it)"
                if (name, rest[0]) in DOCUMENTED_ONLY else "is a Balsam 0.7 command")
        text = f"`balsam {name} {rest[0]}` {what}. Use instead:\n  {target}"
        if dropped:
            text += f"\n(no equivalent for {', '.join(dict.fromkeys(dropped))})"
        return text + f"\nNote: {note}"
    if name == "app" and rest and rest[0].split("=", 1)[0] in ("--name", "--executable", "--description"):
        return _app_message(rest)
    if name in LEGACY_GROUP_OPTIONS and rest and rest[0].startswith("--") and rest[0] not in ("--help",):
        target, options, flags, note = LEGACY_GROUP_OPTIONS[name]
        if rest[0].split("=", 1)[0] in options:
            return _message(f"{name} {rest[0].split('=', 1)[0]} ...", target, options, flags, note, rest)
    return None
