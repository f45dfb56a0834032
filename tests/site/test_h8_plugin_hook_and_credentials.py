"""A broken ``balsam_job_template_context`` plugin hook, and the launcher credentials of retried submissions.

Before: a plugin hook that raised (a KeyError) escaped the scheduler module's rendering as a bare
exception: "BatchJob 1: unexpected error" with a traceback naming pluggy, not the plugin, logged
every sync_period for every pending BatchJob (8,640 tracebacks a day each); and every try minted a
new launcher credential that nothing revoked. Any retried submission leaked the same way (a
scheduler refusal, a timed-out submit command): `balsam server credentials` listed a live
"launcher of BatchJob 1" per try.
"""

from __future__ import annotations

import logging
import time

import pytest

from balsam.plugins.hookspecs import hookimpl
from balsam.plugins.manager import get_plugin_manager
from balsam.scheduler import SchedulerError
from balsam.site.modules import scheduler as scheduler_module
from balsam.site.modules.scheduler import OUTAGE_LOG_EVERY_S, SchedulerModule
from site_test_utils import batch_job, create_batch_job
from test_site_scheduler_module import ScriptedScheduler  # status_error_threshold 2: two tries

#: The longest wait between two renderings of a BatchJob whose hook failed (read so, the test also
#: runs, and fails for what it checks, against a module older than the constant).
HOOK_RETRY_MAX_SEC = getattr(scheduler_module, "HOOK_RETRY_MAX_SEC", 300.0)


class FakeTime:
    """The scheduler module's clock (its retry waits and log summaries), moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        """Wall time, real: the module's retention sweep compares files' mtimes with it."""
        return time.time()


class BrokenContextPlugin:
    """Reads a template variable the BatchJob does not set, until it is "fixed"."""

    def __init__(self) -> None:
        self.broken = True
        self.calls = 0

    @hookimpl
    def balsam_job_template_context(self, batch_job, context):
        self.calls += 1
        if self.broken:
            context["account"] = context["optional_params"]["account_tag"]


@pytest.fixture
def setup(make_site, client, monkeypatch):
    site = make_site(overrides={"scheduler": {"allowed_queues": {"local": {"max_nodes": 4, "max_walltime": 60,
                                                                           "max_queued_jobs": 5}}}})
    fake = ScriptedScheduler()
    fake.names = {}
    clock = FakeTime()
    monkeypatch.setattr(scheduler_module, "time", clock)
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    return site, fake, module, clock


def _active_credentials(client, bj_id: int) -> list[int]:
    answer = client.get("/auth/credentials", params={"batch_job_id": bj_id, "active": "true", "kind": "launcher"})
    return sorted(c["id"] for c in answer["results"])


def test_a_broken_plugin_hook_is_one_line_naming_it_and_the_batch_job_waits_for_the_fix(setup, client, caplog) -> None:
    site, fake, module, clock = setup
    plugin = BrokenContextPlugin()
    get_plugin_manager().add_plugin(plugin, name="h8-broken-context")
    bj = create_batch_job(client, site.site_id)
    caplog.set_level(logging.INFO, logger="balsam.site.modules.scheduler")
    for _ in range(40):  # 40 cycles, HOOK_RETRY_MAX_SEC / 4 apart: well past the first waits
        module.run_cycle()
        clock.now += HOOK_RETRY_MAX_SEC / 4
    record = batch_job(client, bj["id"])
    # It waits, with the reason where `balsam queue ls -v` shows it; nothing was submitted.
    assert record["state"] == "pending_submission" and not fake.submitted
    waiting = record["status_info"]["waiting"]
    assert "plugin h8-broken-context" in waiting and "balsam_job_template_context" in waiting, waiting
    assert "KeyError: 'account_tag'" in waiting and f"{__name__.rsplit('.', 1)[-1]}.py:" in waiting, waiting
    assert "restart the agent" in waiting
    # A failed rendering costs no launcher credential.
    assert _active_credentials(client, bj["id"]) == []
    # Tried again with a growing wait, not at every cycle; logged once in full, then summed up.
    assert 1 < plugin.calls < 40
    lines = [r for r in caplog.records if "h8-broken-context" in r.getMessage()]
    assert not [r for r in caplog.records if r.exc_info or "unexpected error" in r.getMessage()]
    full = [r for r in lines if "not submitted:" in r.getMessage()]
    summaries = [r for r in lines if "repeated" in r.getMessage()]
    assert len(full) == 1 and "BatchJob %s not submitted" % bj["id"] in full[0].getMessage()
    elapsed = 40 * HOOK_RETRY_MAX_SEC / 4
    assert 1 <= len(summaries) <= elapsed / OUTAGE_LOG_EVERY_S + 1, [r.getMessage() for r in summaries]
    assert len(lines) == len(full) + len(summaries)

    # The plugin fixed (the agent restarted loads it): the next try renders and submits.
    plugin.broken = False
    clock.now += HOOK_RETRY_MAX_SEC
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued" and len(fake.submitted) == 1
    assert "waiting" not in record["status_info"]
    assert len(_active_credentials(client, bj["id"])) == 1


def test_a_template_error_costs_no_launcher_credential(setup, client) -> None:
    """A BatchJob the template cannot render fails at once; the credential minted before the
    rendering stayed live after it (the server revokes a BatchJob's credentials when it finishes,
    not when its submission fails)."""
    site, fake, module, clock = setup
    module.template_path().write_text("#!/bin/bash\n{{ 1 / 0 }}\n")
    bj = create_batch_job(client, site.site_id)
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "submit_failed" and "ZeroDivisionError" in record["status_info"]["error"]
    assert _active_credentials(client, bj["id"]) == []


def test_retried_submissions_reuse_one_launcher_credential(setup, client) -> None:
    """A scheduler that refuses a try (transient) and accepts the next: one live credential, the
    one the launcher's file holds, not one per try."""
    site, fake, module, clock = setup
    bj = create_batch_job(client, site.site_id)
    fake.submit_errors.append(SchedulerError("sbatch: error: Batch job submission failed: Socket timed out"))
    module.run_cycle()
    assert batch_job(client, bj["id"])["state"] == "pending_submission"
    first = _active_credentials(client, bj["id"])
    assert len(first) == 1
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued" and len(fake.submitted) == 1
    assert _active_credentials(client, bj["id"]) == first
    assert module.credentials.stored(bj["id"]).credential_id == first[0]


