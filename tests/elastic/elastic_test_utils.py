"""Helpers of the elastic-queue tests (a module of its own: conftest modules are not importable by name)."""

from __future__ import annotations

import re
import uuid

import pytest

from balsam.models import BackfillWindow


def core_defines_the_section() -> bool:
    """True while the core still declares ``elastic_queue`` itself (before issue 8's loader reads
    agent-module sections from their ``options_schema``): settings.yml then knows 0.7's keys only."""
    import balsam.config

    return hasattr(balsam.config, "ElasticQueueSettings")


#: For tests that set ``strategy``/``strategy_options`` in settings.yml.
needs_module_sections = pytest.mark.skipif(
    core_defines_the_section(), reason="settings.yml's elastic_queue section is still the core's (0.7 keys only)")



def runnable_jobs(client, site, n: int, **job_fields) -> list:
    """``n`` jobs of a new app of ``site``, made runnable (PREPROCESSED) with ``job_fields``."""
    from balsam.api import ApplicationDefinition, Job

    App = type(f"App{uuid.uuid4().hex[:6]}", (ApplicationDefinition,),
               {"site": site.site_id, "command_template": "echo {{ i }}", "__module__": __name__})
    App.sync()
    jobs = Job.objects.bulk_create([App.submit(workdir=f"r/{uuid.uuid4().hex[:8]}", i=i, save=False, **job_fields)
                                    for i in range(n)])
    client.patch("/jobs/", json=[{"id": j.id, "state": "PREPROCESSED"} for j in jobs])
    return jobs


def idle_after_the_drain(log: str, strategy: str) -> bool:
    """Whether the last decision line of ``strategy`` in an agent's ``log`` says nothing runnable
    and nothing reserved (backfill ``reserved=0``, simple ``blocks=0``): a cycle that saw every
    BatchJob ended and submitted nothing. Its last, not a new one: an unchanged cycle logs its line
    at DEBUG (balsam_elastic.cycle_log), so the line of the first cycle after the drain stays the last."""
    lines = [ln for ln in log.splitlines() if f"] [{strategy}] " in ln]
    return bool(lines) and re.search(rf"\[{strategy}\] (still )?nothing: no runnable jobs \| ", lines[-1]) is not None \
        and re.search(r" (reserved|blocks)=0( |$)", lines[-1]) is not None


def batch_jobs_of(client, site) -> list[dict]:
    """The site's BatchJobs, by id."""
    return sorted(client.get("/batch-jobs/", params={"site_id": site.site_id})["results"], key=lambda b: b["id"])


class Windows:
    """A scheduler driver for the elastic module alone: no queued job, the given windows in ``debug``."""

    def __init__(self, *windows: BackfillWindow) -> None:
        self.windows = list(windows)

    def get_statuses(self) -> dict:
        return {}

    def get_backfill_windows(self) -> dict:
        return {"debug": self.windows}
