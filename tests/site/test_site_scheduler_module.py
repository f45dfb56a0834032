"""The scheduler agent module against a real API server, with a scripted scheduler driver.

The driver is a real :class:`balsam.scheduler.Scheduler` subclass whose queue lives in memory, so
each test decides what the scheduler says (refusals, garbage, jobs vanishing) and checks what the
module writes to the BatchJobs and the Site through the API.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Mapping, Optional

import pytest

from balsam.scheduler import Command, CommandResult, JobHistory, Scheduler, SchedulerError, SubmitRequest
from balsam.models import BackfillWindow, SchedulerJobStatus
from balsam.site.modules.scheduler import SCHEDULER_STATUS_ERROR, SchedulerModule
from balsam.states import BatchJobState
from site_test_utils import SchedulerIdPatchFails, batch_job, create_batch_job


class ScriptedScheduler(Scheduler):
    name = "scripted"
    status_error_threshold = 2

    def __init__(self) -> None:
        super().__init__(user="tester")
        self.queue: dict[int, SchedulerJobStatus] = {}
        self.history: dict[int, JobHistory] = {}
        self.submitted: list[SubmitRequest] = []
        self.deleted: list[int] = []
        self.submit_errors: list[Exception] = []
        self.status_errors: list[Exception] = []
        self.next_id = 1000
        #: Errors raised by submit *after* the job was queued (a timeout hiding an accepted job).
        self.errors_after_accept: list[Exception] = []
        #: scheduler id -> (job name, script) of every job ever queued; None: no lookup by name.
        self.names: Optional[dict[int, tuple[str, Path]]] = None
        self.find_errors: list[Exception] = []

    # The render/parse pairs are not used: this driver overrides the orchestration methods.
    def render_submit(self, request: SubmitRequest) -> Command:
        return Command(["true"])

    def parse_submit(self, result: CommandResult) -> int:
        return 0

    def render_status(self, user: str) -> Command:
        return Command(["true"])

    def parse_status(self, result: CommandResult, now: dt.datetime) -> dict[int, SchedulerJobStatus]:
        return {}

    def render_delete(self, scheduler_id: int) -> Command:
        return Command(["true"])

    def submit(self, request: SubmitRequest) -> int:
        if self.submit_errors:
            raise self.submit_errors.pop(0)
        self.next_id += 1
        self.submitted.append(request)
        self.queue[self.next_id] = SchedulerJobStatus(
            scheduler_id=self.next_id, state=BatchJobState.queued, queue=request.queue, num_nodes=request.num_nodes,
            wall_time_min=request.wall_time_min, project=request.project, time_remaining_min=request.wall_time_min,
            queued_time_min=0,
        )
        if self.names is not None:
            self.names[self.next_id] = (request.job_name, Path(request.script_path))
        if self.errors_after_accept:
            raise self.errors_after_accept.pop(0)
        return self.next_id

    def find_submitted(self, request: SubmitRequest) -> Optional[list[int]]:
        if self.find_errors:
            raise self.find_errors.pop(0)
        if self.names is None:
            return None
        return sorted(i for i, (name, script) in self.names.items()
                      if name == request.job_name and script == Path(request.script_path))

    def get_statuses(self, now: Optional[dt.datetime] = None) -> dict[int, SchedulerJobStatus]:
        if self.status_errors:
            raise self.status_errors.pop(0)
        return dict(self.queue)

    def delete_job(self, scheduler_id: int) -> None:
        self.deleted.append(scheduler_id)
        self.queue.pop(scheduler_id, None)

    def get_histories(self, jobs: Mapping[int, Optional[Path]], last_poll: Any = None) -> dict[int, Optional[JobHistory]]:
        return {scheduler_id: self.history.get(scheduler_id) for scheduler_id in jobs}

    def get_backfill_windows(self) -> dict[str, list[BackfillWindow]]:
        return {"local": [BackfillWindow(num_nodes=4, wall_time_min=30)]}



def _set_state(fake: ScriptedScheduler, scheduler_id: int, state: BatchJobState) -> None:
    import attrs

    fake.queue[scheduler_id] = attrs.evolve(fake.queue[scheduler_id], state=state)


@pytest.fixture
def setup(make_site, client):
    site = make_site(overrides={"scheduler": {"optional_batch_job_params": {"shout": "no", "select": "system=polaris"},
                                              "allowed_queues": {"local": {"max_nodes": 4, "max_walltime": 60,
                                                                           "max_queued_jobs": 2}}}})
    fake = ScriptedScheduler()
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    return site, fake, module


def test_submits_renders_script_and_tracks_to_finished(setup, client) -> None:
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id, "serial", optional_params={"shout": "yes"}, filter_tags={"a": "b"})
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued"
    scheduler_id = record["scheduler_id"]
    script = Path(record["status_info"]["submit_script"])
    assert script == Path(site.site_path) / "qsubmit" / f"qlaunch{bj['id']:05d}.sh"
    text = script.read_text()
    assert f"export BALSAM_BATCH_JOB_ID={bj['id']}" in text and "-j serial" in text and "--tag a=b" in text
    assert "# optional param shout=yes" in text
    # The submit command gets the site's defaults too (a driver may put them on its command line).
    assert fake.submitted[0].optional_params == {"shout": "yes", "select": "system=polaris"}
    assert fake.submitted[0].job_name == script.stem
    assert "submit_time" in record["status_info"]

    _set_state(fake, scheduler_id, BatchJobState.running)
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "running" and record["start_time"]

    # the Site shows the scheduler's view (polled at the start of the cycle) and the backfill windows
    site_record = client.get(f"/sites/{site.site_id}")
    assert site_record["queued_jobs"][str(scheduler_id)]["state"] == "running"
    assert site_record["backfill_windows"] == {"local": [{"num_nodes": 4, "wall_time_min": 30}]}
    assert site_record["last_refresh"]

    start = dt.datetime(2026, 1, 1, 10, 0, tzinfo=dt.timezone.utc)
    fake.queue.pop(scheduler_id)
    fake.history[scheduler_id] = JobHistory(scheduler_id=scheduler_id, state=BatchJobState.finished,
                                            start_time=start, end_time=start + dt.timedelta(minutes=5),
                                            native_state="COMPLETED", message="exit status 0")
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "finished"
    assert record["start_time"].startswith("2026-01-01") and record["end_time"].startswith("2026-01-01")
    assert record["status_info"]["scheduler_state"] == "COMPLETED"


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"queue": "nope"}, "queue 'nope' is not in the site's allowed_queues"),
        ({"num_nodes": 9}, "num_nodes 9 is outside 1..4"),
        ({"wall_time_min": 61}, "wall_time_min 61 is outside 1..60 allowed in queue"),
        ({"project": "other"}, "project 'other' is not in the site's allowed_projects"),
        ({"optional_params": {"colour": "red"}}, "unknown optional param(s) colour"),
    ],
)
def test_refusals_are_explained_in_status_info(setup, client, fields, reason) -> None:
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id, **fields)
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "submit_failed"
    assert reason in record["status_info"]["error"]
    assert record["status_info"]["error_time"]
    assert fake.submitted == []


def test_scheduler_refusal_and_transient_errors(setup, client) -> None:
    site, fake, module = setup
    refused = create_batch_job(client, site.site_id)
    fake.submit_errors.append(SchedulerError("sbatch: error: invalid partition specified: foo", permanent=True))
    module.run_cycle()
    record = batch_job(client, refused["id"])
    assert record["state"] == "submit_failed"
    assert "invalid partition specified" in record["status_info"]["error"]

    flaky = create_batch_job(client, site.site_id)
    fake.submit_errors.append(SchedulerError("qsub: timed out"))
    module.run_cycle()
    record = batch_job(client, flaky["id"])
    assert record["state"] == "pending_submission"
    assert "will retry" in record["status_info"]["error"]
    module.run_cycle()
    assert batch_job(client, flaky["id"])["state"] == "queued"


def test_unexpected_driver_exception_never_escapes(setup, client) -> None:
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)
    fake.submit_errors.append(ValueError("could not parse 'Submitted bitch job'"))
    module.run_cycle()  # must not raise
    record = batch_job(client, bj["id"])
    assert record["state"] == "submit_failed"
    assert "ValueError: could not parse" in record["status_info"]["error"]


def test_status_poll_failures_are_tolerated_then_reported(setup, client) -> None:
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)
    module.run_cycle()
    assert batch_job(client, bj["id"])["state"] == "queued"
    fake.status_errors.extend([SchedulerError("squeue: error: slurm_load_jobs error: Socket timed out")] * 2)
    module.run_cycle()
    assert SCHEDULER_STATUS_ERROR not in batch_job(client, bj["id"])["status_info"]  # below the threshold: quiet
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued"  # nothing lost: the job is still tracked
    # Its own key: the launcher's `error` is not overwritten by an outage of the scheduler's.
    assert "Socket timed out" in record["status_info"][SCHEDULER_STATUS_ERROR]
    assert "error" not in record["status_info"]
    module.run_cycle()  # the scheduler answers again
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued" and SCHEDULER_STATUS_ERROR not in record["status_info"]


def test_job_vanishing_without_history_fails_after_threshold(setup, client) -> None:
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)
    module.run_cycle()
    scheduler_id = batch_job(client, bj["id"])["scheduler_id"]
    fake.queue.pop(scheduler_id)  # gone from the queue, unknown to the history
    module.run_cycle()
    assert batch_job(client, bj["id"])["state"] == "queued"  # maybe just not in the history yet
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "submit_failed"
    assert "left the queue and has no history record" in record["status_info"]["error"]


def test_pending_deletion_deletes_then_finishes(setup, client) -> None:
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)
    module.run_cycle()
    scheduler_id = batch_job(client, bj["id"])["scheduler_id"]
    client.put(f"/batch-jobs/{bj['id']}", json={"state": "pending_deletion"})
    module.run_cycle()
    assert fake.deleted == [scheduler_id]
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "finished" and record["end_time"]


def test_max_queued_jobs_makes_submissions_wait(setup, client) -> None:
    site, fake, module = setup
    ids = [create_batch_job(client, site.site_id)["id"] for _ in range(3)]
    module.run_cycle()
    states = [batch_job(client, i)["state"] for i in ids]
    assert states == ["queued", "queued", "pending_submission"]
    assert "max_queued_jobs 2" in batch_job(client, ids[2])["status_info"]["waiting"]
    first = batch_job(client, ids[0])["scheduler_id"]
    fake.queue.pop(first)
    fake.history[first] = JobHistory(scheduler_id=first, state=BatchJobState.finished)
    module.run_cycle()
    assert batch_job(client, ids[2])["state"] == "queued"
    assert "waiting" not in batch_job(client, ids[2])["status_info"]


def test_site_filter_tags_select_batch_jobs(make_site, client) -> None:
    site = make_site(overrides={"filter_tags": {"system": "h2o"}})
    fake = ScriptedScheduler()
    module = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    other = create_batch_job(client, site.site_id, filter_tags={"system": "co2"})
    mine = create_batch_job(client, site.site_id, filter_tags={"system": "h2o", "x": "1"})
    module.run_cycle()
    assert batch_job(client, other["id"])["state"] == "pending_submission"
    assert batch_job(client, mine["id"])["state"] == "queued"


def test_broken_job_template_is_reported(setup, client) -> None:
    site, fake, module = setup
    Path(site.job_template_path).write_text("#!/bin/bash\n{% for x in %}\n")
    bj = create_batch_job(client, site.site_id)
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "submit_failed"
    assert "job-template.sh:2" in record["status_info"]["error"]
    # An error of the template's own expressions (not Jinja's) is reported the same way; it used
    # to escape, leaving the BatchJob pending and retried every cycle.
    Path(site.job_template_path).write_text("#!/bin/bash\n#X {{ num_nodes }}\n#Y {{ num_nodes + 'x' }}\n")
    bj = create_batch_job(client, site.site_id)
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "submit_failed" and not fake.submitted
    assert "job-template.sh:3: TypeError" in record["status_info"]["error"]


def test_a_submission_the_api_never_recorded_is_not_repeated(setup, client, make_site) -> None:
    """The API fails after the scheduler accepted a job (or the agent dies right then): the next
    cycle, or the next agent, records the same scheduler job instead of submitting a second one."""
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)

    module.client = SchedulerIdPatchFails(client)
    with pytest.raises(ConnectionError):
        module.run_cycle()
    assert len(fake.submitted) == 1
    record = batch_job(client, bj["id"])
    # The token the marker proves its BatchJob with was stored before the submit command.
    assert record["state"] == "pending_submission" and record["status_info"]["submit_token"]

    restarted = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    restarted.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued" and record["scheduler_id"] == fake.next_id
    assert len(fake.submitted) == 1
    script = module.script_path(bj["id"])
    assert not list(script.parent.glob(script.name + "*.stale-*"))  # the marker was its own: kept


class CountingClient:
    """The real API client, counting the requests the module makes by method."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name):
        method = getattr(self.inner, name)
        if name not in ("get", "post", "put", "patch", "delete"):
            return method

        def counted(path, *args, **kwargs):
            self.calls.append((name, path))
            return method(path, *args, **kwargs)

        return counted


