"""The Balsam Python API: ``from balsam.api import ApplicationDefinition, Job, BatchJob, Site, EventLog``.

Importing this module never touches the network or the login file. The models use a default
client built on first use from the stored login (``balsam login``); without one the first call
fails with "Not logged in: run `balsam login` (or `balsam server start` for a local server)".
``site_config`` is the :class:`~balsam.config.SiteConfig` of the site this process runs in
(found from ``$BALSAM_SITE_PATH`` or the current directory), else ``None``.
"""

from __future__ import annotations

from typing import Any

from balsam.models import AppParameter, BatchJobPartition, JobTransferItem, TransferSlot
from balsam.states import BatchJobMode, BatchJobState, JobState, TransferDirection, TransferItemState

from ._api.app import ApplicationDefinition
from ._api.model import get_default_client, reset_default_client, set_default_client
from ._api.models import App, BatchJob, BulkCreateError, EventLog, Job, Session, Site, TransferItem

JobMode = BatchJobMode

__all__ = [
    "Site",
    "ApplicationDefinition",
    "BatchJob",
    "Job",
    "Session",
    "TransferItem",
    "EventLog",
    "JobTransferItem",
    "JobState",
    "AppParameter",
    "TransferDirection",
    "TransferSlot",
    "JobMode",
    "BatchJobPartition",
    "site_config",
    "App",
    "BatchJobState",
    "TransferItemState",
    "BulkCreateError",
    "get_default_client",
    "set_default_client",
    "reset_default_client",
]


def _find_site_config() -> Any:
    try:
        from balsam.config import SiteConfig

        return SiteConfig()
    except Exception:  # noqa: BLE001 - not inside a site (or no usable site): None, as in Balsam 0.7
        return None


def __getattr__(name: str) -> Any:
    # Resolved on access (not at import) so that importing balsam.api stays side-effect free.
    if name == "site_config":
        return _find_site_config()
    raise AttributeError(f"module 'balsam.api' has no attribute {name!r}")
