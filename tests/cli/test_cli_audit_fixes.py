"""Fixes from an audit of the ``balsam`` CLI: ``job modify`` over several PATCH chunks, ``--watch``
through an API outage, ``server status``'s exit status, site names ``--site`` cannot select, the
401 hint of the embedded server, ``site rm`` with queued BatchJobs, and 0.7 command lines."""

from __future__ import annotations

import http.server
import os
import socketserver
import tempfile
import threading
from pathlib import Path

import pytest
from cli_test_utils import balsam, fresh_api_state  # noqa: F401, E402 (fresh_api_state: autouse)


@pytest.fixture
def site(balsam_env, tmp_path):
    from balsam.api import Site

    path = tmp_path / "site-a"
    (path / "data").mkdir(parents=True)
    s = Site.objects.create(name="site-a", path=str(path), allowed_projects=["proj"],
                            allowed_queues={"debug": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 3}})
    (path / ".balsam-site").write_text(f"{s.id}\n")
    return s


@pytest.fixture
def hello(site):
    from balsam.api import ApplicationDefinition

    class Hello(ApplicationDefinition):
        site = "site-a"
        command_template = "echo {{ name }}"

    Hello.sync()
    return Hello


@pytest.fixture
def five_jobs_last_running(hello, monkeypatch):
    """Five FAILED jobs but the last one, RUNNING (it cannot go to RESTART_READY); two jobs a PATCH."""
    from balsam.api import Job

    Job.objects.bulk_create([hello.submit(workdir=f"w/{i}", name=str(i), tags={"g": "a"}, save=False) for i in range(5)])
    jobs = sorted(Job.objects.all(), key=lambda j: j.id)
    Job.objects.filter(id=[j.id for j in jobs]).update(state="FAILED")
    last = jobs[-1].id
    for state in ("RESTART_READY", "RUNNING"):
        Job.objects.filter(id=[last]).update(state=state)
    monkeypatch.setattr(type(Job.objects), "bulk_chunk_size", 2)
    return [j.id for j in jobs]


# ------------------------------------------------------------------------------------------ job modify
def test_job_modify_leaves_out_a_refused_move_instead_of_failing_after_earlier_chunks(five_jobs_last_running):
    """Before: the chunks before the refused job were applied, then the command failed with the
    server's "Invalid state change, nothing was updated"."""
    from balsam.api import Job

    ids = five_jobs_last_running
    out = balsam("job", "modify", "-t", "g=a", "-s", "RESTART_READY", "-y", "--site", "all")
    assert out.exit_code == 0, out.output
    assert "Left 1 job(s) that cannot move to RESTART_READY (1 RUNNING)" in out.output
    assert "Set 4 job(s) to RESTART_READY" in out.output
    states = {j.id: j.state.value for j in Job.objects.filter(id=ids)}
    assert states == {**{i: "RESTART_READY" for i in ids[:-1]}, ids[-1]: "RUNNING"}


def test_job_modify_where_no_job_can_move_fails_and_says_why(five_jobs_last_running):
    from balsam.api import Job

    last = five_jobs_last_running[-1]
    out = balsam("job", "modify", "-i", str(last), "-s", "RESTART_READY", "-y")
    assert out.exit_code == 1
    assert "none of the 1 selected job(s) can move to RESTART_READY (1 RUNNING)" in out.output
    assert "cannot change from RUNNING to RESTART_READY" in out.output
    assert Job.objects.get(id=last).state.value == "RUNNING"


def test_bulk_update_refused_in_a_later_chunk_says_how_many_were_updated(five_jobs_last_running):
    """Each chunk is its own transaction: the server's "nothing was updated" was about the last one."""
    from balsam.api import Job
    from balsam.client import APIError

    ids = five_jobs_last_running
    jobs = sorted(Job.objects.filter(id=ids), key=lambda j: j.id)
    for j in jobs:
        j.state = "RESTART_READY"
    with pytest.raises(APIError) as info:
        Job.objects.bulk_update(jobs)
    message = str(info.value)
    assert "4 of 5 Job records were updated before this error" in message, message
    assert "nothing was updated" not in message
    assert info.value.status_code == 409 and info.value.refused_ids == frozenset({ids[-1]})
    assert Job.objects.filter(state="RESTART_READY").count() == 4


