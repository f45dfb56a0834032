"""The few API calls the launcher makes, in one place (Session, apps, batch jobs, raw client).

Everything goes through ``balsam.api`` (the client engineer's models) except the bulk PATCH of
the status updater, which uses the same REST client directly.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

logger = logging.getLogger(__name__)

def default_client() -> Any:
    """The REST client the ``balsam.api`` models use (built lazily from the login file)."""
    from balsam._api.model import get_default_client

    return get_default_client()


def api_models() -> Any:
    import balsam.api as api

    return api


def find_batch_job_id(site_id: int, env: Mapping[str, str], platform: Any) -> Optional[int]:
    """The BatchJob this launcher runs in: $BALSAM_BATCH_JOB_ID, else (site_id, scheduler id) lookup."""
    value = env.get("BALSAM_BATCH_JOB_ID", "").strip()
    if value:
        try:
            return int(value)
        except ValueError:
            logger.warning("ignoring BALSAM_BATCH_JOB_ID=%r (not an integer)", value)
    try:
        scheduler_id = platform.scheduler_id(env)
    except Exception as exc:
        logger.warning("platform could not tell the scheduler id: %s", exc)
        scheduler_id = None
    if scheduler_id is None:
        return None
    api = api_models()
    matches = list(api.BatchJob.objects.filter(site_id=site_id, scheduler_id=scheduler_id))
    if not matches:
        logger.info("no BatchJob with scheduler id %s at site %s; the session has no batch job", scheduler_id, site_id)
        return None
    return matches[0].id