def test_a_timed_out_try_that_queued_the_job_keeps_its_credential_live(setup, client) -> None:
    """The second try times out after the scheduler queued the job: that job's launcher reads the
    BatchJob's credential file when it starts, so the credential there must stay live (and be the
    only one)."""
    site, fake, module, clock = setup
    bj = create_batch_job(client, site.site_id)
    fake.submit_errors.append(SchedulerError("`sbatch` did not answer within 60 s"))  # nothing queued
    module.run_cycle()
    fake.errors_after_accept.append(SchedulerError("`sbatch` did not answer within 60 s"))  # queued, no answer
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued" and record["scheduler_id"] == fake.next_id and len(fake.submitted) == 1
    live = _active_credentials(client, bj["id"])
    assert live == [module.credentials.stored(bj["id"]).credential_id]


def test_a_revoked_stored_credential_is_replaced_not_reused(setup, client) -> None:
    """`balsam server revoke` between two tries: the next try mints a live one instead of handing
    the launcher a revoked credential."""
    site, fake, module, clock = setup
    bj = create_batch_job(client, site.site_id)
    fake.submit_errors.append(SchedulerError("sbatch: error: Socket timed out"))
    module.run_cycle()
    [first] = _active_credentials(client, bj["id"])
    client.delete(f"/auth/credentials/{first}")
    module.run_cycle()
    assert batch_job(client, bj["id"])["state"] == "queued"
    [second] = _active_credentials(client, bj["id"])
    assert second != first and module.credentials.stored(bj["id"]).credential_id == second


