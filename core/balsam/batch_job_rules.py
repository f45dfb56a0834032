"""The one rule deciding whether a site accepts a BatchJob request.

``balsam queue submit`` (and ``BatchJob.validate`` of the Python API) checks a request before it is
sent; the site agent's scheduler module checks it again before submitting it (the request may come
from another client, or the site's settings may have changed since). Both call
:func:`check_batch_job`, so they can never disagree.

The rule, over the site's ``allowed_queues``, ``allowed_projects`` and ``optional_batch_job_params``
(settings.yml's ``scheduler`` section, pushed to the API's Site record by ``balsam site sync``):

- the queue must be one of ``allowed_queues``; a site with no allowed queues accepts no BatchJob
  (nothing says what its scheduler would take);
- ``min_nodes <= num_nodes <= max_nodes`` (``min_nodes``: optional, 1 when the queue sets none) and
  ``1 <= wall_time_min <= max_walltime`` of that queue;
- the project must be one of ``allowed_projects``, unless that list is empty (schedulers without
  project accounting);
- every optional param must be a key of ``optional_batch_job_params``;
- the partitions' node counts, when given, add up to ``num_nodes``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

__all__ = ["BatchJobRefused", "check_batch_job"]


class BatchJobRefused(ValueError):
    """A BatchJob request that the site does not accept (the message says why, in one line)."""


def _field(value: Any, name: str) -> Any:
    """A field of a mapping or of a record; a missing optional field reads as None."""
    return value.get(name) if isinstance(value, Mapping) else getattr(value, name, None)


def check_batch_job(
    request: Any,
    allowed_queues: Mapping[str, Any],
    allowed_projects: Sequence[str],
    optional_batch_job_params: Mapping[str, Any],
) -> None:
    """Raise :class:`BatchJobRefused` when ``request`` (a mapping or an object with the BatchJob
    fields) does not fit the site's rules. Queue limits may be mappings or ``AllowedQueue`` records."""
    queue, project = _field(request, "queue"), _field(request, "project")
    num_nodes, wall_time_min = int(_field(request, "num_nodes")), int(_field(request, "wall_time_min"))
    if not allowed_queues:
        raise BatchJobRefused(f"queue {queue!r} is not allowed: the site has no allowed_queues")
    limits = allowed_queues.get(queue)
    if limits is None:
        raise BatchJobRefused(f"queue {queue!r} is not in the site's allowed_queues ({', '.join(sorted(allowed_queues))})")
    max_nodes, max_walltime = int(_field(limits, "max_nodes")), int(_field(limits, "max_walltime"))
    # An optional minimum (Polaris prod refuses fewer than 10 nodes); limits without one allow 1.
    min_nodes = int(_field(limits, "min_nodes") or 1)
    if not min_nodes <= num_nodes <= max_nodes:
        raise BatchJobRefused(f"num_nodes {num_nodes} is outside {min_nodes}..{max_nodes} allowed in queue {queue!r}")
    if not 1 <= wall_time_min <= max_walltime:
        raise BatchJobRefused(f"wall_time_min {wall_time_min} is outside 1..{max_walltime} allowed in queue {queue!r}")
    if allowed_projects and project not in allowed_projects:
        raise BatchJobRefused(f"project {project!r} is not in the site's allowed_projects ({', '.join(allowed_projects)})")
    unknown = sorted(set(_field(request, "optional_params") or {}) - set(optional_batch_job_params or {}))
    if unknown:
        accepted = ", ".join(sorted(optional_batch_job_params or {})) or "none"
        raise BatchJobRefused(f"unknown optional param(s) {', '.join(unknown)} (optional_batch_job_params: {accepted})")
    partitions = _field(request, "partitions") or []
    if partitions:
        total = sum(int(_field(p, "num_nodes")) for p in partitions)
        if total != num_nodes:
            raise BatchJobRefused(f"the partitions' num_nodes add up to {total}, not the BatchJob's num_nodes {num_nodes}")
