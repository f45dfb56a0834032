"""`balsam login/register/app/job/queue` against a real uvicorn server."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from cli_test_utils import balsam, fresh_api_state  # noqa: F401, E402 (fresh_api_state: autouse)

BALSAM = [str(Path(sys.executable).parent / "balsam")]


@pytest.fixture
def site(balsam_env, tmp_path):
    """An active site (its directory has .balsam-site) with one allowed queue."""
    from balsam.api import Site

    path = tmp_path / "site-a"
    (path / "data").mkdir(parents=True)
    s = Site.objects.create(
        name="site-a", path=str(path), allowed_projects=["proj"],
        allowed_queues={"debug": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 3}},
        optional_batch_job_params={"mig": "0"},
    )
    (path / ".balsam-site").write_text(f"{s.id}\n")
    s.name = "site-a"  # an update refreshes last_refresh: the site counts as active
    s.save()
    return s


@pytest.fixture
def apps(site):
    from balsam.api import ApplicationDefinition

    class Hello(ApplicationDefinition):
        site = "site-a"
        command_template = "echo hello {{ name }} {{ punct }}"
        parameters = {"punct": {"required": False, "default": "!", "help": ""}}

    class Adder(ApplicationDefinition):
        site = "site-a"

        def run(self, x, y):
            return x + y

    Hello.sync()
    Adder.sync()
    return Hello, Adder


# ----------------------------------------------------------------------------------------- login / register
def test_login_with_the_local_servers_socket_stored_says_what_to_do(tmp_path, monkeypatch):
    """After `balsam server start` the client file holds the unix:// socket: `balsam login` said
    "not an http(s) URL" (exit 2) before it could say that this login comes from the server."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("BALSAM_HOME", str(home))
    monkeypatch.delenv("BALSAM_CLIENT_PATH", raising=False)
    (home / "client.yml").write_text(f"api_root: unix://{tmp_path}/run/balsam.sock\nusername: me\ntoken: t\n")
    for args in ((), ("--force",)):
        out = balsam("login", *args)
        assert out.exit_code == 1, out.output
        assert "the local server's login comes from `balsam server login`" in out.output
        assert "balsam login -u URL" in out.output and "not an http(s) URL" not in out.output