# ------------------------------------------------------------------------------------------ --watch
def test_watch_rides_out_an_outage_and_a_5xx(hello, monkeypatch):
    from balsam.client import APIError, ServerUnavailable
    import balsam.cli.job as jobcli

    calls = {"n": 0}
    real = jobcli._list_jobs

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ServerUnavailable("GET /jobs/: server unreachable after 4 attempts")
        if calls["n"] == 3:
            raise APIError("GET", "/jobs/", 503, "database unavailable")
        return real(*args, **kwargs)

    monkeypatch.setattr(jobcli, "_list_jobs", flaky)
    out = balsam("job", "ls", "--watch", "--interval", "0.1", "--rounds", "4", "--site", "all")
    assert out.exit_code == 0 and calls["n"] == 4, out.output
    assert out.output.count("API not answering") == 2


def test_watch_still_ends_on_a_refusal(hello, monkeypatch):
    from balsam.client import APIError
    import balsam.cli.job as jobcli

    def refused(*args, **kwargs):
        raise APIError("GET", "/jobs/", 400, "bad filter")

    monkeypatch.setattr(jobcli, "_list_jobs", refused)
    out = balsam("job", "ls", "--watch", "--interval", "0.1", "--rounds", "3", "--site", "all")
    assert out.exit_code == 1 and "bad filter" in out.output


# ------------------------------------------------------------------------------------------ server status
@pytest.fixture
def no_server(tmp_path, monkeypatch):
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "nohome"))
    monkeypatch.delenv("BALSAM_DATABASE_URL", raising=False)


def test_server_status_exits_3_when_not_running(no_server):
    out = balsam("server", "status")
    assert "not running" in out.output and out.exit_code == 3, out.output


def test_server_status_exits_3_when_not_answering_and_0_when_answering(no_server, monkeypatch):
    import balsam.cli.server as servercli

    monkeypatch.setattr(servercli, "_running_pid", lambda: os.getpid())
    monkeypatch.setattr(servercli, "_answers", lambda api_root: False)
    out = balsam("server", "status")
    assert "running, NOT answering" in out.output and out.exit_code == 3, out.output
    monkeypatch.setattr(servercli, "_answers", lambda api_root: True)
    out = balsam("server", "status")
    assert "running, answering" in out.output and out.exit_code == 0, out.output


# ------------------------------------------------------------------------------------------ site names
@pytest.mark.parametrize("bad", ["1", "all", "active", "this", "a,b"])
def test_site_rename_to_a_name_site_cannot_select_is_refused(site, bad):
    from balsam.api import Site

    out = balsam("site", "rename", str(site.path), bad)
    assert out.exit_code == 1 and "site name refused: must not" in out.output and "HTTP 422" not in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1
    assert Site.objects.get(id=site.id).name == "site-a"


def test_site_names_that_site_can_select_are_kept(site):
    from balsam.api import Site

    for good in ("ALL", "1a", "run-2024", "this-one"):
        out = balsam("site", "rename", str(site.path), good)
        assert out.exit_code == 0, out.output
        assert [s.id for s in Site.objects.filter(name=good)] == [site.id]


# ------------------------------------------------------------------------------------------ 401 hint
class _Refuse401(http.server.BaseHTTPRequestHandler):
    body = b'{"detail": "Invalid token: log in again (`balsam login`)"}'

    def do_GET(self):  # noqa: N802
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):  # quiet
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        request, _ = super().get_request()
        return request, ("local", 0)


@pytest.fixture
def unix_401_server():
    base = Path(tempfile.mkdtemp(prefix="b401-", dir="/tmp"))  # short: a socket path has ~107 bytes
    base.chmod(0o700)
    sock = base / "balsam.sock"
    server = _UnixHTTPServer(str(sock), _Refuse401)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"unix://{sock}"
    server.shutdown()
    server.server_close()
    sock.unlink(missing_ok=True)
    base.rmdir()


