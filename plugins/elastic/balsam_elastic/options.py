"""The ``elastic_queue:`` section of settings.yml (the agent module's ``options_schema``).

The keys of Balsam 0.7's section keep their names and meaning (a 0.7 settings.yml loads as it is);
``strategy`` and ``strategy_options`` are new. The defaults fit a small site; Balsam 0.7 shipped
``min_num_nodes: 20``, which no laptop or test cluster can hold.
"""

from __future__ import annotations

import typing
from typing import Any, Optional

import attrs

from balsam.options import option

from .strategy import STRATEGY_SECTION_KEYS, StrategyError, load_strategy, strategy_class

__all__ = ["ElasticQueueOptions", "check_option_types"]

JOB_MODES = ("mpi", "serial")
#: Most GPU or CPU ids of one node that node_gpus / node_cpus may say (the backlog route's bound is 32 bits).
MAX_NODE_IDS = 65536


@attrs.frozen
class ElasticQueueOptions:
    service_period: int = option(60, "Seconds between two elastic-queue cycles.")
    strategy: str = option(
        "backfill",
        "Scaling strategy (entry point of balsam.elastic_strategies): backfill (Balsam 0.7's policy: "
        "BatchJobs sized to the backlog and fitted to the scheduler's backfill windows) or simple "
        "(fixed blocks up to a maximum).",
    )
    strategy_options: dict[str, Any] = option(
        factory=dict, help="Options of the chosen strategy (simple: nodes_per_block, wall_time_min, min_blocks, "
                           "max_blocks, parallelism); see docs/elastic.md."
    )
    submit_project: str = option("local", "Project charged by the BatchJobs it submits.")
    submit_queue: str = option("local", "Queue it submits to.")
    job_mode: str = option("mpi", "Launcher job mode of the BatchJobs it submits: mpi or serial.")
    min_wall_time_min: int = option(35, "backfill: shortest backfill window it uses (minutes); shorter ones are ignored. Its "
                                    "BatchJob is wall_time_pad_min shorter.")
    max_wall_time_min: int = option(360, "backfill: longest BatchJob it submits (minutes).")
    wall_time_pad_min: int = option(5, "backfill: minutes subtracted from a backfill window's length.")
    min_num_nodes: int = option(1, "backfill: smallest BatchJob it submits, unless the window is smaller (nodes).")
    max_num_nodes: int = option(127, "backfill: largest BatchJob it submits (nodes).")
    max_queue_wait_time_min: int = option(
        10, "backfill: a BatchJob queued longer than this missed its window and is deleted (minutes)."
    )
    max_queued_jobs: int = option(
        20, "Most BatchJobs waiting or running at once in submit_queue that count as its capacity: its own, and "
            "others (by hand, queue_maintainer's) that can run its backlog.",
    )
    regular_queue_after_min: int = option(
        0, "backfill: when no window fits and a runnable job has waited this long, submit one BatchJob to the "
           "regular queue (max_wall_time_min long, never cancelled as stale); 0: never, as Balsam 0.7 (minutes).",
    )
    use_backfill: bool = option(
        True, "backfill: fit BatchJobs to the scheduler's backfill windows (false: sized to the backlog, at most "
              "max_num_nodes x max_wall_time_min less wall_time_pad_min, each waiting in the regular queue)."
    )
    node_gpus: Optional[int] = option(
        None, "GPUs of one compute node, for the backlog's footprint (a job's GPUs over the node's); 0: the nodes have "
              "none, and jobs that need a GPU are not counted (their launchers never lease them); null: those the "
              "launcher's platform names (the default platform names none: it finds them only inside an allocation).",
    )
    node_cpus: Optional[int] = option(
        None, "CPU ids of one compute node as the launcher counts them (hardware threads on the default platform), for "
              "the backlog's footprint; null: those the launcher's platform names (the default platform names none).",
    )

    def validate(self) -> dict[str, str]:
        problems: dict[str, str] = {}
        if self.wall_time_pad_min >= self.min_wall_time_min:
            problems["wall_time_pad_min"] = f"must be less than min_wall_time_min ({self.min_wall_time_min})"
        if self.max_num_nodes < 1:
            problems["max_num_nodes"] = "must be at least 1"
        elif self.min_num_nodes < 1:
            problems["min_num_nodes"] = "must be at least 1"
        elif self.min_num_nodes > self.max_num_nodes:
            self._cross(problems, "min_num_nodes", "max_num_nodes")
        if self.min_wall_time_min > self.max_wall_time_min:
            self._cross(problems, "min_wall_time_min", "max_wall_time_min")
        if self.wall_time_pad_min < 0:
            problems["wall_time_pad_min"] = "must not be negative"
        if self.regular_queue_after_min < 0:
            problems["regular_queue_after_min"] = "must not be negative (0: never)"
        if self.max_queue_wait_time_min < 0:
            # Negative: every queued BatchJob would be "stale" at once, cancelled as soon as queued.
            problems["max_queue_wait_time_min"] = "must not be negative"
        if self.max_queued_jobs < 1:
            problems["max_queued_jobs"] = "must be at least 1"
        for key, low in (("node_gpus", 0), ("node_cpus", 1)):
            value = getattr(self, key)
            if value is not None and not low <= value <= MAX_NODE_IDS:
                problems[key] = f"must be between {low} and {MAX_NODE_IDS} (null: the platform's), got {value}"
        if self.service_period < 1:
            problems["service_period"] = "must be at least 1 second"
        if self.job_mode not in JOB_MODES:
            problems["job_mode"] = f"expected 'mpi' or 'serial', got {self.job_mode!r}"
        try:
            cls = strategy_class(self.strategy)
        except StrategyError as exc:
            problems["strategy"] = str(exc)
        else:
            problems.update(
                {f"strategy_options.{key}": text for key, text in check_option_types(cls.options_schema, self.strategy_options).items()}
            )
            if not problems:
                try:
                    cls(self, self.strategy_options)
                except StrategyError as exc:
                    # On the key's own line (settings.yml:LINE elastic_queue.strategy_options.KEY: ...).
                    problems[f"strategy_options.{exc.key}" if exc.key else "strategy_options"] = exc.text
                except (TypeError, ValueError) as exc:
                    problems["strategy_options"] = str(exc)
        return problems

    def ignored_keys(self) -> list[str]:
        """The keys of :data:`~balsam_elastic.strategy.STRATEGY_SECTION_KEYS` set away from their
        defaults that do nothing as set: those the chosen strategy does not read (none when it does
        not say which it reads), then, under ``use_backfill: false``, those it reads only for
        requests fitted to backfill windows (``Strategy.window_only_keys``)."""
        return self._strategy_ignored() + self._window_only_ignored()

    def queue_cap_warning(self, queue_max_queued_jobs: Any) -> str:
        """What the module says at start (and caps) when ``max_queued_jobs`` exceeds the submit
        queue's ``max_queued_jobs`` in ``scheduler.allowed_queues`` (None or 0: no limit), else ""."""
        cap = int(queue_max_queued_jobs or 0)
        if not 0 < cap < self.max_queued_jobs:
            return ""
        return (f"max_queued_jobs {self.max_queued_jobs} capped to the max_queued_jobs {cap} of queue "
                f"{self.submit_queue!r} (settings.yml scheduler.allowed_queues)")

    def _changed(self, keys: Any) -> list[str]:
        defaults = {f.name: f.default for f in attrs.fields(type(self))}
        return [key for key in STRATEGY_SECTION_KEYS if key in keys and getattr(self, key) != defaults[key]]

    def _strategy_ignored(self) -> list[str]:
        try:
            reads = strategy_class(self.strategy).reads_section_keys
        except StrategyError:
            return []  # validate() reports it
        if reads is None:
            return []
        return self._changed([key for key in STRATEGY_SECTION_KEYS if key not in reads])

    def _window_only_ignored(self) -> list[str]:
        if self.use_backfill:
            return []
        try:
            cls = strategy_class(self.strategy)
        except StrategyError:
            return []
        if cls.reads_section_keys is None or "use_backfill" not in cls.reads_section_keys:
            return []  # a strategy that ignores use_backfill is warned about it above
        return self._changed(cls.window_only_keys)

    def warnings(self) -> dict[str, str]:
        """Keys that pass every check but do nothing as set (the settings loader locates them and
        ``balsam site check-settings`` prints them; the agent logs them once when it starts)."""
        found: dict[str, str] = {}
        ignored = self._strategy_ignored()
        if ignored:
            shown = ", ".join(f"{key}: {_yaml_value(getattr(self, key))}" for key in ignored)
            found["strategy"] = (f"strategy {self.strategy!r} ignores {shown} (keys of the backfill strategy, set "
                                 f"away from their defaults: remove them, or use strategy: backfill)")
        unused = self._window_only_ignored()
        if unused:
            shown = ", ".join(f"{key}: {_yaml_value(getattr(self, key))}" for key in unused)
            found["use_backfill"] = (f"use_backfill: false ignores {shown} (they apply only to requests fitted to "
                                     f"backfill windows; each request waits in the regular queue, at most max_num_nodes "
                                     f"x max_wall_time_min less wall_time_pad_min, and is never cancelled as stale: "
                                     f"remove them, or set use_backfill: true)")
        return found

    def _cross(self, problems: dict[str, str], low: str, high: str) -> None:
        """``low`` above ``high``: filed under the key settings.yml sets, so that the error names its
        line (an error under a key the file omits falls back to the section's line). Which one is
        not known here: ``high`` (``max_num_nodes: 0`` was reported under min_num_nodes), unless
        ``high`` is at its default and ``low`` is not (then the file set ``low``)."""
        defaults = {f.name: f.default for f in attrs.fields(type(self))}
        if getattr(self, high) == defaults[high] and getattr(self, low) != defaults[low]:
            problems[low] = f"must not exceed {high} ({getattr(self, high)})"
        else:
            problems[high] = f"must be at least {low} ({getattr(self, low)})"

    def warnings_with(self, sections: dict[str, Any]) -> dict[str, str]:
        """Valid, but the other sections leave it doing less than it says (check-settings prints
        these; the agent logs them once when it starts)."""
        if "scheduler" in sections and sections["scheduler"] is None:
            # It only posts BatchJobs; the scheduler module submits them: with `scheduler: null`
            # they waited in pending_submission forever, and nothing said why.
            return {"": "its BatchJobs would never be submitted: the scheduler module, which submits them, is "
                        "disabled (scheduler: null or left out); they would wait in pending_submission"}
        queues = dict(getattr(sections.get("scheduler"), "allowed_queues", None) or {})
        limits = queues.get(self.submit_queue)
        queue_cap = limits.get("max_queued_jobs") if isinstance(limits, dict) else getattr(limits, "max_queued_jobs", None)
        # The module caps it (and says so at its start when the key is left at its default, not in
        # the file: the queue's limit is then simply the one in effect); set away from its default,
        # it does not do what it says.
        capped = self.queue_cap_warning(queue_cap) if limits is not None else ""
        if capped and self.max_queued_jobs != attrs.fields(type(self)).max_queued_jobs.default:
            return {"max_queued_jobs": capped}
        return {}

    def validate_with(self, sections: dict[str, Any]) -> dict[str, str]:
        """The ``scheduler`` section's queues and projects (read when settings.yml is loaded): a
        queue or project the site refuses makes every BatchJob of this module fail. Nodes and wall
        time are fitted to the queue's limits each cycle instead (docs/elastic.md)."""
        colon_keys = sorted(str(k) for k in (sections.get("filter_tags") or {}) if ":" in str(k))
        if colon_keys:
            # Its backlog and BatchJob reads send the tags as KEY:VALUE, which the API splits at the
            # first ':' (`a:b: c` is tag a = "b:c"): it would size its BatchJobs by other jobs.
            return {"": f"filter_tags key {', '.join(map(repr, colon_keys))} holds ':', which "
                        "elastic_queue cannot send (its backlog queries take KEY:VALUE tags, split at the first "
                        "':'): rename the key, or disable elastic_queue (elastic_queue: null)"}
        scheduler = sections.get("scheduler")
        if scheduler is None:
            return {}
        problems: dict[str, str] = {}
        queues = dict(getattr(scheduler, "allowed_queues", None) or {})
        if self.submit_queue not in queues:
            problems["submit_queue"] = (f"queue {self.submit_queue!r} is not in the scheduler section's allowed_queues "
                                        f"({', '.join(sorted(queues)) or 'none'})")
        limits = queues.get(self.submit_queue)

        def limit(name: str) -> Any:
            return limits.get(name) if isinstance(limits, dict) else getattr(limits, name, None)

        if limits is not None:
            try:
                strategy = load_strategy(self)
            except (StrategyError, TypeError, ValueError):
                strategy = None  # validate() reports it
            if strategy is not None:
                problem = strategy.queue_problem(self.submit_queue, limit("max_nodes"), limit("max_walltime"))
                if problem:
                    # On strategy_options' line: the loader resolves a cross-section key one level deep.
                    problems["strategy_options"] = problem
        projects = list(getattr(scheduler, "allowed_projects", None) or [])
        if projects and self.submit_project not in projects:
            problems["submit_project"] = (f"project {self.submit_project!r} is not in the scheduler section's "
                                          f"allowed_projects ({', '.join(projects)})")
        return problems


def _yaml_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def check_option_types(schema: type, values: Any) -> dict[str, str]:
    """``{key: problem}`` for keys unknown to ``schema`` and values of the wrong plain type
    (int, float, str, bool), so a typo in ``strategy_options`` is never silently ignored."""
    if not isinstance(values, dict):
        return {"": f"expected a mapping, got {type(values).__name__}"}
    hints = typing.get_type_hints(schema)
    fields = {f.name for f in attrs.fields(schema)}
    problems: dict[str, str] = {}
    for key, value in values.items():
        if key not in fields:
            problems[str(key)] = f"unknown option (known: {', '.join(sorted(fields)) or 'none'})"
            continue
        wanted = hints.get(key)
        if wanted is bool and not isinstance(value, bool):
            problems[key] = f"expected true or false, got {value!r}"
        elif wanted is int and (isinstance(value, bool) or not isinstance(value, int)):
            problems[key] = f"expected an integer, got {value!r}"
        elif wanted is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems[key] = f"expected a number, got {value!r}"
        elif wanted is str and not isinstance(value, str):
            problems[key] = f"expected a string, got {value!r}"
    return problems