def _set_reason(fake: ScriptedScheduler, scheduler_id: int, message: str) -> None:
    import attrs

    fake.queue[scheduler_id] = attrs.evolve(fake.queue[scheduler_id], message=message)


def test_scheduler_reason_follows_the_scheduler_in_the_one_bulk_patch(setup, client) -> None:
    site, fake, module = setup
    ids = [create_batch_job(client, site.site_id)["id"] for _ in range(2)]
    module.run_cycle()
    first, second = (batch_job(client, i)["scheduler_id"] for i in ids)
    counting = CountingClient(client)
    module.client = counting

    _set_reason(fake, first, "PartitionNodeLimit")
    _set_reason(fake, second, "Priority")
    module.run_cycle()
    records = [batch_job(client, i) for i in ids]
    assert [r["status_info"]["scheduler_reason"] for r in records] == ["PartitionNodeLimit", "Priority"]
    assert all(r["status_info"]["submit_script"] for r in records)  # the rest of status_info is kept
    assert [c for c in counting.calls if c[0] == "patch"] == [("patch", "/batch-jobs/")]  # both in one PATCH
    site_record = client.get(f"/sites/{site.site_id}")
    assert site_record["queued_jobs"][str(first)]["message"] == "PartitionNodeLimit"

    counting.calls.clear()
    module.run_cycle()  # nothing changed: nothing to send
    assert [c for c in counting.calls if c[0] == "patch"] == []

    _set_reason(fake, first, "Resources")
    _set_reason(fake, second, "")
    module.run_cycle()
    assert batch_job(client, ids[0])["status_info"]["scheduler_reason"] == "Resources"
    assert "scheduler_reason" not in batch_job(client, ids[1])["status_info"]

    _set_reason(fake, first, "")
    _set_state(fake, first, BatchJobState.running)
    module.run_cycle()
    record = batch_job(client, ids[0])
    assert record["state"] == "running" and "scheduler_reason" not in record["status_info"]


