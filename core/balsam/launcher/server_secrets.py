"""The Balsam server's secrets, which the site agent and the launchers remove from their own
environment as they start (:func:`drop_server_secrets`).

The shell that starts a site agent often holds them too (one login node, one ``.bashrc`` for
``balsam server start`` and ``balsam site start``): the token signing key (whoever has it signs
tokens for any user), the database URL with its password, a registration invitation. Neither the
agent, a launcher nor an app needs them, and everything those processes start inherited them: the
batch job (``sbatch``'s default ``--export=ALL``, ``qsub -V``), the launcher in it, its spawner,
every job's shell (``/proc/<pid>/environ`` of the bash that runs a preamble), and the agent's
processing hooks, which run in the agent. Removed from the process itself, they reach none of
these; the launcher still leaves them out of each job's environment
(:func:`balsam.launcher.app_run._drop_server_secrets`) for a launcher started otherwise.

A module of its own that imports nothing of Balsam's: the agent imports it without the launcher's
job machinery (``app_run``).
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

#: The variables (``balsam server``'s settings: ``balsam.server.settings``) that are secrets.
SERVER_SECRET_VARIABLES = ("BALSAM_AUTH_SECRET_KEY", "BALSAM_DATABASE_URL", "BALSAM_INVITATION")


def drop_server_secrets(environ: Optional[MutableMapping[str, str]] = None) -> list[str]:
    """Remove :data:`SERVER_SECRET_VARIABLES` from ``environ`` (by default this process's
    environment, which every process it starts from now on inherits); the names removed."""
    environ = os.environ if environ is None else environ
    removed = [name for name in SERVER_SECRET_VARIABLES if name in environ]
    for name in removed:
        del environ[name]
    return removed
