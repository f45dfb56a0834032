"""Load, check and render settings.yml.

Every problem becomes one line naming the file, the YAML line, the key path and what is wrong::

    settings.yml:14 scheduler.allowed_queues.debug.max_nodes: expected an integer, got 'two'

Sections (see :mod:`balsam.config.sections`): the core ones (``logging``, ``filter_tags``,
``launcher``) and one per installed agent module (``balsam.agent_modules`` entry points, schema =
the module's ``options_schema``). A section whose key names an agent module enables that module;
``null`` or an absent key disables it (the value is then ``None``). An enabled section that no
installed module consumes is refused (an orphan: nothing would act on it).

Driver options (``scheduler.options``, ``launcher.platform_options``) are checked against the
``options_schema`` of the driver the section names and replaced by an instance of it.

Every problem of a file is collected (``SettingsError.errors``), not only the first.

``only=`` reads a subset of the sections: a launcher reads :data:`LAUNCHER_SECTIONS` (core
sections only), which skips importing every installed agent module for its schema (0.17-0.3 s of a
launcher's start-up); the other sections are neither checked nor kept. ``balsam site
check-settings`` and the agent read every section.
"""

from __future__ import annotations

import contextvars
import copy
import datetime as dt
import difflib
import logging
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Collection, Iterable, Optional, Union

import attrs
import yaml

from ..models import MAX_TAG_FILTERS
from ..options import NoOptions, option_help
from ..serialization import show
from .drivers import DRIVER_OPTION_FIELDS
from .schema import LauncherSettings, LoggingSettings
from .sections import CORE_SECTIONS, SectionSpec, core_section_keys, orphan_message, section_specs

__all__ = [
    "CORE_SECTIONS",
    "LAUNCHER_SECTIONS",
    "SectionSpec",
    "Settings",
    "SettingsError",
    "SettingsWarning",
    "core_section_keys",
    "load_settings",
    "options_problems",
    "parse_settings",
    "render_sample_settings",
    "render_settings_yaml",
    "section_specs",
]

#: Balsam 0.7 keys that named Python classes; they are plugin names now.
_RETIRED_KEYS = {
    "scheduler_class": "replaced by scheduler.name, a scheduler plugin name such as 'slurm' (see `balsam plugins ls`)",
    "compute_node": "replaced by launcher.platform, a platform plugin name (see `balsam plugins ls`)",
    "mpi_app_launcher": "replaced by launcher.platform, a platform plugin name (see `balsam plugins ls`)",
    "local_app_launcher": "replaced by launcher.platform, a platform plugin name (see `balsam plugins ls`)",
}


#: What a launcher reads of settings.yml (``only=``): core sections, no agent-module schema needed.
LAUNCHER_SECTIONS: tuple[str, ...] = ("logging", "filter_tags", "launcher")

#: The most seconds a duration key (an agent module's period, a ``*_sec`` or ``*period`` key) may
#: hold: a year. Longer waits overflowed the platform's time_t in the agent's module loop
#: ("OverflowError: timestamp out of range", the module's thread died); a year stays far below
#: threading.TIMEOUT_MAX.
MAX_DURATION_SEC = 365 * 86400


def _is_duration_key(name: str) -> bool:
    return name.endswith(("_sec", "_seconds", "period"))


def _duration_problem(value: Any) -> Optional[str]:
    """Why ``value`` cannot be a duration in seconds (None when it can)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_DURATION_SEC:
        return f"must be at most {MAX_DURATION_SEC} seconds (a year), got {_show(value)}"
    return None


def _validator_message(exc: Exception) -> str:
    """One line from an attrs validator's error: its own message (attrs' ``in_`` and ``ge`` say
    "'name' must be in (...): 'value'", "'name' must be >= 1: 0")."""
    message = str(exc.args[0]) if exc.args else str(exc)
    return message.splitlines()[0] if message else type(exc).__name__


class SettingsError(ValueError):
    """settings.yml (or a settings dict) is wrong. ``str()`` is one line; ``errors`` has them all."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        message = self.errors[0] if self.errors else "invalid settings"
        if len(self.errors) > 1:
            more = len(self.errors) - 1
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        super().__init__(message)


# -- YAML with line numbers ---------------------------------------------------------------------

#: libyaml's parser where PyYAML was built with it (its wheels are), else the pure-Python one; the
#: same documents either way. A settings.yml of 8.5 KB takes 0.4 ms to parse with it against 6 ms,
#: twice per read (the values, then the lines of the keys for error messages), at the start of
#: every launcher, agent and command. A document it refuses is parsed again by the pure-Python
#: loader, whose messages say more ("found character '\t' that cannot start any token").
_FAST_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _RecursiveYAML(ValueError):
    """A YAML alias inside the node it names (``a: &x [*x]``): data that contains itself."""

    def __init__(self, path: tuple, line: int) -> None:
        self.path = path
        self.line = line
        super().__init__(f"{_dotted(path)} is an alias of a node that contains it (data that contains itself)")


def _key_identity(key_node: Any, text: Any) -> Any:
    """A mapping key as the loader keys the dict it builds: ``1`` and ``'1'`` are two keys, ``true``
    and ``True`` (and ``1`` and ``true``: Python's dict equates them) one; the text where the key
    cannot be built or hashed."""
    if isinstance(key_node, yaml.ScalarNode):
        try:
            value = yaml.constructor.SafeConstructor().construct_object(key_node)
            hash(value)
            return ("value", value)
        except Exception:
            pass
    return ("text", text)


#: The tags of the YAML scalars the loader turns into numbers (plain ``1.10``, ``012345``, ``0x10``).
_YAML_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
#: ... and into other values than text (``yes``, ``~``, ``2024-01-01``): for a text key, its error
#: says what was written and to quote it ("got true" named no ``yes`` the file has).
_YAML_READ_TAGS = _YAML_NUMBER_TAGS + ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:null",
                                       "tag:yaml.org,2002:timestamp")
#: First item of a ``numbers`` entry for a mapping *key* written as a number: ``(_KEY_TEXT, *path, number)``.
_KEY_TEXT = "<key>"