def test_scheduler_reason_does_not_hide_an_error(setup, client) -> None:
    site, fake, module = setup
    bj = create_batch_job(client, site.site_id)
    module.run_cycle()
    scheduler_id = batch_job(client, bj["id"])["scheduler_id"]
    _set_reason(fake, scheduler_id, "JobHeldUser")
    fake.status_errors.extend([SchedulerError("squeue: error: Socket timed out")] * 2)
    module.run_cycle()
    module.run_cycle()
    info = batch_job(client, bj["id"])["status_info"]
    assert "Socket timed out" in info[SCHEDULER_STATUS_ERROR]
    module.run_cycle()  # the scheduler answers again, with the reason; the outage's note is outdated
    info = batch_job(client, bj["id"])["status_info"]
    assert info["scheduler_reason"] == "JobHeldUser" and SCHEDULER_STATUS_ERROR not in info


def test_one_bad_batch_job_does_not_block_the_site(setup, client) -> None:
    """A NUL byte in a scheduler's reason and a scheduler id the API cannot store used to make the
    cycle's single bulk PATCH fail, every cycle, for every BatchJob of the site."""
    site, fake, module = setup
    ids = [create_batch_job(client, site.site_id)["id"] for _ in range(2)]
    module.run_cycle()
    good, nul = (batch_job(client, i)["scheduler_id"] for i in ids)
    _set_reason(fake, nul, "Held\x00 by\x1b admin")
    module.run_cycle()
    assert batch_job(client, ids[1])["status_info"]["scheduler_reason"] == "Held by admin"  # sanitized, stored
    assert "Held by admin" in client.get(f"/sites/{site.site_id}")["queued_jobs"][str(nul)]["message"]

    normal_submit = fake.submit

    def submit_once_out_of_range(request):  # the next submission gets an id no 64-bit column holds
        fake.submit = normal_submit
        normal_submit(request)
        fake.queue[2**64] = fake.queue.pop(fake.next_id)
        return 2**64

    fake.submit = submit_once_out_of_range
    bad = create_batch_job(client, site.site_id)["id"]
    third = create_batch_job(client, site.site_id)["id"]
    fake.queue.clear()  # make room in the queue (max_queued_jobs 2)
    module.run_cycle()
    refused = batch_job(client, bad)
    assert refused["state"] == "pending_submission"
    assert "the API refused this BatchJob's update" in refused["status_info"]["error"]
    accepted = batch_job(client, third)
    assert accepted["state"] == "queued" and accepted["scheduler_id"] == fake.next_id


