"""Faults of the embedded server's lifecycle (``balsam server start|stop`` and the admin commands),
run as a user runs them: real ``balsam`` processes, a real embedded server, a private BALSAM_HOME."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

BALSAM = [str(Path(sys.executable).with_name("balsam"))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args, env, timeout=90, **kw):
    return subprocess.run(BALSAM + args, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def server_processes(home: Path) -> "list[psutil.Process]":
    """The embedded servers of this BALSAM_HOME (their --socket lies under it)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "balsam.server.embedded" in cmdline and any(str(home) in arg for arg in cmdline):
            found.append(proc)
    return found


@pytest.fixture
def home_env(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, BALSAM_HOME=str(home))
    for key in ("BALSAM_CLIENT_PATH", "BALSAM_DATABASE_URL", "BALSAM_AUTH_SECRET_KEY"):
        env.pop(key, None)
    yield env
    if (home / "server" / "server.pid").exists():  # else `stop` finds nothing to stop: a process less
        run(["server", "stop"], env)
    for proc in server_processes(home):  # an orphan `stop` did not find (the fault under test)
        proc.kill()


def test_two_starts_at_once_run_one_server_and_stop_leaves_none(home_env):
    """Before: both starts found no live server.pid and both started a server; `stop` stopped the
    one the pid file named and the other kept running, unknown to `status`."""
    home = Path(home_env["BALSAM_HOME"])
    port = free_port()
    starts = [subprocess.Popen(BALSAM + ["server", "start", "--port", str(port)], env=home_env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    results = [(p.wait(90), *p.communicate()) for p in starts]
    ready = [r for r in results if r[0] == 0 and "ready" in r[1]]
    assert len(ready) == 1, results
    for rc, out, err in results:
        if "ready" in out:
            continue
        text = (out + err).strip()
        # Each other start says why in one line: the server runs, or the first start is under way.
        assert "already running" in text or ("Error:" in err and "in progress" in err and len(err.strip().splitlines()) == 1), results
    assert len(server_processes(home)) == 1
    status = run(["server", "status"], home_env)
    assert status.returncode == 0 and "running, answering" in status.stdout
    assert run(["server", "stop"], home_env).returncode == 0
    assert server_processes(home) == []
    # Nothing blocks the next start (the lock went with the server).
    again = run(["server", "start", "--port", str(port)], home_env)
    assert again.returncode == 0 and "ready" in again.stdout, again.stderr


def test_admin_commands_use_an_explicit_database_url_not_a_stopped_servers(home_env, tmp_path):
    """Before: server.json outlived `stop`, and `balsam server user add` with BALSAM_DATABASE_URL
    naming another database created the user in the stopped embedded server's SQLite."""
    home = Path(home_env["BALSAM_HOME"])
    assert run(["server", "start", "--port", "0"], home_env).returncode == 0
    assert run(["server", "stop"], home_env).returncode == 0
    assert not (home / "server" / "server.json").exists()
    # A server.json left by a server that died (or an older balsam) is not trusted either.
    (home / "server" / "server.json").write_text(
        '{"pid": 1, "api_root": "unix:///nowhere", "database_url": "sqlite:///%s"}' % (home / "server" / "balsam.db"))
    shared = tmp_path / "shared.db"
    shared_env = dict(home_env, BALSAM_DATABASE_URL=f"sqlite:///{shared}")
    assert run(["server", "migrate"], shared_env).returncode == 0
    added = run(["server", "user", "add", "alice", "--no-password"], shared_env)
    assert added.returncode == 0, added.stderr
    assert added.stderr.strip() == f"Database: sqlite:///{shared}"
    assert [u for (u,) in sqlite3.connect(shared).execute("SELECT username FROM users")] == ["alice"]
    embedded = sqlite3.connect(home / "server" / "balsam.db")
    assert "alice" not in [u for (u,) in embedded.execute("SELECT username FROM users")]
    listed = run(["server", "user", "ls"], shared_env)
    assert "alice" in listed.stdout and listed.stderr.strip() == f"Database: sqlite:///{shared}"
    # The password of a database URL is not shown.
    pg_env = dict(home_env, BALSAM_DATABASE_URL="postgresql://admin:s3cret-pw@127.0.0.1:1/balsam")
    revoked = run(["server", "revoke", "--user", "alice"], pg_env)
    assert "Database: postgresql://admin:***@127.0.0.1:1/balsam" in revoked.stderr.splitlines()
    assert "s3cret-pw" not in revoked.stderr + revoked.stdout


def test_a_port_taken_by_another_program_is_named_in_one_line(home_env):
    """Before: "the server exited with code 1. Last lines of server.log:" and 25 lines of earlier
    runs' logs with an OSError traceback at the end."""
    home = Path(home_env["BALSAM_HOME"])
    assert run(["server", "start", "--port", "0"], home_env).returncode == 0  # earlier runs' lines in the logs
    assert run(["server", "stop"], home_env).returncode == 0
    with socket.socket() as busy:  # accepts connections, answers nothing: not a Balsam server
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(["server", "start", "--port", str(port), "--timeout", "30"], home_env)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"127.0.0.1:{port} is in use by another process: choose another --port (or --port 0)" in result.stderr
    assert server_processes(home) == [] and not (home / "server" / "server.pid").exists()


def _embedded_db(env) -> Path:
    home = Path(env["BALSAM_HOME"])
    db = home / "server" / "balsam.db"
    assert run(["server", "migrate", "--database-url", f"sqlite:///{db}"], env).returncode == 0
    return db


def test_a_database_of_a_newer_balsam_is_named_with_what_to_do(home_env):
    """Before: "Error: Can't locate revision identified by '0019_future'" (start and migrate)."""
    db = _embedded_db(home_env)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0019_future'")
    for args in (["server", "start", "--port", "0"], ["server", "migrate"]):
        result = run(args, home_env)
        assert result.returncode == 1
        error = result.stderr.strip()
        assert len(error.splitlines()) == 1 and error.startswith("Error: "), error
        assert str(db) in error and "0019_future" in error and "newer balsam" in error, error
    assert server_processes(Path(home_env["BALSAM_HOME"])) == []


@pytest.mark.parametrize("make, cause", [
    ("not_a_database", "is not an SQLite database"),
    ("a_directory", "cannot open it"),
    ("under_a_file", "is not a directory"),
])
def test_a_database_that_cannot_be_opened_is_named_with_the_cause(home_env, tmp_path, make, cause):
    """Before: "Error: (sqlite3.DatabaseError) file is not a database", "unable to open database
    file" or a FileExistsError, none of them naming the file."""
    if make == "not_a_database":
        db = tmp_path / "balsam.db"
        db.write_text("not a database\n" * 100)
    elif make == "a_directory":
        db = tmp_path / "balsam.db"
        db.mkdir()
    else:
        (tmp_path / "afile").write_text("x")
        db = tmp_path / "afile" / "balsam.db"
    env = dict(home_env, BALSAM_DATABASE_URL=f"sqlite:///{db}")
    for args, verb in ((["server", "start", "--port", "0"], "upgrade"), (["server", "migrate"], "migrate")):
        result = run(args, env)
        assert result.returncode == 1
        error = result.stderr.strip()
        assert len(error.splitlines()) == 1, error
        assert error.startswith(f"Error: cannot {verb} {db}: ") and cause in error, error


def test_server_files_are_private_whatever_the_umask_and_an_existing_directory(home_env):
    """Before: a server/ made 0755 beforehand stayed 0755, and balsam.db (password and credential
    hashes), server.log, server.json and server.pid were 0644 under umask 022."""
    home = Path(home_env["BALSAM_HOME"])
    (home / "server").mkdir(parents=True, mode=0o755)
    os.chmod(home / "server", 0o755)
    result = run(["server", "start", "--port", "0"], home_env, preexec_fn=lambda: os.umask(0o022))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((home / "server").stat().st_mode) == 0o700
    for name in ("balsam.db", "server.log", "server.out", "server.json", "server.pid"):
        mode = stat.S_IMODE((home / "server" / name).stat().st_mode)
        assert mode == 0o600, f"{name}: {oct(mode)}"


def test_an_expired_stored_login_is_replaced_at_start(home_env):
    """Before: `start` said "Login ... already stored" for a refresh credential that had expired,
    every command answered 401, and the hint named `balsam login`, which refuses the local server."""
    home = Path(home_env["BALSAM_HOME"])
    short = dict(home_env, BALSAM_AUTH_ACCESS_TTL_SEC="1", BALSAM_AUTH_REFRESH_TTL_SEC="2")
    assert run(["server", "start", "--port", "0"], short).returncode == 0
    assert run(["server", "stop"], short).returncode == 0
    expiry = yaml.safe_load((home / "client.yml").read_text())["refresh_expiry"]
    expiry = expiry if isinstance(expiry, dt.datetime) else dt.datetime.fromisoformat(str(expiry))
    expiry = expiry if expiry.tzinfo else expiry.replace(tzinfo=dt.timezone.utc)
    while dt.datetime.now(dt.timezone.utc) <= expiry + dt.timedelta(seconds=0.5):
        time.sleep(0.2)  # waits for the expiry; nothing is asserted about how long anything took
    started = run(["server", "start", "--port", "0"], home_env)
    assert started.returncode == 0, started.stderr
    assert "Logged in as" in started.stdout and "already stored" not in started.stdout, started.stdout
    listed = run(["site", "ls"], home_env)
    assert listed.returncode == 0, listed.stderr

    # A refresh credential refused at renewal: the hint names the local server's login command.
    assert run(["server", "revoke", "--user", yaml.safe_load((home / "client.yml").read_text())["username"],
                "--kind", "refresh"], home_env).returncode == 0
    login = yaml.safe_load((home / "client.yml").read_text())
    login["token_expiry"] = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)  # renew before the next request
    (home / "client.yml").write_text(yaml.safe_dump(login))
    refused = run(["site", "ls"], home_env)
    assert refused.returncode != 0
    assert "`balsam server login`" in refused.stderr and "`balsam login`" not in refused.stderr, refused.stderr


def test_stop_leaves_alone_a_process_that_reused_the_pid(home_env):
    """Before: any process whose command line contained "balsam.server" passed for the server, so a
    stale server.pid naming e.g. `uvicorn balsam.server.app:app` made `stop` SIGTERM it."""
    home = Path(home_env["BALSAM_HOME"])
    assert run(["server", "start", "--port", "0"], home_env).returncode == 0
    info = json.loads((home / "server" / "server.json").read_text())
    assert run(["server", "stop"], home_env).returncode == 0
    sleeper = "import time; time.sleep(120)"
    others = [subprocess.Popen([sys.executable, "-c", sleeper, "uvicorn", "balsam.server.app:app"]),
              # Even one naming the embedded module, started after the server that server.json describes.
              subprocess.Popen([sys.executable, "-c", sleeper, "-m", "balsam.server.embedded"])]
    try:
        for other in others:
            (home / "server" / "server.pid").write_text(f"{other.pid}\n")
            (home / "server" / "server.json").write_text(json.dumps(dict(info, pid=other.pid)))
            stop = run(["server", "stop", "--timeout", "5"], home_env)
            assert "No Balsam server is running" in stop.stdout, stop.stdout
            assert other.poll() is None, "stop signalled a process that is not the server"
            status = run(["server", "status"], home_env)
            assert status.returncode == 3 and "not running" in status.stdout
    finally:
        for other in others:
            if other.poll() is None:
                other.send_signal(signal.SIGKILL)
            other.wait()


@pytest.mark.parametrize("server_json", [None, "other-pid", "no-start-time"])
def test_stop_and_status_name_an_embedded_server_server_json_cannot_date(home_env, server_json):
    """server.pid names a running embedded server, but server.json is missing (a `start` killed
    between writing the two files), names another pid or dates nothing. Before: `stop` deleted
    server.pid and said nothing was running, leaving the server up and forgotten. Now `stop` and
    `status` name the pid and what to do, keep server.pid, and `stop --force` stops it."""
    server_dir = Path(home_env["BALSAM_HOME"]) / "server"
    server_dir.mkdir(parents=True)
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-m", "balsam.server.embedded"])
    try:
        (server_dir / "server.pid").write_text(f"{fake.pid}\n")
        if server_json == "other-pid":
            (server_dir / "server.json").write_text(json.dumps({"pid": fake.pid + 100000, "create_time": time.time()}))
        elif server_json == "no-start-time":
            (server_dir / "server.json").write_text(json.dumps({"pid": fake.pid}))
        stop = run(["server", "stop", "--timeout", "5"], home_env)
        assert stop.returncode == 1 and "No Balsam server is running" not in stop.stdout, (stop.stdout, stop.stderr)
        [message] = stop.stderr.strip().splitlines()
        assert message.startswith("Error: server.pid names pid %d, a running embedded Balsam server" % fake.pid), message
        assert "balsam server stop --force" in message
        assert fake.poll() is None and (server_dir / "server.pid").exists()
        status = run(["server", "status"], home_env)
        assert status.returncode == 3 and f"Balsam server: unknown: server.pid names pid {fake.pid}" in status.stdout, status.stdout
        forced = run(["server", "stop", "--timeout", "5", "--force"], home_env)
        assert forced.returncode == 0 and f"Stopping Balsam server (pid {fake.pid})" in forced.stdout, forced
        assert fake.wait(10) is not None and not (server_dir / "server.pid").exists()
    finally:
        if fake.poll() is None:
            fake.kill()
        fake.wait()
