"""A token signing key shorter than 32 bytes is refused when the server reads its settings: tokens
are HMAC-SHA256, and a short key can be found offline from any one token, after which any user's
token can be forged (PyJWT only warns)."""

from __future__ import annotations

import pytest

from balsam.server.settings import MIN_SECRET_KEY_BYTES, ServerSettings


def test_a_short_key_from_the_environment_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("BALSAM_AUTH_SECRET_KEY", "hunter2")
    with pytest.raises(ValueError) as caught:
        ServerSettings.from_env(database_url=f"sqlite:///{tmp_path / 'b.db'}")
    message = str(caught.value)
    assert "BALSAM_AUTH_SECRET_KEY is 7 bytes" in message and "at least 32" in message and "\n" not in message
    assert "hunter2" not in message  # the key itself is never shown


def test_keys_of_32_bytes_and_the_generated_one_are_accepted(monkeypatch, tmp_path):
    monkeypatch.setenv("BALSAM_AUTH_SECRET_KEY", "k" * MIN_SECRET_KEY_BYTES)
    assert ServerSettings.from_env(database_url=f"sqlite:///{tmp_path / 'a.db'}").secret_key == "k" * 32
    monkeypatch.delenv("BALSAM_AUTH_SECRET_KEY")
    generated = ServerSettings.from_env(database_url=f"sqlite:///{tmp_path / 'b.db'}").secret_key
    assert len(generated.encode()) >= MIN_SECRET_KEY_BYTES


def _start_server(tmp_path, workers: int, **env_changes: str):
    """``python -m balsam.server`` (the deployed entry point), SQLite: (exit status or None if it
    still ran after 60 s, its output)."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
    env.update({"BALSAM_HOME": str(tmp_path / "home"), "BALSAM_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
                "BALSAM_AUTH_SECRET_KEY": "s" * 48, **env_changes})
    log = tmp_path / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "balsam.server", "--port", str(port), "--workers", str(workers),
                                 "--log-level", "warning"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # uvicorn's supervisor and its workers
            proc.wait()
    return code, log.read_text(errors="replace")


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("env_changes, message", [
    ({"BALSAM_AUTH_SECRET_KEY": "hunter2"}, "balsam server: BALSAM_AUTH_SECRET_KEY is 7 bytes: at least 32 are needed"),
    ({"BALSAM_AUTH_TOKEN_TTL_SEC": "two days"},
     "balsam server: environment variable BALSAM_AUTH_TOKEN_TTL_SEC='two days' is not a number"),
    ({"BALSAM_AUTH_REGISTRATION": "sometimes"}, "balsam server: environment variable BALSAM_AUTH_REGISTRATION="),
], ids=["short-key", "bad-number", "bad-choice"])
def test_python_m_balsam_server_refuses_bad_settings_in_one_line_and_stops(tmp_path, workers, env_changes, message):
    """``python -m balsam.server`` printed a 35-line traceback for a short key; with ``--workers 2``
    uvicorn's supervisor restarted the failing workers for ever. Now: one line per process, exit
    status 3 (uvicorn's STARTUP_FAILURE), and the supervisor stops (its own exit status is
    uvicorn's: 0 with the uvicorn this was written against, after "Child process ... failed to
    start, stopping the parent process")."""
    code, output = _start_server(tmp_path, workers, **env_changes)
    assert code is not None, f"the server still ran after 60 s (restarting its workers?):\n{output[-3000:]}"
    if workers == 1:
        assert code == 3, (code, output[-3000:])
    assert "Traceback" not in output, output[-3000:]
    assert any(line.startswith(message) for line in output.splitlines()), output[-3000:]
    assert "hunter2" not in output