def _line_map(text: str, duplicates: Optional[list[tuple[tuple, int, int]]] = None,
              numbers: Optional[dict[tuple, str]] = None) -> dict[tuple, int]:
    """Key path -> 1-based line of that key (or list item) in the YAML text.

    Walked with an explicit stack, each node once: a node reached again through an alias keeps
    the lines of its first place (a document of nested aliases would otherwise take exponential
    time), and an alias inside the node it names raises :class:`_RecursiveYAML` (it recursed until
    "maximum recursion depth exceeded").

    ``duplicates``: gets (key path, line, line of the key's first place) for each key written twice
    in one mapping, which YAML loaders accept silently (the last one wins).

    ``numbers``: gets key path -> the text as written of each value YAML reads as a number (or as
    true/false, null, a date), for the text keys that take a number as its text and name what was
    written otherwise (:meth:`_Checker.value`); a mapping key read as a number (a queue ``0x10:``)
    under ``(_KEY_TEXT, *path, number)``. A path's keys are as written (``7``, not 7), as in the
    lines map: the checker looks a loaded key up by its text."""
    lines: dict[tuple, int] = {}
    try:
        root = yaml.compose(text, Loader=_FAST_YAML_LOADER)
    except yaml.YAMLError:
        return lines
    if root is None:
        return lines
    lines[()] = root.start_mark.line + 1
    open_nodes: set[int] = set()  # the node being walked and the nodes that contain it
    walked: set[int] = set()
    # (node, path, leaving, record): `record` is False under a merge (`<<:`), whose numbers are
    # copied into the mapping that merges it (:func:`_merged_numbers`), which knows which keys win.
    stack: list[tuple[Any, tuple, bool, bool]] = [(root, (), False, True)]
    while stack:
        node, path, leaving, record = stack.pop()
        if leaving:
            open_nodes.discard(id(node))
            walked.add(id(node))
            continue
        if id(node) in walked:
            continue
        open_nodes.add(id(node))
        stack.append((node, path, True, record))
        if isinstance(node, yaml.MappingNode):
            children = [(key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node),
                         key_node.start_mark.line + 1, value_node) for key_node, value_node in node.value]
        elif isinstance(node, yaml.SequenceNode):
            children = [(index, item.start_mark.line + 1, item) for index, item in enumerate(node.value)]
        else:
            continue
        if numbers is not None and isinstance(node, yaml.MappingNode):
            for key_node, _value in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag in _YAML_NUMBER_TAGS:
                    identity = _key_identity(key_node, key_node.value)
                    if identity[0] == "value":
                        numbers.setdefault((_KEY_TEXT, *path, identity[1]), key_node.value)
        if duplicates is not None and isinstance(node, yaml.MappingNode):
            first_lines: dict[Any, int] = {}
            for (key, line, _child), (key_node, _value) in zip(children, node.value):
                if key == "<<":  # YAML merge keys may repeat
                    continue
                identity = _key_identity(key_node, key)
                if identity in first_lines:
                    duplicates.append((path + (key,), line, first_lines[identity]))
                else:
                    first_lines[identity] = line
        for key, line, child in reversed(children):
            lines.setdefault(path + (key,), line)
            merged = key == "<<" and isinstance(node, yaml.MappingNode)
            if record and not merged and numbers is not None and isinstance(child, yaml.ScalarNode) \
                    and child.tag in _YAML_READ_TAGS:
                numbers.setdefault(path + (key,), child.value)
            if id(child) in open_nodes:
                raise _RecursiveYAML(path + (key,), lines[path + (key,)])
            if isinstance(child, (yaml.MappingNode, yaml.SequenceNode)) and id(child) not in walked:
                stack.append((child, path if merged else path + (key,), False, record and not merged))
        if record and numbers is not None and isinstance(node, yaml.MappingNode):
            # After this mapping's own keys, which win over merged ones, as in the loaded data.
            for relative, written in _merged_numbers(node).items():
                numbers.setdefault(path + relative, written)
    return lines


def _merge_sources(node: Any) -> list[Any]:
    """The mappings a YAML mapping merges (``<<: *a``, ``<<: [*a, *b]``), the winner first."""
    sources = []
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == "<<":
            if isinstance(value_node, yaml.MappingNode):
                sources.append(value_node)
            elif isinstance(value_node, yaml.SequenceNode):  # earlier in the list wins
                sources.extend(item for item in value_node.value if isinstance(item, yaml.MappingNode))
    return sources


def _merged_numbers(node: Any) -> dict[tuple, str]:
    """Relative key path -> text as written of the numbers a mapping gets through its merges.

    YAML merges are shallow: a key the mapping writes itself wins with all below it. Among merges
    (``<<: [*a, *b]``, ``<<:`` twice) the earlier should win, but PyYAML's ``flatten_mapping``
    keeps a key's first merged pair by the identity of the key's str object, so which one loads
    varies (``v`` the first, ``version`` the last): every merge's number is recorded, the earlier
    first; the checker only consults it where a number loaded, and refuses it either way. Walks
    each merged node's subtree once per merge (a visited set: a cycle or a nest of aliases costs
    the nodes, not the paths), not the numbers recorded so far (each merge scanned them all)."""
    found: dict[tuple, str] = {}
    sources = _merge_sources(node)
    if not sources:
        return found
    taken = {key_node.value for key_node, _value in node.value
             if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<"}
    seen: set[Any] = set()
    # (node, path, keys to skip): a merge source's keys that the mapping it merges into writes are
    # skipped (None: not a merge source); its nested values keep all their own keys.
    pending: list[tuple[Any, tuple, Optional[set]]] = [(source, (), taken) for source in reversed(sources)]
    while pending:
        current, prefix, exclude = pending.pop()
        if isinstance(current, yaml.ScalarNode):
            if current.tag in _YAML_READ_TAGS:
                found.setdefault(prefix, current.value)
            continue
        # A node once (as the lines map walks it), a merge source once per place it merges into.
        mark = id(current) if exclude is None else (id(current), prefix)
        if mark in seen:
            continue
        seen.add(mark)
        if isinstance(current, yaml.SequenceNode):
            pending.extend((item, prefix + (index,), None) for index, item in reversed(list(enumerate(current.value))))
            continue
        if not isinstance(current, yaml.MappingNode):
            continue
        own = [(key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node), value_node)
               for key_node, value_node in current.value]
        keys = {key for key, _value in own if key != "<<"}
        later: list[tuple[Any, tuple, Optional[set]]] = [
            (value_node, prefix + (key,), None) for key, value_node in own
            if key != "<<" and (exclude is None or key not in exclude)]
        # Its merges after its own keys, without the keys it or the mapping it merges into writes.
        blocked = keys | exclude if exclude is not None else keys
        later.extend((source, prefix, blocked) for source in _merge_sources(current))
        pending.extend(reversed(later))
    return found


def _read_as(value: Any) -> str:
    """What YAML read a plain scalar as, in words ("" for text and the like)."""
    if value is None or isinstance(value, bool):
        return _show(value)
    if isinstance(value, dt.datetime):
        return "a date and time"
    if isinstance(value, dt.date):
        return "a date"
    return ""


def _dotted(path: tuple) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "(top level)"