def test_register_and_login_store_the_token_with_mode_0600(live_server, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("BALSAM_HOME", str(home))
    monkeypatch.delenv("BALSAM_CLIENT_PATH", raising=False)
    user = f"cli-{uuid.uuid4().hex[:8]}"
    short = balsam("register", "-a", live_server, "-u", user, input="s3cret\ns3cret\n")
    assert short.exit_code == 1 and "at least 12 characters" in short.output
    out = balsam("register", "-a", live_server, "-u", user, input="s3cret s3cret\ns3cret s3cret\n")
    assert out.exit_code == 0, out.output
    assert "Registration success!" in out.output
    out = balsam("login", "-u", live_server, "--username", user, input="s3cret s3cret\n")
    assert out.exit_code == 0, out.output
    path = home / "client.yml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = yaml.safe_load(path.read_text())
    assert data["api_root"] == live_server and data["username"] == user and data["token"]
    assert data["token_expiry"] and data["refresh_token"].startswith("bsr1.")
    out = balsam("login", "-u", live_server)
    assert "You already have a good login stored" in out.output
    from balsam.api import Site
    from balsam._api.model import reset_default_client

    assert Site.objects.count() == 0  # the API now uses this login
    # Logging out revokes the login on the server and forgets it here.
    token = data["token"]
    out = balsam("logout")
    assert out.exit_code == 0 and "revoked on the server" in out.output, out.output
    left = yaml.safe_load(path.read_text())
    assert "token" not in left or left["token"] is None
    assert "refresh_token" not in left and left["api_root"] == live_server
    import httpx

    assert httpx.get(f"{live_server}/sites/", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    reset_default_client()


def test_wrong_password_fails_fast_without_looping(live_server, tmp_path):
    env = {**os.environ, "BALSAM_HOME": str(tmp_path / "h"), "BALSAM_CLIENT_PATH": str(tmp_path / "h" / "client.yml")}
    start = time.monotonic()
    proc = subprocess.run(BALSAM + ["login", "-u", live_server, "--username", "nobody-here", "--password-stdin"],
                          input="wrong\n", capture_output=True, text=True, env=env, timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 1
    assert "Login failed: wrong username or password" in proc.stderr
    assert not (tmp_path / "h" / "client.yml").exists()
    # interactive: three tries, then a clear failure (never an endless loop)
    proc = subprocess.run(BALSAM + ["login", "-u", live_server], input="a\nb\na\nb\na\nb\n",
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("Wrong username or password") == 2


# ----------------------------------------------------------------------------------------- app
def test_app_ls_and_rm(apps, site):
    out = balsam("app", "ls", "--site", "all")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == ["ID", "Name", "Site", "Params"]
    assert {l.split()[1] for l in lines[1:]} == {"Hello", "Adder"} and all(l.split()[2] == "site-a" for l in lines[1:])
    verbose = balsam("app", "ls", "--site", str(site.id), "-v").output
    assert "source_code" in verbose and "chars)" in verbose and "----" in verbose
    assert balsam("app", "rm", "--all").exit_code != 0  # --all needs --site
    assert "either --name" in balsam("app", "rm", "--site", "all").output
    out = balsam("app", "rm", "-n", "Adder", "--site", "all", input="y\n")
    assert "Deleted App Adder" in out.output
    assert "Adder" not in balsam("app", "ls", "--site", "all").output


# ----------------------------------------------------------------------------------------- job
def test_job_create_checks_and_creates(apps, site):
    out = balsam("job", "create", "-w", "run/1", "-a", "Hello", "-p", "name=world", "-tag", "exp=1", "-y", "--site", "all")
    assert out.exit_code == 0, out.output
    assert "Added Job id=" in out.output
    bad = balsam("job", "create", "-w", "run/2", "-a", "Hello", "-y", "--site", "all")
    assert bad.exit_code == 2 and "needs parameter(s) name" in bad.output
    bad = balsam("job", "create", "-w", "run/2", "-a", "Hello", "-p", "name=x", "-p", "nope=1", "-y", "--site", "all")
    assert "has no parameter(s) nope" in bad.output
    bad = balsam("job", "create", "-w", "/abs", "-a", "Hello", "-p", "name=x", "-y", "--site", "all")
    assert "must be relative" in bad.output
    bad = balsam("job", "create", "-w", "r", "-a", "Hello", "-p", "name=x", "-pid", "999999", "-y", "--site", "all")
    assert "parent job(s) 999999 do not exist" in bad.output
    asked = balsam("job", "create", "-w", "run/3", "-a", "Hello", "-p", "name=x", "--site", "all", input="n\n")
    assert "Do you want to create this Job?" in asked.output and "Not created." in asked.output
    from balsam.api import Job

    (job,) = Job.objects.all()
    assert job.get_parameters() == {"name": "world"} and job.tags == {"exp": "1"} and job.wall_time_min == 1


def test_job_modify_re_runs_what_from_state_selects_and_leaves_waiting_children(apps, site):
    """`job modify -t TAG -s RESTART_READY` also took the tag's AWAITING_PARENTS children, which
    then ran before their (failed) parents; --from-state selects by the current state."""
    from balsam.api import Job

    Hello, _ = apps
    parent = Hello.submit(workdir="p/0", name="p", tags={"exp": "1"})
    child = Hello.submit(workdir="p/1", name="c", tags={"exp": "1"}, parent_ids=[parent.id])
    done = Hello.submit(workdir="p/2", name="d", tags={"exp": "1"})
    Job.objects.filter(id=[parent.id]).update(state="FAILED")
    out = balsam("job", "modify", "-t", "exp=1", "--from-state", "FAILED", "-s", "RESTART_READY", "-y", "--site", "all")
    assert out.exit_code == 0 and "Set 1 job(s) to RESTART_READY" in out.output, out.output
    states = {j.id: j.state.value for j in Job.objects.filter(id=[parent.id, child.id, done.id])}
    assert states == {parent.id: "RESTART_READY", child.id: "AWAITING_PARENTS", done.id: "STAGED_IN"}
    out = balsam("job", "modify", "-t", "exp=1", "-s", "RESTART_READY", "-y", "--site", "all")
    assert out.exit_code == 0, out.output
    assert "Left 1 job(s) waiting for their parents" in out.output and "Set 1 job(s) to RESTART_READY" in out.output
    assert Job.objects.get(id=child.id).state.value == "AWAITING_PARENTS"
    out = balsam("job", "modify", "--id", str(child.id), "-s", "RESTART_READY", "-y", "--site", "all")
    assert out.exit_code == 0 and Job.objects.get(id=child.id).state.value == "RESTART_READY", out.output


def test_job_ls_modify_rm(apps, site):
    from balsam.api import Job

    Hello, _ = apps
    Job.objects.bulk_create([Hello.submit(workdir=f"w/{i}", name=str(i), tags={"grp": "a" if i < 3 else "b"},
                                          save=False) for i in range(5)])
    out = balsam("job", "ls", "--site", "all")
    lines = out.output.splitlines()
    assert lines[0].split() == ["ID", "Site", "App", "Workdir", "State", "Tags"]
    assert len(lines) == 6 and "STAGED_IN" in lines[1] and "grp=a" in lines[1]
    # inside the site directory, no --site is needed
    os.chdir(site.path)
    assert len(balsam("job", "ls", "-t", "grp=b").output.splitlines()) == 3
    by_state = balsam("job", "ls", "--by-state").output
    assert "STAGED_IN" in by_state and "Total: 5" in by_state
    assert "FAILED" not in by_state
    assert "FAILED" in balsam("job", "ls", "--by-state", "-v").output
    verbose = balsam("job", "ls", "-t", "grp=a", "-v").output
    assert "parameters:" in verbose and verbose.count("workdir:") == 3
    out = balsam("job", "modify", "-t", "grp=a", "-s", "failed", "-y")
    assert out.exit_code == 0, out.output
    assert "Set 3 job(s) to FAILED" in out.output
    assert Job.objects.filter(state="FAILED").count() == 3
    refused = balsam("job", "modify", "-t", "grp=a", "-s", "RUNNING", "-y")
    assert refused.exit_code == 1  # the server refuses a forced move from FAILED into RUNNING
    assert balsam("job", "ls", "-s", "FAILED").output.count("FAILED") == 3
    assert "No matching jobs." in balsam("job", "ls", "-w", "nothing-like-this").output
    out = balsam("job", "rm", "-s", "FAILED", input="y\n")
    assert "Really delete 3 jobs?" in out.output and "Deleted 3 job(s)" in out.output
    assert balsam("job", "rm").exit_code == 2
    out = balsam("job", "rm", "--all", "-y")
    assert "Deleted 2 job(s)" in out.output
    assert Job.objects.count() == 0


def test_job_rm_all_deletes_only_at_the_selected_sites(apps, site, tmp_path):
    from balsam.api import ApplicationDefinition, Job, Site

    other = Site.objects.create(name="site-b", path=str(tmp_path / "site-b"))

    class Elsewhere(ApplicationDefinition):
        site = "site-b"
        command_template = "true"

    Elsewhere.sync()
    Hello, _ = apps
    Job.objects.bulk_create([Hello.submit(workdir=f"a/{i}", name=str(i), save=False) for i in range(2)]
                            + [Elsewhere.submit(workdir="b/0", save=False)])
    os.chdir(site.path)
    out = balsam("job", "rm", "--all", "-y")  # inside a site: that site's jobs only (it used to be every site)
    assert "Deleted 2 job(s)" in out.output
    (left,) = Job.objects.all()
    assert str(left.workdir) == "b/0"
    assert "Deleted 1 job(s)" in balsam("job", "rm", "--all", "--site", str(other.id), "-y").output


def test_site_selection_rules(apps, site, tmp_path):
    from balsam.api import Site
    from balsam.cli._site_selector import resolve_site_ids

    stale = Site.objects.create(name="site-b", path=str(tmp_path / "elsewhere" / "site-b"))
    assert resolve_site_ids("all") is None
    assert resolve_site_ids(f"{site.id},{stale.id}") == sorted([site.id, stale.id])
    assert resolve_site_ids("elsewhere") == [stale.id]
    assert set(resolve_site_ids("active")) >= {site.id}
    from click import UsageError

    with pytest.raises(UsageError, match="not inside a Balsam site"):
        resolve_site_ids("this")
    with pytest.raises(UsageError, match="no site path contains"):
        resolve_site_ids("no-such-fragment")
    os.chdir(Path(site.path) / "data")
    assert resolve_site_ids("") == [site.id] == resolve_site_ids("this")


def test_a_wrong_site_path_is_an_error_not_the_active_sites(apps, site, tmp_path, monkeypatch):
    """A set-but-wrong $BALSAM_SITE_PATH, or a .balsam-site without an id, used to fall back to the
    active sites: `job rm --all` offered to delete another site's jobs."""
    from balsam.api import Job

    Hello, _ = apps
    Job.objects.bulk_create([Hello.submit(workdir=f"w/{i}", name=str(i), save=False) for i in range(3)])
    typo = tmp_path / "typo"
    monkeypatch.setenv("BALSAM_SITE_PATH", str(typo))
    for args in (["job", "rm", "--all", "-y"], ["job", "ls"], ["app", "ls"], ["job", "modify", "-t", "a=b", "-s", "FAILED", "-y"],
                 ["queue", "ls"], ["queue", "submit", "-n", "1", "-t", "5", "-q", "debug", "-A", "proj", "-j", "mpi"]):
        out = balsam(*args)
        assert out.exit_code == 2, (args, out.output)
        assert f"BALSAM_SITE_PATH={typo} is not a Balsam site (no .balsam-site file in it)" in out.output, (args, out.output)
    assert Job.objects.count() == 3
    assert balsam("job", "ls", "--site", "all").exit_code == 0  # an explicit --site needs no current site
    monkeypatch.delenv("BALSAM_SITE_PATH")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ".balsam-site").write_text("")
    os.chdir(broken)
    out = balsam("job", "rm", "--all", "-y")
    assert out.exit_code == 2 and f"{broken / '.balsam-site'} is empty" in out.output, out.output
    (broken / ".balsam-site").write_text("not-an-id\n")
    out = balsam("job", "ls")
    assert out.exit_code == 2 and "expected the site id (an integer), got 'not-an-id'" in out.output, out.output
    assert Job.objects.count() == 3
    os.chdir(tmp_path)  # neither set nor inside a site: the active sites, as before
    assert len(balsam("job", "ls").output.splitlines()) == 4


def test_job_ids_with_an_explicit_site_stay_at_that_site(apps, site, tmp_path):
    from balsam.api import ApplicationDefinition, Job, Site

    Site.objects.create(name="site-b", path=str(tmp_path / "site-b"))

    class Elsewhere(ApplicationDefinition):
        site = "site-b"
        command_template = "true"

    Elsewhere.sync()
    Hello, _ = apps
    here = Hello.submit(workdir="a/0")
    there = Elsewhere.submit(workdir="b/0")
    ids = ["--id", str(here.id), "--id", str(there.id)]
    os.chdir(site.path)
    # Without --site, ids are looked up at every site (no default restriction to the site you are in).
    assert len(balsam("job", "ls", "--id", str(there.id)).output.splitlines()) == 2
    out = balsam("job", "rm", *ids, "--site", "site-b", "-y")  # it deleted both
    assert "Deleted 1 job(s)" in out.output, out.output
    assert [j.id for j in Job.objects.all()] == [here.id]
    out = balsam("job", "rm", *ids, "--site", "nosuchsite", "-y")
    assert out.exit_code == 2 and "no site is named 'nosuchsite'" in out.output
    out = balsam("job", "modify", "--id", str(here.id), "--site", "site-b", "-s", "FAILED", "-y")
    assert "No job needs changing." in out.output
    out = balsam("job", "modify", "--id", str(here.id), "-s", "FAILED", "-y")
    assert "Set 1 job(s) to FAILED" in out.output


def test_app_ls_and_rm_take_0_7s_short_site_flag(apps, site):
    out = balsam("app", "ls", "-s", "all")
    assert out.exit_code == 0 and {l.split()[1] for l in out.output.splitlines()[1:]} == {"Hello", "Adder"}
    out = balsam("app", "rm", "-n", "Adder", "-s", str(site.id), "-y")
    assert out.exit_code == 0 and "Deleted App Adder" in out.output, out.output


# ----------------------------------------------------------------------------------------- queue
def test_queue_term_of_a_batch_job_never_submitted_says_so(site):
    from balsam.api import BatchJob

    bj = BatchJob(site_id=site.id, num_nodes=1, wall_time_min=30, queue="debug", project="proj", job_mode="mpi")
    bj.save()
    out = balsam("queue", "term", "--id", str(bj.id))
    assert out.exit_code == 0 and f"Marked BatchJob {bj.id} (not submitted yet) of site site-a for deletion" in out.output, out.output
    assert "None" not in out.output


def test_queue_submit_validates_and_ls_term(site):
    from balsam.api import BatchJob

    os.chdir(site.path)
    out = balsam("queue", "submit", "-n", "2", "-t", "30", "-q", "debug", "-A", "proj", "-j", "mpi", "-tag", "x=1",
                 "-x", "mig=2", "-p", "mpi:1", "-p", "serial:1:role=worker")
    assert out.exit_code == 0, out.output
    assert "queue: debug" in out.output
    (bj,) = BatchJob.objects.all()
    assert bj.optional_params == {"mig": "2"} and bj.partitions_to_cli_args() == " --part mpi:1 --part serial:1:role=worker"
    for args, reason in [
        (["-n", "9", "-t", "30", "-q", "debug", "-A", "proj"], "num_nodes 9 is outside 1..4"),
        (["-n", "1", "-t", "90", "-q", "debug", "-A", "proj"], "wall_time_min 90 is outside 1..60"),
        (["-n", "1", "-t", "30", "-q", "prod", "-A", "proj"], "queue 'prod' is not in the site's allowed_queues"),
        (["-n", "1", "-t", "30", "-q", "debug", "-A", "other"], "project 'other' is not in the site's allowed_projects"),
        (["-n", "1", "-t", "30", "-q", "debug", "-A", "proj", "-x", "color=red"], "unknown optional param(s) color"),
        (["-n", "2", "-t", "30", "-q", "debug", "-A", "proj", "-p", "mpi:1"], "the partitions' num_nodes add up to 1, not the BatchJob's num_nodes 2"),
    ]:
        refused = balsam("queue", "submit", "-j", "mpi", *args)
        assert refused.exit_code == 1 and f"Refused by site site-a: {reason}" in refused.output, refused.output
    assert "expected MODE:NODES" in balsam("queue", "submit", "-n", "1", "-t", "5", "-q", "debug", "-A", "proj",
                                           "-j", "mpi", "-p", "mpi").output
    assert BatchJob.objects.count() == 1

    table = balsam("queue", "ls").output.splitlines()
    assert table[0].split()[:4] == ["id", "site", "scheduler_id", "state"] and "pending_submission" in table[1]
    bj.state = "queued"
    bj.scheduler_id = 777
    bj.save()
    assert "777" in balsam("queue", "ls", "--scheduler_id", "777").output  # Balsam 0.7's spelling, hidden
    assert "777" in balsam("queue", "ls", "--scheduler-id", "777").output
    assert "No active batch jobs" in balsam("queue", "ls", "--scheduler-id", "778").output
    help_text = balsam("queue", "ls", "--help").output
    assert "--scheduler-id" in help_text and "--scheduler_id" not in help_text and "-h, --history" in help_text
    out = balsam("queue", "term", "777")
    assert "Marked BatchJob" in out.output
    assert BatchJob.objects.get(id=bj.id).state.value == "pending_deletion"
    assert "not queued or running" in balsam("queue", "term", "777").output
    assert "No active batch jobs" not in balsam("queue", "ls").output  # pending_deletion is still active
    bj.state = "finished"
    bj.save()
    assert "No active batch jobs.  Use --history" in balsam("queue", "ls").output
    assert "finished" in balsam("queue", "ls", "--history", "-n", "1").output
    assert "site_id:" in balsam("queue", "ls", "-h", "-v").output
    assert balsam("queue", "term", "12345").exit_code == 1


def test_queue_submit_warns_when_nothing_keeps_the_allocation_authorized(site, balsam_env):
    """No agent reporting, or no refresh credential: the BatchJob is still created, with warnings."""
    import datetime as dt
    import types

    from balsam.api import get_default_client
    from balsam.cli.queue import authorization_warnings

    args = ("queue", "submit", "-n", "1", "-t", "30", "-q", "debug", "-A", "proj", "-j", "mpi", "--site", "site-a")
    out = balsam(*args)
    assert out.exit_code == 0
    assert "Warning: your account has no active refresh credential" in out.output  # a 0.7-style login only
    assert "no site agent has reported" not in out.output  # the fixture's site was refreshed just now
    # Once some login of the account (the agent's) holds a refresh credential, that warning goes.
    get_default_client().password_login(balsam_env.username, balsam_env.password, refresh=True)
    out = balsam(*args)
    assert out.exit_code == 0 and "Warning" not in out.output
    # A site whose agent has been silent for 10 minutes.
    silent = types.SimpleNamespace(name="site-a", last_refresh=dt.datetime.now() - dt.timedelta(minutes=10))
    warnings = authorization_warnings(silent)
    assert len(warnings) == 1 and warnings[0].startswith("no site agent has reported for site site-a since")


def test_queue_ls_shows_why_a_batch_job_waits(site):
    from balsam.api import BatchJob

    os.chdir(site.path)
    common = {"site_id": site.id, "wall_time_min": 30, "queue": "debug", "project": "proj", "job_mode": "mpi"}
    quiet = BatchJob(num_nodes=1, **common)
    quiet.save()
    table = balsam("queue", "ls").output.splitlines()
    assert "reason" not in table[0]  # the 0.7 columns, nothing added while there is no reason

    waiting = BatchJob(num_nodes=4, **common)
    waiting.save()
    waiting.state, waiting.scheduler_id = "queued", 4242
    waiting.status_info = {"submit_script": "/x/qlaunch00002.sh", "scheduler_reason": "PartitionNodeLimit"}
    waiting.save()
    refused = BatchJob(num_nodes=2, **common)
    refused.save()
    refused.state = "submit_failed"
    refused.status_info = {"error": "submit failed: sbatch refused the job: " + "invalid partition specified " * 5}
    refused.save()

    table = balsam("queue", "ls").output.splitlines()
    assert table[0].split() == ["id", "site", "scheduler_id", "state", "filter_tags", "project", "queue", "num_nodes",
                                "wall_time_min", "job_mode", "reason"]
    row = next(line for line in table if "4242" in line)
    assert row.split()[3] == "queued" and row.endswith("PartitionNodeLimit")
    quiet_row = next(line for line in table[1:] if line.split()[0] == str(quiet.id))
    assert quiet_row.rstrip().endswith("mpi")  # no reason: empty cell
    assert all(str(refused.id) != line.split()[0] for line in table[1:])  # finished ones only with --history

    history = balsam("queue", "ls", "--history").output.splitlines()
    refused_row = next(line for line in history[1:] if line.split()[0] == str(refused.id))
    assert "submit failed: sbatch refused the job: invalid" in refused_row and refused_row.endswith("...")
    verbose = balsam("queue", "ls", "-v", "--scheduler_id", "4242").output
    assert "scheduler_reason: PartitionNodeLimit" in verbose

    waiting.state = "running"
    waiting.status_info = {"submit_script": "/x/qlaunch00002.sh"}
    waiting.save()
    assert "reason" not in balsam("queue", "ls").output.splitlines()[0]