def test_a_stray_byte_in_scheduler_output_does_not_stop_status_tracking() -> None:
    from balsam.scheduler import Command, subprocess_runner

    result = subprocess_runner(Command(["printf", "1234 R job-\\377name\\n"]))
    assert result.returncode == 0
    assert result.stdout == "1234 R job-\ufffdname\n"


# -- launcher credentials (issue 12.4) -------------------------------------------------------------


def test_each_batch_job_gets_a_site_scoped_launcher_credential(setup, client, make_site) -> None:
    """Before: launchers used the user's own 48 h token (or ran blind once it expired)."""
    import stat

    import jwt

    from balsam.client import ClientSettings, RESTClient
    from balsam.site.launcher_credentials import credential_path, use_launcher_credential

    site, fake, module = setup
    other = make_site()
    bj = create_batch_job(client, site.site_id, "mpi", wall_time_min=30)
    module.run_cycle()
    assert batch_job(client, bj["id"])["state"] == "queued"
    path = credential_path(Path(site.site_path), bj["id"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    stored = ClientSettings.load(path)
    claims = jwt.decode(stored.token, options={"verify_signature": False})
    assert claims["site"] == site.site_id and claims["cid"] == stored.credential_id and not stored.refresh_token
    # It outlives the queue wait plus the wall time.
    lifetime = stored.token_expiry - dt.datetime.now(dt.timezone.utc)
    assert lifetime > dt.timedelta(days=2, minutes=30)
    creds = client.get("/auth/credentials", params={"kind": "launcher"})["results"]
    assert [(c["site_id"], c["batch_job_id"]) for c in creds] == [(site.site_id, bj["id"])]

    launcher = RESTClient.from_settings(stored, settings_path=path)
    assert [s["id"] for s in launcher.get("/sites/")["results"]] == [site.site_id]
    assert launcher.get("/jobs/", params={"site_id": other.site_id})["count"] == 0
    launcher.close()
    env = {"BALSAM_BATCH_JOB_ID": str(bj["id"]), "BALSAM_CLIENT_PATH": "/elsewhere/client.yml"}
    assert use_launcher_credential(Path(site.site_path), env) == path and env["BALSAM_CLIENT_PATH"] == str(path)
    assert use_launcher_credential(Path(site.site_path), {"BALSAM_BATCH_JOB_ID": "999999"}) is None


def test_launcher_credentials_are_renewed_while_queued_and_dropped_after(setup, client) -> None:
    from balsam.client import ClientSettings
    from balsam.site.launcher_credentials import credential_path

    site, fake, module = setup
    bj = create_batch_job(client, site.site_id, "mpi", wall_time_min=30)
    module.run_cycle()
    path = credential_path(Path(site.site_path), bj["id"])
    first = ClientSettings.load(path)
    module.run_cycle()  # far from expiry: nothing to renew
    assert ClientSettings.load(path).token == first.token
    # Days in the queue later (less than the wall time plus a day left): the credential is renewed
    # to cover the wall time. (A submitted BatchJob's wall time no longer changes: 409.)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3)
    renew = f"POST /auth/credentials/{first.credential_id}/renew"
    sent_before = module.credentials.client.request_counts[renew]
    assert module.credentials.renew_due([batch_job(client, bj["id"])], now=later) == [bj["id"]]
    assert module.credentials.client.request_counts[renew] == sent_before + 1
    renewed = ClientSettings.load(path)
    # The same credential with the server's new expiry (from the server's clock, which has not moved
    # three days: the same ttl may give the same second, hence >=).
    assert renewed.credential_id == first.credential_id and renewed.token_expiry >= first.token_expiry

    scheduler_id = batch_job(client, bj["id"])["scheduler_id"]
    fake.queue.pop(scheduler_id)
    fake.history[scheduler_id] = JobHistory(scheduler_id=scheduler_id, state=BatchJobState.finished)
    module.run_cycle()  # finished: the server revokes the credential
    creds = client.get("/auth/credentials", params={"kind": "launcher", "batch_job_id": bj["id"]})["results"]
    assert creds[0]["revoked"] is not None
    module.run_cycle()  # and the agent forgets the file
    assert not path.exists()


def test_no_submission_without_a_launcher_credential(setup, client) -> None:
    from balsam.client import ServerUnavailable

    site, fake, module = setup
    bj = create_batch_job(client, site.site_id, "mpi")
    real = module.credentials.client

    class Outage:
        def __getattr__(self, name):
            return getattr(real, name)

        def post(self, path, **kwargs):
            if path == "/auth/credentials":
                raise ServerUnavailable("POST /auth/credentials: server unreachable")
            return real.post(path, **kwargs)

    module.credentials.client = Outage()
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "pending_submission" and not fake.submitted
    assert "cannot mint the launcher credential" in record["status_info"]["waiting"]
    module.credentials.client = real
    module.run_cycle()
    assert batch_job(client, bj["id"])["state"] == "queued" and len(fake.submitted) == 1


def test_nersc_qos_is_a_setting_that_reaches_the_slurm_driver(tmp_path) -> None:
    """settings.yml's scheduler.options go, checked, to the driver the agent module builds."""
    from balsam.config import SettingsError, loads_settings
    from balsam.scheduler import SubmitRequest

    pytest.importorskip("balsam_scheduler_slurm")
    settings = loads_settings("scheduler:\n  name: slurm\n  options:\n    queue_flag: --qos\n"
                              "  allowed_queues: {regular: {max_nodes: 8, max_walltime: 60, max_queued_jobs: 2}}\n")

    class Site:
        site_id, site_path = 1, tmp_path

    Site.settings = settings
    module = SchedulerModule(Site, settings.scheduler, client=None)
    command = module.scheduler.render_submit(SubmitRequest(script_path=tmp_path / "q.sh", project="m1234",
                                                           queue="regular", num_nodes=2, wall_time_min=30))
    assert "--qos" in command.args and "regular" in command.args and "--partition" not in command.args
    with pytest.raises(SettingsError, match=r"^settings.yml:4 scheduler.options.queue_flg: unknown key \(did you mean 'queue_flag'\?\)$"):
        loads_settings("scheduler:\n  name: slurm\n  options:\n    queue_flg: --qos\n")


def test_status_error_threshold_is_the_drivers_when_built_from_settings(make_site, client, monkeypatch) -> None:
    """The module builds its driver from settings.yml (no ``scheduler=``): the driver's own
    tolerance of failed status polls applies, not the base class's 3."""

    class PatientScheduler(ScriptedScheduler):
        status_error_threshold = 5

    monkeypatch.setattr(SchedulerModule, "site_scheduler", lambda self: PatientScheduler())
    site = make_site()
    module = SchedulerModule(site, site.settings.scheduler, client)
    assert isinstance(module.scheduler, PatientScheduler)
    assert module.threshold == 5


def test_an_interrupted_submission_is_looked_up_before_submitting_again(setup, client) -> None:
    """sbatch timed out after Slurm had queued the job (or the agent stopped while it ran): the
    next cycle finds that job by name and script and tracks it; no second job is submitted."""
    site, fake, module = setup
    fake.names = {}
    bj = create_batch_job(client, site.site_id)
    fake.errors_after_accept.append(SchedulerError("`sbatch` did not answer within 60 s"))
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "pending_submission" and "will retry" in record["status_info"]["error"]
    script = module.script_path(bj["id"])
    assert script.with_name(script.name + ".submitting").is_file()

    fake.find_errors.append(SchedulerError("squeue: error: Socket timed out"))
    module.run_cycle()  # cannot ask: the BatchJob waits, nothing submitted
    record = batch_job(client, bj["id"])
    assert record["state"] == "pending_submission" and "Socket timed out" in record["status_info"]["waiting"]
    assert len(fake.submitted) == 1

    restarted = SchedulerModule(site, site.settings.scheduler, client, scheduler=fake)
    restarted.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued" and record["scheduler_id"] == fake.next_id
    assert "waiting" not in record["status_info"]
    assert len(fake.submitted) == 1
    assert not script.with_name(script.name + ".submitting").exists()
    words = script.with_name(script.name + ".scheduler_id").read_text().split()
    assert words == [str(fake.next_id), record["status_info"]["submit_token"]]


def test_an_interrupted_submission_that_never_reached_the_scheduler_is_submitted(setup, client) -> None:
    site, fake, module = setup
    fake.names = {}
    bj = create_batch_job(client, site.site_id)
    fake.submit_errors.append(SchedulerError("`sbatch` did not answer within 60 s"))  # nothing queued
    module.run_cycle()
    assert batch_job(client, bj["id"])["state"] == "pending_submission" and not fake.submitted
    module.run_cycle()
    record = batch_job(client, bj["id"])
    assert record["state"] == "queued" and len(fake.submitted) == 1
    # A refusal says for sure that nothing was queued: no lookup is left to do.
    refused = create_batch_job(client, site.site_id)
    fake.submit_errors.append(SchedulerError("sbatch: error: invalid partition", permanent=True))
    module.run_cycle()
    script = module.script_path(refused["id"])
    assert batch_job(client, refused["id"])["state"] == "submit_failed"
    assert not script.with_name(script.name + ".submitting").exists()


def test_max_queued_jobs_holds_while_the_status_poll_fails(setup, client) -> None:
    site, fake, module = setup  # max_queued_jobs 2
    ids = [create_batch_job(client, site.site_id)["id"] for _ in range(2)]
    module.run_cycle()
    assert [batch_job(client, i)["state"] for i in ids] == ["queued", "queued"]
    third = create_batch_job(client, site.site_id)
    fake.status_errors.append(SchedulerError("squeue: error: slurm_load_jobs error: Socket timed out"))
    module.run_cycle()  # the scheduler's count is unknown: the site's own two queued BatchJobs count
    record = batch_job(client, third["id"])
    assert record["state"] == "pending_submission" and "max_queued_jobs 2" in record["status_info"]["waiting"]
    assert len(fake.submitted) == 2


def test_launcher_credentials_are_renewed_when_the_site_update_fails(setup, client, monkeypatch) -> None:
    site, fake, module = setup
    create_batch_job(client, site.site_id)
    renewed: list[list[int]] = []
    monkeypatch.setattr(module.credentials, "renew_due", lambda live: renewed.append([b["id"] for b in live]) or [])
    real = module.client

    class SiteUpdateFails:
        def __getattr__(self, name):
            return getattr(real, name)

        def put(self, path, **kwargs):
            raise ConnectionError("PUT /sites: API went away")

    module.client = SiteUpdateFails()
    with pytest.raises(ConnectionError):
        module.run_cycle()
    assert renewed and len(renewed[-1]) == 1  # the just-queued BatchJob was looked at all the same