#: The most characters of one problem's message: a validator echoing a 100,000-character value
#: whole made a 100,000-character "one-line" error (values the loader shows are cut by ``show``).
MAX_MESSAGE_CHARS = 500


def _shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return show(value)  # repr cut to about 60 characters


#: What YAML 1.1 (PyYAML) reads as true/false, even as a key: ``on:`` is the key True.
_YAML_BOOL_WORDS = {True: ("yes", "on", "true"), False: ("no", "off", "false")}
_YAML_BOOL_KEY_HINT = "YAML reads on/yes/no/off as true/false: quote the key"


class _Checker:
    """Turns plain YAML data into schema objects, collecting located errors."""

    INVALID = object()

    def __init__(self, source: str, lines: dict[tuple, int], numbers: Optional[dict[tuple, str]] = None) -> None:
        self.source = source
        self.lines = lines
        #: key path -> a number's text as written (see :func:`_line_map`); empty for plain data.
        self.numbers = numbers or {}
        self.errors: list[tuple[int, str]] = []

    def locate(self, path: tuple, message: str) -> tuple[int, str]:
        """(line, ``"<file>:<line> <key path>: <message>"``): the line of the key, else of the
        nearest enclosing key the file has."""
        line = 0
        probe = path
        while True:
            if probe in self.lines:
                line = self.lines[probe]
                break
            if not probe:
                break
            probe = probe[:-1]
        where = f"{self.source}:{line}" if line else self.source
        return line, f"{where} {_dotted(path)}: {message}"

    def fail(self, path: tuple, message: str) -> Any:
        self.errors.append(self.locate(path, _shorten(message)))
        return self.INVALID

    def value(self, data: Any, tp: Any, path: tuple) -> Any:
        origin = typing.get_origin(tp)
        if tp is Any:
            return data
        if origin in (Union, types.UnionType):
            args = typing.get_args(tp)
            if data is None and type(None) in args:
                return None
            others = [a for a in args if a is not type(None)]
            if len(others) == 1:
                return self.value(data, others[0], path)
            return data
        if attrs.has(tp):
            return self.record(data, tp, path)
        if tp is bool:
            if isinstance(data, bool):
                return data
            return self.fail(path, f"expected true or false, got {_show(data)}")
        if tp is int:
            if isinstance(data, int) and not isinstance(data, bool):
                return data
            return self.fail(path, f"expected an integer, got {_show(data)}")
        if tp is float:
            if isinstance(data, (int, float)) and not isinstance(data, bool):
                # .nan and .inf are YAML floats; no option means them (a NaN period made the agent's
                # module loop spin, an infinite one ended its thread).
                if isinstance(data, float) and not math.isfinite(data):
                    return self.fail(path, f"expected a finite number, got {_show(data)}")
                return float(data)
            return self.fail(path, f"expected a number, got {_show(data)}")
        if tp is str:
            if isinstance(data, str):
                return data
            if isinstance(data, (int, float)) and not isinstance(data, bool):
                # Project names like 12345 are strings; but a number YAML reads as another value than
                # the one written was taken in its read form, silently: project 012345 became '5349'
                # (YAML 1.1 octal), a tag `version: 1.10` became '1.1' and matched no job, 0x10 '16'.
                written = self.numbers.get(path)
                if written is not None and written != str(data):
                    return self.fail(path, f"expected a string, got {written}, which YAML reads as the number "
                                           f"{data}: quote it ('{written}')")
                return str(data)
            written = self.numbers.get(path)
            read = _read_as(data)
            if written and read and written != _show(data):
                # `version: yes` said "got true", `day: 2024-01-01` "got datetime.date(2024, 1, 1)":
                # neither named what the file has, nor that quoting it keeps it as text.
                return self.fail(path, f"expected a string, got {written}, which YAML reads as {read}: "
                                       f"quote it ('{written}')")
            return self.fail(path, f"expected a string, got {_show(data)}")
        if origin is dict:
            key_type, value_type = typing.get_args(tp) or (str, Any)
            if not isinstance(data, dict):
                return self.fail(path, f"expected a mapping, got {_show(data)}")
            result = {}
            for key, item in data.items():
                if isinstance(key, (dict, list)) or key is None:
                    self.fail(path, f"keys must be names, got {_show(key)}")
                    continue
                if isinstance(key, bool):  # `on: x` would become the name "True"
                    self.fail(self.bool_key_path(path, key), f"a key read as {_show(key)} ({_YAML_BOOL_KEY_HINT})")
                    continue
                written = self.numbers.get((_KEY_TEXT, *path, key)) if isinstance(key, (int, float)) else None
                if written is not None and written != str(key):
                    # A queue `0x10:` became the queue '16', a tag key `010:` the key '8', silently.
                    self.fail(path + (written,), f"a key written {written}, which YAML reads as the number {key}: "
                                             f"quote it ('{written}')")
                    continue
                # Under its text, as the lines and numbers maps key it (a tag `7: 1.10` under 7 found
                # neither: it became '1.1', and an error there named the mapping's line).
                converted = self.value(item, value_type, path + (str(key),))
                if converted is not self.INVALID:
                    result[str(key)] = converted
            return result
        if origin is list:
            (item_type,) = typing.get_args(tp) or (Any,)
            if isinstance(data, (str, int, float)) and not isinstance(data, bool) and item_type is str:
                data = [data]  # `allowed_projects: local` means a one-item list
                if path in self.numbers:  # its item is the scalar as written (`allowed_projects: 012345`)
                    self.numbers.setdefault(path + (0,), self.numbers[path])
            if not isinstance(data, list):
                return self.fail(path, f"expected a list, got {_show(data)}")
            result_list = []
            for index, item in enumerate(data):
                converted = self.value(item, item_type, path + (index,))
                if converted is not self.INVALID:
                    result_list.append(converted)
            return result_list
        raise TypeError(f"settings schema type {tp!r} at {_dotted(path)} is not supported")

    def record(self, data: Any, cls: type, path: tuple) -> Any:
        if not isinstance(data, dict):
            return self.fail(path, f"expected a mapping of {cls.__name__} keys, got {_show(data)}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in attrs.fields(cls)}
        kwargs = {}
        ok = True
        suggested: set[str] = set()
        for key, item in data.items():
            if isinstance(key, bool):
                # `on: 1` is the key True to YAML 1.1: "logging.True: unknown key" named no key written.
                self.fail(self.bool_key_path(path, key), f"unknown key ({_YAML_BOOL_KEY_HINT})")
                ok = False
                continue
            key = str(key)
            if key not in fields:
                suggested.add(self.unknown(path + (key,), list(fields)))
                ok = False
                continue
            if (key.endswith("_path") and item is not None and not isinstance(item, str)
                    and hints.get(key) in (str, Optional[str])):
                # A path is text: `job_template_path: 5` is no file name anyone meant (the loader
                # otherwise turns numbers into strings, for project names like 12345).
                self.fail(path + (key,), f"expected a string (a file path), got {_show(item)}")
                ok = False
                continue
            converted = self.value(item, hints.get(key, Any), path + (key,))
            problem = _duration_problem(converted) if _is_duration_key(key) else None
            if problem:
                self.fail(path + (key,), problem)
                converted = self.INVALID
            if converted is self.INVALID:
                ok = False
            else:
                kwargs[key] = converted
        missing = [name for name, field in fields.items() if name not in kwargs and field.default is attrs.NOTHING]
        for name in missing:
            if name not in data and name not in suggested:  # else its own problem was reported
                self.fail(path + (name,) if path + (name,) in self.lines else path, f"missing required key '{name}'")
        if missing:
            return self.INVALID  # cannot be built to check further (already reported)
        # Each key's own validator first, so that every bad value of the section is reported at once
        # (attrs stops at the first); a key that fails it is left out, its default standing in while
        # the rest of the section is checked.
        for name in list(kwargs):
            field = fields[name]
            if field.validator is None or field.converter is not None:
                continue
            try:
                field.validator(None, field, kwargs[name])
            except (TypeError, ValueError) as exc:
                self.fail(path + (name,), _validator_message(exc))
                del kwargs[name]
                ok = False
            except AttributeError:  # a validator that reads the instance: checked when it is built
                pass
        given_ok = set(kwargs)  # keys the file sets and that passed their own checks
        try:
            obj = cls(**kwargs)
        except (TypeError, ValueError) as exc:
            # A schema's attrs validator (``in_``, ``ge``, a driver's own): its error on the key's
            # line, not a traceback. attrs passes the field as the second argument; a validator of
            # the schema's own raising a plain message is reported on the section.
            message = _validator_message(exc)
            field = exc.args[1].name if len(exc.args) > 1 and isinstance(exc.args[1], attrs.Attribute) else None
            if field is None:  # attrs' ge/le/max_len name the field only in words: "'name' must be >= 1: 0"
                quoted = message.split("'")[1] if message.startswith("'") and message.count("'") >= 2 else None
                field = quoted if quoted in fields else None
            self.fail(path + (field,) if field is not None else path, message)
            return self.INVALID
        validate = getattr(obj, "validate", None)
        if callable(validate):
            # What :func:`options_problems` (called by a section's validate()) checks against: the
            # numbers as written under this section (`backend_options.globus.label: 1.10` became 1.1).
            token = _VALIDATING.set((self.numbers, path))
            try:
                found = validate() or {}
            finally:
                _VALIDATING.reset(token)
            for name, problem in found.items():
                # With other keys of the section already wrong, only problems of keys the file sets
                # and that passed their own checks: a default standing in for a bad value could
                # otherwise be blamed in a cross-key check.
                if not ok and name.split(".")[0] not in given_ok:
                    continue
                # A dotted name ("transfer_locations.alias") is a path: its own line, when the YAML has it.
                self.fail(path + tuple(name.split(".")), problem)
                ok = False
        return obj if ok else self.INVALID

    def bool_key_path(self, path: tuple, key: bool) -> tuple:
        """The path of a key YAML read as a boolean, with the key as written (``yes``, ``on``...)
        where the file has it, so that the error names it and its line."""
        for word in _YAML_BOOL_WORDS[key]:
            for spelling in (word, word.capitalize(), word.upper()):
                if path + (spelling,) in self.lines:
                    return path + (spelling,)
        return path + (str(key).lower(),)

    def unknown(self, path: tuple, known: Iterable[str]) -> str:
        """Report an unknown key; return the suggested key ("" when none)."""
        key = str(path[-1])
        if key in _RETIRED_KEYS:
            self.fail(path, f"unknown key: {_RETIRED_KEYS[key]}")
            return ""
        known = list(known)
        matches = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if len(path) == 1:
            self.fail(path, orphan_message(key, matches[0] if matches else None))
            return matches[0] if matches else ""
        if matches:
            hint = f" (did you mean '{matches[0]}'?)"
        elif known:
            hint = f" (known keys: {', '.join(known)})"
        else:
            hint = " (no keys are accepted here)"
        self.fail(path, f"unknown key{hint}")
        return matches[0] if matches else ""

    def sorted_errors(self) -> list[str]:
        return [message for _, message in sorted(self.errors, key=lambda e: e[0])]


# -- Settings -----------------------------------------------------------------------------------


@attrs.frozen
class SettingsWarning:
    """One of a settings file's warnings, kept apart: the ``section`` it is about ("" for the file
    as a whole), its ``line`` (0: not known) and its ``text`` as shown (``"<file>:<line> <key path>:
    why"``). Who logs it picks by section (:meth:`Settings.agent_warnings`), never by reading the
    text back apart."""

    section: str
    line: int
    text: str

    def __str__(self) -> str:
        return self.text


class Settings:
    """Loaded settings: ``settings.launcher.platform``, ``settings.scheduler.allowed_queues`` ...

    Every section (core or contributed by a plugin) is an attribute and an entry of
    ``settings.sections``; a disabled agent-module section is ``None``. ``Settings()`` gives the
    defaults of a new settings.yml; keyword arguments replace whole sections (an attrs object, a
    dict in settings.yml shape, or None).
    """

    #: Keys that are valid but do nothing as set, from each section's optional ``warnings(self)`` and
    #: ``warnings_with(sections)`` (``{field: text}``), ordered by line; set by :func:`parse_settings`.
    warning_items: tuple[SettingsWarning, ...] = ()

    @property
    def warnings(self) -> tuple[str, ...]:
        """The texts of :attr:`warning_items` (``"<file>:<line> <key path>: why"``)."""
        return tuple(item.text for item in self.warning_items)

    def __init__(self, sections: Optional[dict[str, Any]] = None, *, source: str = "<defaults>",
                 only: Optional[Collection[str]] = None, **overrides: Any) -> None:
        if sections is None:
            sections = _default_sections()
        sections = dict(sections)
        if overrides:
            specs = {s.key: s for s in section_specs()}
            checker = _Checker(source, {})
            for key, value in overrides.items():
                spec = specs.get(key)
                if spec is None:
                    if value is not None:
                        checker.unknown((key,), list(specs))
                elif value is not None and spec.error:
                    checker.fail((key,), _unloadable(spec))
                elif value is None or (attrs.has(spec.schema) and isinstance(value, spec.schema)):
                    sections[key] = value
                else:
                    converted = checker.value(value, spec.schema, (key,))
                    if converted is not checker.INVALID:
                        sections[key] = converted
            _bind_driver_options(sections, checker)
            if checker.errors:
                raise SettingsError(checker.sorted_errors())
        object.__setattr__(self, "sections", sections)
        object.__setattr__(self, "source", source)
        #: The sections read when the file was read with ``only=`` (None: every section).
        object.__setattr__(self, "only", tuple(only) if only is not None else None)

    def warnings_of(self, key: str) -> tuple[str, ...]:
        """The :attr:`warnings` about section ``key`` (the section itself or a key in it)."""
        return tuple(item.text for item in self.warning_items if item.section == key)

    def agent_warnings(self) -> tuple[str, ...]:
        """The warnings a site agent logs once when it starts (docs/settings.md, "Errors"): those
        about ``logging`` and about each agent module's section that is enabled. The launcher's
        sections are the launcher's; "no agent module is enabled" the agent says in its own words."""
        modules = {spec.key for spec in section_specs() if spec.disableable}
        return tuple(item.text for item in self.warning_items
                     if item.section == "logging" or (item.section in modules and self.sections.get(item.section) is not None))

    # The core sections, spelled out for readers and type checkers.
    @property
    def logging(self) -> LoggingSettings:
        return self.sections["logging"]

    @property
    def filter_tags(self) -> dict[str, str]:
        return self.sections["filter_tags"]

    @property
    def launcher(self) -> LauncherSettings:
        return self.sections["launcher"]

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        if name.startswith("_"):
            raise AttributeError(name)
        if self.__dict__.get("only") is not None:
            raise AttributeError(f"settings have no section '{name}': only {', '.join(sections)} were read "
                                 f"(read them without only= for every section)")
        raise AttributeError(f"settings have no section '{name}' (sections: {', '.join(sections)})")

    def is_enabled(self, key: str) -> bool:
        return self.sections.get(key) is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain data in settings.yml shape (what :func:`render_settings_yaml` writes)."""
        return {key: _plain(value) for key, value in self.sections.items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Settings(source={self.source!r}, sections={list(self.sections)})"


def _plain(value: Any) -> Any:
    if attrs.has(type(value)):
        # A field newer than settings.yml's usual shape (omit_if_default, as on the wire) is written
        # only when set: every other queue keeps its three keys.
        return {f.name: _plain(getattr(value, f.name)) for f in attrs.fields(type(value))
                if not (f.metadata.get("omit_if_default") and getattr(value, f.name) == f.default)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _default_sections() -> dict[str, Any]:
    return {s.key: (s.default() if s.enabled_by_default else None) for s in section_specs()}


def _wanted_specs(only: Optional[Collection[str]]) -> dict[str, SectionSpec]:
    """Key -> spec of the sections to read: every one, or those named in ``only``. Core sections
    alone need no plugin: the agent modules (whose classes hold the other schemas) stay unimported."""
    if only is None:
        return {s.key: s for s in section_specs()}
    wanted = set(only)
    core = {s.key: s for s in CORE_SECTIONS if s.key in wanted}
    if wanted <= set(core):
        return core
    return {s.key: s for s in section_specs() if s.key in wanted}


def parse_settings(data: Any, *, source: str = "settings.yml", lines: Optional[dict[tuple, int]] = None,
                   only: Optional[Collection[str]] = None, base_dir: Optional[Path] = None,
                   numbers: Optional[dict[tuple, str]] = None) -> Settings:
    """Check plain data (as loaded from YAML) against the schema; raise SettingsError on problems.

    ``only``: read just these sections (the others are neither checked nor kept). ``base_dir``: the
    directory of the settings file (the site's, for a site's settings.yml), against which each
    section's optional ``validate_files(base_dir) -> {field: problem}`` checks the files it names;
    None: files are not checked. ``numbers``: key path -> a number's text as written in the YAML
    file (from :func:`_line_map`): a text key whose number reads as another value is refused."""
    checker = _Checker(source, lines or {}, numbers)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        checker.fail((), f"expected a mapping of sections, got {_show(data)}")
        raise SettingsError(checker.sorted_errors())
    specs = _wanted_specs(only)
    sections: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(key, bool) and value is not None:
            checker.fail(checker.bool_key_path((), key), f"unknown section ({_YAML_BOOL_KEY_HINT})")
            continue
        key = str(key)
        spec = specs.get(key)
        if spec is None:
            if only is not None:
                continue  # not asked for: not checked
            if value is not None:  # `key: null` disables a section whether or not its module is installed
                checker.unknown((key,), list(specs))
            continue
        if value is not None and spec.error:
            checker.fail((key,), _unloadable(spec))
            continue
        if value is None:
            if spec.disableable:
                sections[key] = None
            elif spec.key == "filter_tags":
                sections[key] = {}
            else:
                checker.fail((key,), "this section cannot be null (remove the key to use the defaults)")
            continue
        converted = checker.value(value, spec.schema, (key,))
        if spec.key == "filter_tags" and converted is not checker.INVALID and len(converted) > MAX_TAG_FILTERS:
            # Every launcher's acquire sends them, and the API refuses more (each acquire a 422).
            checker.fail((key,), f"at most {MAX_TAG_FILTERS} tags (the API's limit on an acquire's filter_tags), "
                         f"got {len(converted)}")
        elif converted is not checker.INVALID:
            sections[key] = converted
            if spec.disableable:
                _check_module_periods(key, converted, checker)
    for key, spec in specs.items():
        if key not in data:
            sections[key] = None if spec.disableable else spec.default()
    _bind_driver_options(sections, checker, data, specs)
    if not checker.errors:
        # Rules across sections (a section's values that another section refuses), once each
        # section is valid on its own: ``validate_with(sections) -> {field: problem}``.
        for key, section in sections.items():
            cross = getattr(section, "validate_with", None)
            if section is not None and callable(cross):
                for name, problem in cross(sections).items():
                    # A dotted name ("allowed_queues.Normal") is a path, as from validate(): its own line;
                    # "" is the section as a whole (its line).
                    checker.fail((key, *[part for part in name.split(".") if part]), problem)
    if not checker.errors and base_dir is not None:
        _check_files(sections, Path(base_dir), checker)
    if checker.errors:
        raise SettingsError(checker.sorted_errors())
    ordered = {key: sections[key] for key in specs}
    settings = Settings(ordered, source=source, only=only)
    warnings = _section_warnings(ordered, checker)
    modules = [key for key, spec in specs.items() if spec.disableable]
    if only is None and modules and all(ordered[key] is None for key in modules):
        # Valid, but an agent started on it runs on and does nothing, saying nothing about why.
        warnings = (_warning(checker, (), "no agent module is enabled: the agent will do nothing (enable one of "
                             f"{', '.join(modules)})"),) + warnings
    if only is None:
        retention = _retention_warning(data, ordered, checker)
        if retention:
            warnings = warnings + (retention,)
    # In the file's order, as the errors are (the line-less ones, as the top level's, first).
    object.__setattr__(settings, "warning_items", tuple(sorted(warnings, key=lambda item: item.line)))
    return settings


def _warning(checker: "_Checker", path: tuple, text: str) -> SettingsWarning:
    line, located = checker.locate(path, text)
    return SettingsWarning(str(path[0]) if path else "", line, located)


def _retention_warning(raw: dict, sections: dict[str, Any], checker: "_Checker") -> Optional[SettingsWarning]:
    """``logging.retention_days`` in the file, but nothing acts on it: the sweep that removes old
    files runs in the scheduler module only (docs/settings.md), and with ``scheduler: null`` the key
    removed nothing, silently. Only when the file has the key: the default (30) in a file without it
    asks for nothing. `balsam site init` writes ``retention_days: 30``, so a site made by it and
    then given ``scheduler: null`` draws this warning until the key is set to 0 or removed."""
    written = raw.get("logging")
    log = sections.get("logging")
    if not isinstance(written, dict) or "retention_days" not in written or log is None or not log.retention_days:
        return None
    if "scheduler" not in sections or sections["scheduler"] is not None:
        return None
    return _warning(checker, ("logging", "retention_days"), "no file is removed: the sweep runs in the scheduler "
                    "module, which is disabled (scheduler: null or left out); enable it, or set retention_days to 0")


def _check_files(sections: dict[str, Any], base_dir: Path, checker: _Checker) -> None:
    """Each section's ``validate_files``: a file it names that is missing (a job template) was
    accepted, then every BatchJob failed at submission."""
    for key, section in sections.items():
        method = getattr(section, "validate_files", None) if section is not None else None
        if callable(method):
            for name, problem in (method(base_dir) or {}).items():
                checker.fail((key, name), problem)


def _check_module_periods(key: str, section: Any, checker: _Checker) -> None:
    """An agent module's period fields (its class's ``period_fields``, whatever their names) hold
    at most :data:`MAX_DURATION_SEC`: the agent waits that long between two cycles."""
    from balsam.plugins.manager import get_plugin_manager

    record = get_plugin_manager().list_drivers("agent_module").get(key)
    cls = record.obj if record is not None and record.status == "ok" else None
    for name in getattr(cls, "period_fields", ()) or ():
        if _is_duration_key(name):
            continue  # checked with the section's keys
        value = section.get(name) if isinstance(section, dict) else getattr(section, name, None)
        problem = _duration_problem(value)
        if problem:
            checker.fail((key, name), problem)


def _section_warnings(sections: dict[str, Any], checker: "_Checker") -> tuple[SettingsWarning, ...]:
    """The located lines of each section's optional ``warnings(self) -> {field: text}``: keys that
    pass every check but do nothing as set (e.g. keys the chosen strategy does not read), which a
    user must hear about rather than find out (the file still loads). Then its optional
    ``warnings_with(sections) -> {field: text}`` (as ``validate_with`` for errors): a section valid
    on its own that another section leaves with nothing to act on (the queue maintainer's
    BatchJobs with the scheduler module off)."""
    found: list[SettingsWarning] = []
    for key, section in sections.items():
        if section is None or not attrs.has(type(section)):
            continue
        own, across = getattr(section, "warnings", None), getattr(section, "warnings_with", None)
        calls = []
        if callable(own):
            calls.append(("could not check for ignored keys", own))
        if callable(across):
            calls.append(("could not check against the other sections", lambda across=across: across(sections)))
        for failed, call in calls:
            try:
                items = dict(call() or {})
            except Exception as exc:  # a plugin's warnings must not stop settings.yml from loading
                items = {"": f"{failed}: {type(exc).__name__}: {exc}"}
            for name, text in items.items():
                found.append(_warning(checker, (key, *[part for part in str(name).split(".") if part]), str(text)))
    return tuple(sorted(found, key=lambda item: item.line))


#: Settings warnings already logged by this process (each once, however often the file is read).
_LOGGED_WARNINGS: set[str] = set()


def _log_warnings(settings: Settings) -> None:
    for line in settings.warnings:
        if line not in _LOGGED_WARNINGS:
            _LOGGED_WARNINGS.add(line)
            # Without logging set up (a `balsam` command), Python writes a warning to stderr.
            logging.getLogger("balsam.config").warning("Warning: %s", line)


def _unloadable(spec: SectionSpec) -> str:
    where = f" from {spec.plugin}" if spec.plugin else ""
    return f"the agent module '{spec.key}'{where} cannot be loaded ({spec.error}); fix or uninstall it, or set this section to null"


def _bind_driver_options(sections: dict[str, Any], checker: _Checker, raw: Optional[dict] = None,
                         specs: Optional[dict[str, SectionSpec]] = None) -> None:
    """Check each driver name (``scheduler.name``, ``launcher.platform``) against the installed
    plugins and its options (``scheduler.options``, ``launcher.platform_options``) against that
    driver's ``options_schema``; replace the options mapping with the schema instance.

    A section that failed its own checks is still looked at through its ``raw`` YAML data, so that
    one run reports the options' problems too. ``specs``: the sections read (default: every one)."""
    from balsam.plugins.manager import PluginError, did_you_mean, get_plugin_manager

    pm = get_plugin_manager()
    for key, name_field, options_field, kind in DRIVER_OPTION_FIELDS:
        if specs is not None and key not in specs:
            continue
        section = sections.get(key)
        raw_section = (raw or {}).get(key)
        if section is not None and attrs.has(type(section)):
            name, options = getattr(section, name_field, None), getattr(section, options_field, None)
        elif key not in sections and isinstance(raw_section, dict):
            spec = (specs if specs is not None else {s.key: s for s in section_specs()}).get(key)
            if spec is None or not attrs.has(spec.schema):
                continue
            section = None  # invalid: check its driver and options, keep nothing
            name = raw_section.get(name_field, getattr(spec.schema(), name_field))
            options = raw_section.get(options_field)
        else:
            continue
        if not isinstance(name, str):
            continue
        available = sorted(pm.list_drivers(kind, resolve=False))
        if name not in available:
            hint = did_you_mean(name, available)
            checker.fail(
                (key, name_field),
                f"unknown {kind} '{name}' (available: {', '.join(available) or 'none'}" + (f"; {hint})" if hint else ")"),
            )
            continue
        try:
            schema = getattr(pm.load_driver(kind, name), "options_schema", NoOptions)
        except PluginError as exc:
            checker.fail((key, name_field), str(exc))
            continue
        if isinstance(options, schema):
            continue
        if not attrs.fields(schema) and isinstance(options, dict) and options:
            for option_name in options:
                checker.fail((key, options_field, str(option_name)), f"unknown option ({kind} '{name}' takes no options)")
            continue
        converted = checker.value({} if options is None else options, schema, (key, options_field))
        if converted is not checker.INVALID and section is not None:
            sections[key] = attrs.evolve(section, **{options_field: converted})


