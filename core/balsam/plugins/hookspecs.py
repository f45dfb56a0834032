"""Every pluggy hook Balsam calls, grouped by lifecycle phase.

A hook module is any module (or object) with functions marked ``@hookimpl`` and named like the
specs below; it is listed in the ``balsam.plugins`` entry-point group of its distribution::

    [project.entry-points."balsam.plugins"]
    my_plugin = "my_package.balsam_plugin"

Named drivers (schedulers, platforms, transfer backends, job modes, agent modules) are not hooks:
they come from entry-point groups of their own (``balsam.schedulers`` ...), the one way to register
them, and are resolved by name with stevedore; the core owns the name space and reports duplicates.
``docs/plugins/hooks.md`` has one section per hook with an example.

The argument types are the real ones (imported for type checkers only, so that importing the specs
stays cheap and free of import cycles).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click

    from balsam._api.models import Job
    from balsam.config import Settings, SiteConfig
    from balsam.models import BatchJob
    from balsam.site.module import AgentModule

PROJECT_NAME = "balsam"

#: Hooks of earlier versions -> what replaced them (a plugin still implementing one is told so).
RETIRED_HOOKS: dict[str, str] = {
    "balsam_settings_sections": "a settings.yml section is an agent module's options_schema "
    "(see docs/plugins/writing-plugins.md)",
    "balsam_register_drivers": "drivers come from their entry-point groups only; list the driver under "
    '[project.entry-points."balsam.<kind>s"] of your pyproject.toml (see docs/plugins/writing-plugins.md)',
}
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# ---------------------------------------------------------------------------------------------
# Phase 1: start-up and registration (every process: CLI, server, agent, launcher)
# ---------------------------------------------------------------------------------------------


@hookspec
def balsam_cli_commands(cli: "click.Group") -> None:
    """Add click commands or groups to the ``balsam`` command line.

    Called once while the ``balsam`` click group is built; ``cli`` is that group. Call
    ``cli.add_command(...)``. A command name that already exists is reported, not replaced.
    Return value: ignored.
    """


# ---------------------------------------------------------------------------------------------
# Phase 2: site set-up (``balsam site init``)
# ---------------------------------------------------------------------------------------------


@hookspec
def balsam_site_initialized(site_path: Path, settings: "Settings", site_id: int) -> None:
    """A new site directory was created and registered with the API.

    Called at the end of ``balsam site init`` with the site directory (``pathlib.Path``), its loaded
    ``Settings`` and the API id of the new Site. Plugins may add files (e.g. helper scripts). An
    exception here rolls the whole site creation back.
    Return value: ignored.
    """


# ---------------------------------------------------------------------------------------------
# Phase 3: the site agent
# ---------------------------------------------------------------------------------------------


@hookspec
def balsam_agent_started(site_config: "SiteConfig", modules: "list[AgentModule]") -> None:
    """The site agent has built its enabled modules and is about to run their first cycle.

    ``site_config`` is the ``SiteConfig`` of the site; ``modules`` the list of agent module instances
    (read-only). Called in the agent process, in a worker thread (``agent-hook-<plugin>``), not
    the main thread: a call not returned within 20 s is logged and the agent goes on without it.
    Do what only the main thread may (``signal.signal``) when the plugin module is imported, and
    keep state for ``balsam_agent_stopping`` on the plugin, not in thread-locals (another thread
    runs it). An exception is logged, never fatal.
    Return value: ignored.
    """


@hookspec
def balsam_agent_stopping(site_config: "SiteConfig", reason: str) -> None:
    """The site agent is shutting down (``reason``: ``"signal"``, ``"token-expiry"``, ``"credential-refused"``, ``"error"``).

    Called once, before the modules' clean-up, in a worker thread as ``balsam_agent_started`` is
    (not the one that ran ``balsam_agent_started``; bounded to 20 s the same way). An exception is
    logged, never fatal.
    Return value: ignored.
    """


# ---------------------------------------------------------------------------------------------
# Phase 4: launching jobs (inside the allocation)
# ---------------------------------------------------------------------------------------------


@hookspec
def balsam_job_template_context(batch_job: "Union[BatchJob, dict[str, Any]]", context: dict[str, Any]) -> None:
    """Add variables to the job-template context before a BatchJob's script is rendered.

    Called by the scheduler agent module with the BatchJob and the context dict (the variables of
    the job template: ``project``, ``queue``, ``num_nodes``, ``optional_params``...). Mutate
    ``context`` in place. Return value: ignored.
    """


@hookspec
def balsam_launch_environment(job: "Job", env: dict[str, str], node_hostnames: list[str]) -> None:
    """Adjust the environment of a job just before the launcher starts it.

    Called by the mpi and serial job modes with the Job, the environment dict that will be passed to
    the process (already holding the app's ``environment_variables`` and the platform's GPU
    visibility) and the hostnames the job runs on. Mutate ``env`` in place.
    Return value: ignored.
    """