def test_an_unexpected_error_repeated_every_cycle_is_logged_in_full_once_then_summed_up(setup, client, caplog,
                                                                                        monkeypatch) -> None:
    site, fake, module, clock = setup
    bj = create_batch_job(client, site.site_id)

    def driver_bug(*args, **kwargs):
        raise RuntimeError("driver bug")

    monkeypatch.setattr(module, "_submit", driver_bug)
    caplog.set_level(logging.INFO, logger="balsam.site.modules.scheduler")
    for _ in range(100):  # 1,000 s of 10 s cycles
        module.run_cycle()
        clock.now += 10
    lines = [r for r in caplog.records if "driver bug" in r.getMessage() or "unexpected error" in r.getMessage()]
    assert len([r for r in lines if r.exc_info]) == 1
    summaries = [r for r in lines if "repeated" in r.getMessage()]
    assert 1 <= len(summaries) <= 1000 / OUTAGE_LOG_EVERY_S + 1 and len(lines) == 1 + len(summaries)
    record = batch_job(client, bj["id"])
    assert record["state"] == "pending_submission" and record["status_info"]["error"] == "RuntimeError: driver bug"


def test_a_submission_that_failed_for_good_with_nothing_queued_revokes_its_credential(setup, client) -> None:
    """The server revokes a BatchJob's credentials when it finishes, not when its submission fails:
    the credential of a BatchJob whose tries all failed lived out its 3 days."""
    site, fake, module, clock = setup
    bj = create_batch_job(client, site.site_id)
    fake.submit_errors.extend([SchedulerError("sbatch: error: Socket timed out")] * 2)
    module.run_cycle()  # the first try fails
    assert len(_active_credentials(client, bj["id"])) == 1
    module.run_cycle()  # the last try fails, and the scheduler has no job of it
    assert batch_job(client, bj["id"])["state"] == "submit_failed" and not fake.submitted
    assert _active_credentials(client, bj["id"]) == []
    assert not module.credentials.stored(bj["id"])
    # Another BatchJob submitted after it keeps its credential.
    other = create_batch_job(client, site.site_id)
    module.run_cycle()
    assert batch_job(client, other["id"])["state"] == "queued"
    assert _active_credentials(client, other["id"]) == [module.credentials.stored(other["id"]).credential_id]


def test_a_failed_submission_that_may_have_queued_a_job_keeps_its_credential(setup, client) -> None:
    """A scheduler that cannot look jobs up by name (Cobalt): the last try timed out and its job
    may be queued, so its launcher may still start and need the credential."""
    site, fake, module, clock = setup
    fake.names = None
    bj = create_batch_job(client, site.site_id)
    fake.submit_errors.extend([SchedulerError("qsub: timed out")] * 2)
    module.run_cycle()
    module.run_cycle()
    assert batch_job(client, bj["id"])["state"] == "submit_failed"
    assert len(_active_credentials(client, bj["id"])) == 1


def test_a_stored_file_naming_another_credential_is_neither_reused_nor_revoked(setup, client) -> None:
    """A credential file left by an earlier BatchJob of the same id (the server's database reset)
    may name another credential of the user, here the test's own login: a try renews nothing of
    it, and a failed submission does not revoke it."""
    site, fake, module, clock = setup
    own = [c for c in client.get("/auth/credentials", params={"active": "true"})["results"] if c["kind"] != "launcher"]
    assert own, "the test client's login has a credential"
    bj = create_batch_job(client, site.site_id)
    module.credentials._write(bj["id"], {"id": own[0]["id"], "access_token": "stale",
                                         "expiration": "2099-01-01T00:00:00+00:00"})
    fake.submit_errors.extend([SchedulerError("sbatch: error: Socket timed out")] * 2)
    module.run_cycle()
    stored = module.credentials.stored(bj["id"]).credential_id
    assert stored != own[0]["id"] and _active_credentials(client, bj["id"]) == [stored]
    module.run_cycle()
    assert batch_job(client, bj["id"])["state"] == "submit_failed"
    assert _active_credentials(client, bj["id"]) == []
    still = {c["id"] for c in client.get("/auth/credentials", params={"active": "true"})["results"]}
    assert own[0]["id"] in still