#: (numbers, path) of the section whose ``validate()`` runs now (see :meth:`_Checker.record`).
_VALIDATING: contextvars.ContextVar[Optional[tuple[dict[tuple, str], tuple]]] = contextvars.ContextVar(
    "balsam_settings_validating", default=None)


class _ProblemCollector(_Checker):
    """A checker that keeps each problem under its key path instead of locating it."""

    def __init__(self, numbers: Optional[dict[tuple, str]] = None) -> None:
        super().__init__("", {}, numbers)
        self.problems: dict[str, str] = {}

    def fail(self, path: tuple, message: str) -> Any:
        self.problems.setdefault(_dotted(path), message)
        return self.INVALID


def options_problems(schema: type, values: Any, path: tuple) -> dict[str, str]:
    """The problems the loader finds in ``values`` against a driver's ``options_schema`` (types,
    unknown keys, validators), as {dotted key path starting with ``path``: message}. For a section
    holding the options of several drivers (``transfers.backend_options``): its ``validate()``
    returns them, and the loader reports each with file and line like scheduler.options'."""
    numbers: dict[tuple, str] = {}
    validating = _VALIDATING.get()
    if validating is not None:
        # Called from a section's validate() while settings.yml is read: ``path`` is under that
        # section, and a text option written as a number YAML reads differently is refused as
        # anywhere else in the file (the section's path is put back by the loader).
        written, section_path = validating
        numbers = {key[len(section_path):]: text for key, text in written.items()
                   if key[:len(section_path)] == section_path and key[0] != _KEY_TEXT}
    collector = _ProblemCollector(numbers)
    collector.value({} if values is None else values, schema, tuple(path))
    return collector.problems


