"""Render a site's ``job-template.sh`` (Jinja2) into the batch script of one BatchJob.

Variables (Balsam 0.7's, inventory §7.4, plus ``batch_job_id`` and ``tags``):

=========================  ===========================================================================
``project``, ``queue``     the BatchJob's project and queue
``num_nodes``              nodes requested
``wall_time_min``          wall time requested (minutes)
``launcher_wall_time_min`` the launcher's ``-t``: a little less than ``wall_time_min`` so that running
                           jobs are ended (RUN_TIMEOUT) before the allocation is killed
``job_mode``               ``mpi`` or ``serial``
``filter_tags``            dict: the launcher only runs jobs carrying these tags
``tags``                   the same, pre-rendered as `` --tag K=V ...``
``partitions``             pre-rendered `` --part MODE:NODES[:K=V...]`` options (empty without partitions)
``optional_params``        dict: the site's ``optional_batch_job_params`` defaults overlaid with the
                           BatchJob's ``-x`` values
``platform_options``       dict: the site's ``launcher.platform_options``, the platform's defaults
                           filled in
``balsam_site_path``       absolute site directory
``balsam_bin``             directory of the ``balsam`` executable
``pg_bin``                 directory of ``pg_ctl`` (or ``$POSTGRES_BIN``), may be None
``launcher_cmd``           ``<python> -m balsam.launcher``
``batch_job_id``           the BatchJob's API id (exported as ``BALSAM_BATCH_JOB_ID``)
=========================  ===========================================================================

Plugins add variables through the ``balsam_job_template_context(batch_job, context)`` hook.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, Mapping, Optional

import attrs
import jinja2

__all__ = [
    "DEFAULT_JOB_TEMPLATE",
    "JobTemplateError",
    "PluginHookFailed",
    "ScriptValueRefused",
    "build_context",
    "check_script_values",
    "launcher_command",
    "render_job_script",
    "default_template_for",
]


class JobTemplateError(ValueError):
    """The job template cannot be read or rendered (message names the file and the problem)."""


class PluginHookFailed(JobTemplateError):
    """A plugin's ``balsam_job_template_context`` hook raised: the site's code, not the BatchJob's
    values nor the template (one line naming the plugin, the hook, the error and where it was
    raised; ``plugin``: the plugin's name, or the names of all of them when a hook wrapper runs)."""

    def __init__(self, message: str, plugin: str) -> None:
        super().__init__(message)
        self.plugin = plugin


class ScriptValueRefused(JobTemplateError):
    """A BatchJob value its batch script cannot carry as meant (:func:`check_script_values`): the
    same BatchJob is refused again at every try, unlike a template file being edited."""


#: Used when neither the platform nor the scheduler driver ships a template of its own.
DEFAULT_JOB_TEMPLATE = """#!/bin/bash
# Balsam job template (Jinja2): rendered by the site agent for each BatchJob into qsubmit/.
# Variables (see docs/job-template.md#variables): project queue num_nodes wall_time_min
#   launcher_wall_time_min job_mode filter_tags tags partitions optional_params platform_options
#   balsam_site_path balsam_bin pg_bin launcher_cmd batch_job_id
# BatchJob {{ batch_job_id }}: {{ num_nodes }} node(s), {{ wall_time_min }} min, queue {{ queue }}, project {{ project }}
{% for key, value in optional_params.items() %}# optional param {{ key }}={{ value }}
{% endfor %}
# The allocation started now: the launcher counts its wall time from here, not from its own
# start after the set-up below (BALSAM_LAUNCHER_START_TIME).
export BALSAM_LAUNCHER_START_TIME=$(date +%s)
export BALSAM_SITE_PATH={{ balsam_site_path | shell_quote }}
export BALSAM_BATCH_JOB_ID={{ batch_job_id }}
cd "$BALSAM_SITE_PATH"

exec {{ launcher_cmd }} -j {{ job_mode }} -t {{ launcher_wall_time_min }}{{ tags }}{{ partitions }}
"""


def launcher_command() -> str:
    """How a batch script starts the launcher with this installation's interpreter."""
    return f"{shlex.quote(sys.executable)} -m balsam.launcher"


def launcher_wall_time(wall_time_min: int) -> int:
    # Leave the launcher a margin (up to 2 min, as Balsam 0.7's templates did) to time out its jobs.
    return max(1, int(wall_time_min) - min(2, int(wall_time_min) // 3))


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _enum_value(value: Any) -> Any:
    return getattr(value, "value", value)


def _render_tags(tags: Mapping[str, str]) -> str:
    return "".join(f" --tag {shlex.quote(f'{k}={v}')}" for k, v in sorted(tags.items()))


def _render_partitions(partitions: Any) -> str:
    if not partitions:
        return ""
    parts = []
    for part in partitions:
        spec = f"{_enum_value(_field(part, 'job_mode'))}:{_field(part, 'num_nodes')}"
        for key, value in sorted((_field(part, "filter_tags") or {}).items()):
            spec += f":{key}={value}"
        parts.append(f" --part {shlex.quote(spec)}")
    return "".join(parts)


def _bin_dir(executable: str, env_var: Optional[str] = None) -> Optional[str]:
    if env_var and os.environ.get(env_var):
        return os.environ[env_var]
    found = shutil.which(executable)
    if found is None and executable == "balsam":
        candidate = Path(sys.executable).parent / "balsam"
        found = str(candidate) if candidate.exists() else None
    return str(Path(found).parent) if found else None


def template_platform_options(settings: Any) -> dict[str, Any]:
    """The site's ``launcher.platform_options`` with the platform's defaults filled in (the settings
    loader replaced the mapping with the platform's options instance); ``{}`` without any."""
    options = getattr(getattr(settings, "launcher", None), "platform_options", None)
    if attrs.has(type(options)):
        return attrs.asdict(options)
    return dict(options) if isinstance(options, dict) else {}


def build_context(
    batch_job: Any,
    site_path: Path,
    *,
    default_optional_params: Optional[Mapping[str, str]] = None,
    platform_options: Optional[Mapping[str, Any]] = None,
    call_hook: bool = True,
) -> dict[str, Any]:
    """The template variables for ``batch_job`` (a ``balsam.models.BatchJob`` or its dict);
    ``platform_options``: the site's ``launcher.platform_options``, defaults filled in, so that a
    template does what the launcher in it expects (e.g. writes files where the platform reads them)."""
    filter_tags = dict(_field(batch_job, "filter_tags") or {})
    optional_params = {**dict(default_optional_params or {}), **dict(_field(batch_job, "optional_params") or {})}
    wall_time_min = int(_field(batch_job, "wall_time_min"))
    context: dict[str, Any] = {
        "batch_job_id": _field(batch_job, "id"),
        "project": _field(batch_job, "project"),
        "queue": _field(batch_job, "queue"),
        "num_nodes": int(_field(batch_job, "num_nodes")),
        "wall_time_min": wall_time_min,
        "launcher_wall_time_min": launcher_wall_time(wall_time_min),
        "job_mode": str(_enum_value(_field(batch_job, "job_mode"))),
        "filter_tags": filter_tags,
        "tags": _render_tags(filter_tags),
        "partitions": _render_partitions(_field(batch_job, "partitions")),
        "optional_params": optional_params,
        "platform_options": dict(platform_options or {}),
        "balsam_site_path": str(Path(site_path).resolve()),
        "balsam_bin": _bin_dir("balsam"),
        "pg_bin": _bin_dir("pg_ctl", "POSTGRES_BIN"),
        "launcher_cmd": launcher_command(),
    }
    if call_hook:
        call_context_hooks(batch_job, context)
    check_script_values(batch_job, context)
    return context


CONTEXT_HOOK = "balsam_job_template_context"


def _raised_at(exc: BaseException) -> str:
    """`` (at file.py:LINE)`` of the frame that raised ``exc`` ("" without a traceback)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


def call_context_hooks(batch_job: Any, context: dict[str, Any]) -> None:
    """Call each plugin's ``balsam_job_template_context`` on its own, in pluggy's order, so that a
    failure names its plugin (:class:`PluginHookFailed`): raised through pluggy's one call it was a
    bare ``KeyError`` whose traceback named pluggy's frames, and the agent logged it every cycle."""
    from ..plugins.manager import get_plugin_manager

    caller = getattr(get_plugin_manager().hook, CONTEXT_HOOK)
    implementations = caller.get_hookimpls()
    kwargs = {"batch_job": batch_job, "context": context}
    if any(impl.hookwrapper or impl.wrapper for impl in implementations):
        # A wrapper must wrap the others: only pluggy's own call can do that.
        calls = [(", ".join(impl.plugin_name for impl in implementations), lambda: caller(**kwargs))]
    else:
        calls = [(impl.plugin_name, lambda impl=impl: impl.function(**{a: kwargs[a] for a in impl.argnames}))
                 for impl in reversed(implementations)]  # pluggy's order: the last registered first
    for plugin, call in calls:
        try:
            call()
        except Exception as exc:
            raise PluginHookFailed(f"plugin {plugin}: its {CONTEXT_HOOK} hook failed: {type(exc).__name__}: "
                                   f"{exc}{_raised_at(exc)}", plugin) from exc


def _control_char(text: str) -> Optional[str]:
    for char in text:
        if char == "\n":
            return "a newline"
        if char == "\r":
            return "a carriage return"
        if ord(char) < 32 or ord(char) == 127:
            return f"the control character {char!r}"
    return None


def _shown(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_script_values(batch_job: Any, context: Mapping[str, Any]) -> None:
    """Refuse (:class:`JobTemplateError`, one line naming the BatchJob and the value) a value that a
    batch script cannot carry as meant. Templates put these values into ``#SBATCH``/``#PBS``
    directives and comments unquoted, so a newline in any of them (a BatchJob's ``-x`` value, its
    project, a tag) started a line of its own in the script: a command that bash ran, or a directive
    the scheduler obeyed. Tags go to the launcher as ``--tag K=V`` and ``--part MODE:N:K=V``, which it
    splits at the first ``=`` (and at every ``:`` in a partition) and strips: a key with ``=`` (or
    ``:`` in a partition), a partition tag value with ``:``, or a value with spaces at either end
    would make it run other jobs than the BatchJob's. A ``:`` in a plain ``--tag`` key is read as
    written (``--tag deephyper:search=1``). ``queue``, ``project`` and ``job_mode`` go into
    directives as one word: no white space or quotes there.

    A refusal of the BatchJob's own value is :class:`ScriptValueRefused`, refused again however
    often it is tried (the scheduler module marks it refused for good); one of the site's (a default
    of ``optional_batch_job_params``, the site path, a plugin hook's value) is a plain
    :class:`JobTemplateError`: fixed in settings.yml, the next try renders.
    """
    who = f"BatchJob {_field(batch_job, 'id')}"
    own_params = dict(_field(batch_job, "optional_params") or {})

    def refuse(what: str, value: Any, why: str, own: bool = True) -> None:
        kind = ScriptValueRefused if own else JobTemplateError
        raise kind(f"{who}: {what} {_shown(str(value))} {why}: its batch script is not rendered")

    def plain(what: str, value: Any, own: bool = True) -> str:
        text = "" if value is None else str(value)
        problem = _control_char(text)
        if problem:
            refuse(what, text, f"contains {problem}", own)
        return text

    for name in ("queue", "project", "job_mode"):
        text = plain(name, context.get(name))
        if any(char.isspace() or char in "'\"`$\\;&|<>" for char in text):
            refuse(name, text, "contains white space, a quote or a shell character")

    def check_tags(where: str, tags: Mapping[Any, Any], partition: bool) -> None:
        for key, value in tags.items():
            key_text, value_text = plain(f"{where} key", key), plain(f"{where} {key!r} value", value)
            if not key_text or key_text.strip() != key_text or "=" in key_text or (partition and ":" in key_text):
                refuse(f"{where} key", key_text, "is empty, has spaces at an end, or contains '=' or ':'" if partition
                       else "is empty, has spaces at an end, or contains '='")
            if value_text.strip() != value_text:
                refuse(f"{where} {key_text!r} value", value_text, "has white space at an end (the launcher strips it)")
            if partition and ":" in value_text:
                refuse(f"{where} {key_text!r} value", value_text, "contains ':' (the launcher's --part separator)")

    check_tags("filter_tags", dict(context.get("filter_tags") or {}), False)
    for index, part in enumerate(_field(batch_job, "partitions") or []):
        plain(f"partition {index} job_mode", _enum_value(_field(part, "job_mode")))
        check_tags(f"partition {index} filter_tags", dict(_field(part, "filter_tags") or {}), True)
    for key, value in dict(context.get("optional_params") or {}).items():
        own = key in own_params and str(own_params[key]) == str(value)  # else the site's default or a hook's
        plain("optional param", key, own)
        plain(f"optional param {key!r} value", value, own)
    plain("site path", context.get("balsam_site_path"), False)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(keep_trailing_newline=True, autoescape=False)
    env.filters["shell_quote"] = lambda value: shlex.quote(str(value))
    return env


def render_job_script(template_text: str, context: Mapping[str, Any], *, source: str = "job-template.sh") -> str:
    """Render the template; a Jinja error becomes one line naming the file and the line."""
    try:
        return _environment().from_string(template_text).render(**context)
    except jinja2.TemplateSyntaxError as exc:
        raise JobTemplateError(f"{source}:{exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise JobTemplateError(f"{source}: {exc}") from None
    except Exception as exc:  # the template's own expressions: {{ 1/0 }}, {{ num_nodes + "x" }}
        # Not a Jinja error, but the template's fault all the same: left to escape, it kept the
        # BatchJob pending and was retried (with a new launcher credential) every cycle.
        line = _template_line(exc)
        where = f"{source}:{line}" if line else source
        raise JobTemplateError(f"{where}: {type(exc).__name__}: {exc}") from None


def _template_line(exc: BaseException) -> Optional[int]:
    """The template line an error was raised at (Jinja2 rewrites its traceback to show it)."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def read_template(path: Path) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise JobTemplateError(f"cannot read the job template {path}: {exc.strerror or exc}") from None


def default_template_for(platform: Any = None, scheduler_cls: Any = None, use_platform_template: bool = True) -> str:
    """The job-template.sh that ``balsam site init`` writes: the platform's, else the scheduler's, else ours.

    ``use_platform_template=False`` when the user picked a scheduler other than the platform's own:
    the platform's template would carry the wrong scheduler's directives.
    """
    text = platform.job_template() if platform is not None and use_platform_template else None
    if not text and scheduler_cls is not None:
        text = getattr(scheduler_cls, "default_job_template", "") or ""
    return text or DEFAULT_JOB_TEMPLATE