def test_401_from_the_embedded_server_names_balsam_server_login_once(unix_401_server, tmp_path, monkeypatch):
    from balsam.client import AuthenticationError, RESTClient

    monkeypatch.setenv("BALSAM_CLIENT_PATH", str(tmp_path / "none.yml"))
    client = RESTClient(unix_401_server, token="stale", retry_count=0)
    with pytest.raises(AuthenticationError) as info:
        client.get("/sites/")
    client.close()
    message = str(info.value)
    assert "`balsam server login`" in message and message.count("balsam server login") == 1, message
    assert "`balsam login`" not in message


def test_401_from_a_remote_server_names_balsam_login_once(live_server, tmp_path, monkeypatch):
    from balsam.client import AuthenticationError, RESTClient

    monkeypatch.setenv("BALSAM_CLIENT_PATH", str(tmp_path / "none.yml"))
    client = RESTClient(live_server, token="not-a-token", retry_count=0)
    with pytest.raises(AuthenticationError) as info:
        client.get("/sites/")
    client.close()
    message = str(info.value)
    assert message.count("`balsam login`") == 1, message


# ------------------------------------------------------------------------------------------ site rm
def test_site_rm_refuses_while_batch_jobs_are_queued(site):
    from balsam.api import BatchJob, Site

    bj = BatchJob(site_id=site.id, num_nodes=1, wall_time_min=30, queue="debug", project="proj", job_mode="mpi")
    bj.save()
    bj.state = "queued"
    bj.scheduler_id = 4242
    bj.save()
    out = balsam("site", "rm", str(site.path), "-y")
    assert out.exit_code == 1, out.output
    assert "1 BatchJob(s) queued or running" in out.output and "balsam queue term" in out.output
    assert Path(site.path).is_dir() and Site.objects.get(id=site.id)
    bj.state = "finished"
    bj.save()
    out = balsam("site", "rm", str(site.path), "-y")
    assert out.exit_code == 0 and not Path(site.path).exists(), out.output


def test_site_rm_force_names_the_batch_jobs_left_in_the_scheduler(site):
    from balsam.api import BatchJob

    bj = BatchJob(site_id=site.id, num_nodes=1, wall_time_min=30, queue="debug", project="proj", job_mode="mpi")
    bj.save()
    bj.state = "running"
    bj.save()
    out = balsam("site", "rm", str(site.path), "--force")
    assert out.exit_code == 0 and "Note: 1 of its BatchJobs were still queued or running" in out.output, out.output


# ------------------------------------------------------------------------------------------ 0.7 / 0.x
@pytest.mark.parametrize("argv, expected, shared", [
    (["server", "deploy", "-p", "/tmp/db"], "balsam server start", "balsam server migrate"),
    (["server", "up", "-p", "/tmp/db"], "balsam server start", "balsam server migrate"),
    (["server", "down", "-p", "/tmp/db"], "balsam server stop", "uvicorn/gunicorn"),
])
def test_balsam_07_server_commands_name_what_replaced_them(argv, expected, shared):
    out = balsam(*argv)
    assert out.exit_code == 2 and "is a Balsam 0.7 command" in out.output and expected in out.output, out.output
    assert shared in out.output and "No such command" not in out.output


def test_balsam_0x_rm_all_is_translated():
    out = balsam("rm", "jobs", "--all")
    assert out.exit_code == 2 and "balsam job rm --all" in out.output, out.output
    assert "no equivalent" not in out.output
    assert "balsam job rm --id 5" in balsam("rm", "jobs", "--id", "5").output


def test_globus_login_accepts_endpoint_id_07_spelling():
    from balsam.cli import main

    main.attach_plugin_commands()
    if "globus-login" not in main.commands["site"].commands:
        pytest.skip("the Globus transfer plugin is not installed")
    out = balsam("site", "globus-login", "--endpoint_id", "abc", "--no-such-option")
    assert out.exit_code == 2 and "No such option '--no-such-option'" in out.output, out.output