def load_settings(path: Union[str, os.PathLike], *, only: Optional[Collection[str]] = None,
                  log_warnings: bool = True) -> Settings:
    """Read and check a settings.yml; every problem is a :class:`SettingsError` naming file and line.

    ``only``: read just these sections (e.g. :data:`LAUNCHER_SECTIONS`). ``log_warnings``: log each
    of the file's :attr:`Settings.warnings` (once per process) as a WARNING of ``balsam.config``,
    which a ``balsam`` command without logging set up (``balsam site check-settings``) prints on
    stderr; :class:`~balsam.config.SiteConfig` reads without it: the agent logs
    :meth:`Settings.agent_warnings` into its log when it starts."""
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SettingsError([f"{source}: file not found"]) from None
    except OSError as exc:
        raise SettingsError([f"{source}: cannot read the file ({exc.strerror or exc})"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Not an OSError: it escaped as "'utf-8' codec can't decode byte 0xff ..." naming no file.
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SettingsError([f"{source}:{line}: not UTF-8 text (byte {exc.start + 1}: 0x{raw[exc.start]:02x})"]) from None
    settings = loads_settings(text, source=source, only=only, base_dir=path.absolute().parent)
    if log_warnings:
        _log_warnings(settings)
    return settings


def loads_settings(text: str, *, source: str = "settings.yml", only: Optional[Collection[str]] = None,
                   base_dir: Optional[Path] = None) -> Settings:
    """Like :func:`load_settings` for YAML text (``base_dir``: see :func:`parse_settings`)."""
    try:
        data = _load_yaml(text, source)
    except RecursionError:
        # Lists or mappings nested ~1,000 deep ("a: [[[[...]]]]"): the YAML loaders recursed, and the
        # RecursionError named no file ("Error: maximum recursion depth exceeded while calling a
        # Python object" from `balsam site check-settings`, `sync`, the agent).
        raise SettingsError([_too_deep(text, source)]) from None
    if _nesting_exceeds(data, MAX_SETTINGS_NESTING):
        # Read, but deeper than the checks (and the line map) should recurse: refused here, so a
        # RecursionError from them (or a plugin's validator) is a bug shown as one, not relabelled.
        raise SettingsError([_too_deep(text, source)])
    duplicates: list[tuple[tuple, int, int]] = []
    numbers: dict[tuple, str] = {}
    try:
        lines = _line_map(text, duplicates, numbers)
    except _RecursiveYAML as exc:
        raise SettingsError([f"{source}:{exc.line}: invalid YAML: {exc}"]) from None
    if duplicates:
        # The loaders keep the last value silently: a section written twice lost its first half.
        raise SettingsError([f"{source}:{line} {_dotted(path)}: duplicate key (first at line {first})"
                             for path, line, first in sorted(duplicates, key=lambda item: item[1])])
    return parse_settings(data, source=source, lines=lines, only=only, base_dir=base_dir, numbers=numbers)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_FAST_YAML_LOADER)
    except yaml.YAMLError:
        return _load_yaml_for_its_error(text, source)


#: How deep lists and mappings in settings.yml may nest (a real file: five levels or so).
MAX_SETTINGS_NESTING = 100
_TOO_DEEP = (f"lists or mappings nested more than {MAX_SETTINGS_NESTING} levels inside one another (a settings "
             "file nests five or so)")


def _too_deep(text: str, source: str) -> str:
    """The one line for a file nested more than :data:`MAX_SETTINGS_NESTING` deep (valid YAML, but
    no settings file), at the line where that level opens when the YAML events find it: they
    are read one at a time without recursing, and only on this error path. libyaml refuses flow
    collections ~1,000 deep itself; the pure-Python parser then reads them."""
    for loader in dict.fromkeys((_FAST_YAML_LOADER, yaml.SafeLoader)):
        depth = 0
        try:
            for event in yaml.parse(text, Loader=loader):
                if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                    depth += 1
                    if depth > MAX_SETTINGS_NESTING:
                        return f"{source}:{event.start_mark.line + 1}: {_TOO_DEEP}"
                elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                    depth -= 1
        except yaml.YAMLError:
            continue
    return f"{source}: {_TOO_DEEP}"


def _nesting_exceeds(data: Any, limit: int) -> bool:
    """Whether lists or mappings in ``data`` nest more than ``limit`` deep, without recursing. An
    alias inside the node it names (a cycle) is left to :func:`_line_map`, which names its line;
    a node shared by aliases is walked again only when reached deeper (no blow-up on alias bombs)."""
    deepest: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(data, 0, False)]
    while stack:
        value, depth, leaving = stack.pop()
        if leaving:
            on_path.discard(id(value))
            continue
        if not isinstance(value, (dict, list)) or id(value) in on_path or deepest.get(id(value), -1) >= depth:
            continue
        if depth >= limit:
            return True
        deepest[id(value)] = depth
        on_path.add(id(value))
        stack.append((value, depth, True))
        stack.extend((child, depth + 1, False) for child in (value.values() if isinstance(value, dict) else value))
    return False


def _load_yaml_for_its_error(text: str, source: str) -> Any:
    """The pure-Python loader's reading of a document the fast one refused: its error, as a
    SettingsError naming the file and line (or the document, should it accept it after all)."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise SettingsError([f"{source}{line}: invalid YAML: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise SettingsError([f"{source}: invalid YAML: {str(exc).splitlines()[0]}"]) from None


# -- rendering a commented settings.yml ------------------------------------------------------------


def _comment(text: str, indent: str) -> list[str]:
    import textwrap

    lines = []
    for paragraph in text.strip().splitlines():
        for line in textwrap.wrap(paragraph, width=96 - len(indent)) or [""]:
            lines.append(f"{indent}# {line}".rstrip())
    return lines


def _dump_value(key: str, value: Any, indent: str) -> list[str]:
    text = yaml.safe_dump({key: value}, default_flow_style=False, sort_keys=False, width=1000)
    return [indent + line for line in text.rstrip("\n").splitlines()]


def _render_fields(obj: Any, indent: str) -> list[str]:
    """Each field of an attrs instance with its help text as a comment; a field whose value is an
    attrs instance itself (driver options) is rendered the same way, one level deeper."""
    body: list[str] = []
    for field in attrs.fields(type(obj)):
        help_text = field.metadata.get("help", "")
        if help_text:
            body.extend(_comment(help_text, indent))
        value = getattr(obj, field.name)
        if attrs.has(type(value)) and attrs.fields(type(value)):
            body.append(f"{indent}{field.name}:")
            body.extend(_render_fields(value, indent + "  "))
        else:
            body.extend(_dump_value(field.name, _plain(value), indent))
    return body


def _render_section(spec: SectionSpec, value: Any, enabled: bool) -> list[str]:
    out = _comment(spec.comment, "") if spec.comment else []
    if spec.plugin and spec.plugin not in ("core", "balsam"):
        out.append(f"# (section of an agent module from the '{spec.plugin}' distribution)")
    if spec.error:
        out.append(f"# (the agent module '{spec.key}' cannot be loaded: {spec.error})")
    if not attrs.has(spec.schema):
        out.extend(_dump_value(spec.key, _plain(value if value is not None else spec.default()), ""))
        return out
    shown = value if value is not None else spec.default()
    body = _render_fields(shown, "  ")
    if enabled:
        out.append(f"{spec.key}:")
        out.extend(body)
    else:
        out.append(f"{spec.key}: null")
        out.append("# To enable it, replace the line above with (values shown are the defaults):")
        out.append(f"# {spec.key}:")
        out.extend("# " + line for line in body)
    return out


def _driver_options_reference() -> list[str]:
    """Comment block: the options of every installed scheduler and platform plugin, with help."""
    from balsam.plugins.manager import get_plugin_manager

    pm = get_plugin_manager()
    out = [
        "",
        "# -- Driver options -------------------------------------------------------------------------",
        "# The options each installed driver accepts, with their defaults. They go under",
        "# scheduler.options (for the scheduler named by scheduler.name) and launcher.platform_options",
        "# (for the platform named by launcher.platform).",
    ]
    for section, _name_field, options_field, kind in DRIVER_OPTION_FIELDS:
        for name, record in pm.list_drivers(kind).items():
            where = f"{section}.{options_field} when {section}.{_name_field} is '{name}'"
            if record.status != "ok":
                out.append(f"# {where}: (cannot be loaded: {record.error})")
                continue
            schema = getattr(record.obj, "options_schema", NoOptions)
            if not option_help(schema):
                out.append(f"# {where}: none")
                continue
            out.append(f"# {where}:")
            out.extend("# " + line for line in _render_fields(schema(), "  "))
    return out


def render_settings_yaml(overrides: Optional[dict[str, Any]] = None, *, source: str = "settings overrides") -> str:
    """A complete, commented settings.yml: the defaults with ``overrides`` (settings.yml shape) applied.

    A section set to a mapping in ``overrides`` is enabled with those fields replacing the defaults
    (each field whole: given ``allowed_queues`` replace the default ones); ``None`` disables it. The result is checked by loading it back, so a bad override raises
    SettingsError naming the key.
    """
    overrides = overrides or {}
    specs = section_specs()
    data: dict[str, Any] = {}
    for spec in specs:
        default = _plain(spec.default()) if spec.enabled_by_default else None
        if spec.key in overrides:
            override = overrides[spec.key]
            if override is None:
                data[spec.key] = None
            elif isinstance(override, dict) and attrs.has(spec.schema):
                # Field by field: a field given in the overrides replaces the default value whole
                # (a platform's allowed_queues replace the generic `local` queue, not join it).
                data[spec.key] = {**_plain(spec.default()), **copy.deepcopy(override)}
            else:
                data[spec.key] = copy.deepcopy(override)
        else:
            data[spec.key] = default
    known = {s.key for s in specs}
    unknown = {k: v for k, v in overrides.items() if k not in known}
    settings = parse_settings({**data, **unknown}, source=source)

    modules = ", ".join(spec.key for spec in specs if spec.disableable)
    out = [
        "# Balsam site settings (settings.yml).",
        "# Every key is optional; a missing key takes the value shown here. Each agent-module section",
        *_comment(
            f"(installed: {modules or 'none'}) is enabled by being present and disabled by `null` or by leaving "
            "it out; a section no installed module consumes is refused.",
            "",
        ),
        "# Reference: docs/settings.md. `balsam plugins ls` lists the installed plugins.",
        "",
    ]
    for spec in specs:
        value = settings.sections.get(spec.key)
        enabled = value is not None or not spec.disableable
        out.extend(_render_section(spec, value, enabled))
        out.append("")
    return "\n".join(out)


def render_sample_settings() -> str:
    """``balsam site sample-settings``: every key with its default and help text, then the options
    of every installed scheduler and platform plugin."""
    return render_settings_yaml({}) + "\n".join(_driver_options_reference()) + "\n"
