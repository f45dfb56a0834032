"""Ctrl-C (SIGINT) in the ``balsam`` CLI: exit status 130 and one line on stderr, no "Aborted!"
with status 1 (a script could not tell it from a failure), and the commands that leave work
behind (``job rm``, ``job modify``, ``server start``) say what they leave."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from cli_test_utils import balsam, fresh_api_state  # noqa: F401 (fresh_api_state: autouse)

BALSAM = str(Path(sys.executable).with_name("balsam"))


@pytest.fixture
def hello(balsam_env, tmp_path):
    from balsam.api import ApplicationDefinition, Site

    path = tmp_path / "site-c"
    (path / "data").mkdir(parents=True)
    Site.objects.create(name="site-c", path=str(path))

    class Hello(ApplicationDefinition):
        site = "site-c"
        command_template = "echo {{ name }}"

    Hello.sync()
    return Hello


def _jobs(hello, n):
    from balsam.api import Job

    Job.objects.bulk_create([hello.submit(workdir=f"w/{i}", name=str(i), tags={"g": "a"}, save=False) for i in range(n)])


def _sigint_as_in_a_terminal() -> None:
    """A command started from a terminal gets SIGINT's default disposition; one started under a
    background job of a non-interactive shell (``nohup ... &``, some CI runners) inherits SIGINT
    ignored, and Python then installs no KeyboardInterrupt handler: the signal would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_during_a_streamed_listing_exits_130_with_one_line(hello):
    """A real SIGINT while ``job ls -v`` writes (blocked on a full pipe). Before: "Aborted!", status 1."""
    _jobs(hello, 400)  # about 250 kB of YAML: more than a pipe holds
    proc = subprocess.Popen([BALSAM, "job", "ls", "--site", "all", "-v"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=dict(os.environ),
                            preexec_fn=_sigint_as_in_a_terminal)
    try:
        assert proc.stdout.readline().startswith(b"id: ")  # listing under way; the pipe fills up behind
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.decode()
    assert proc.returncode == 130, text
    assert text.strip() == "Interrupted.", text
    assert "Traceback" not in text and "Aborted!" not in text


def test_ctrl_c_at_a_prompt_exits_130_and_end_of_input_names_yes(hello, monkeypatch):
    from balsam.api import Job

    _jobs(hello, 2)

    def ctrl_c(*args, **kwargs):  # what click.confirm does on Ctrl-C
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise click.Abort() from None

    with monkeypatch.context() as m:
        m.setattr(click, "confirm", ctrl_c)
        out = balsam("job", "rm", "--site", "all", "-t", "g=a")
    assert out.exit_code == 130, out.output
    assert out.output.strip().endswith("Interrupted.") and "Aborted!" not in out.output
    out = balsam("job", "rm", "--site", "all", "-t", "g=a", input="")  # end of input: not a Ctrl-C
    # status 1 and one line naming the question and -y (it was a bare "Aborted!")
    assert out.exit_code == 1 and "Error: no answer to 'Really delete 2 jobs?': standard input ended; pass -y/--yes" in out.output, out.output
    assert Job.objects.filter(tags={"g": "a"}).count() == 2


def test_ctrl_c_during_job_rm_says_the_delete_may_have_happened(hello, monkeypatch):
    """Before: "Aborted!", status 1, read as "nothing was deleted" while the server, which had the
    request, deleted them all."""
    from balsam._api.query import Query

    _jobs(hello, 3)

    def delete_then_ctrl_c(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Query, "delete", delete_then_ctrl_c)
    out = balsam("job", "rm", "--site", "all", "-t", "g=a", "-y")
    assert out.exit_code == 130, out.output
    assert "Interrupted while deleting 3 job(s): the server may have deleted some or all of them" in out.output
    assert "Aborted!" not in out.output and "Traceback" not in out.output


def test_ctrl_c_during_job_modify_says_how_many_were_changed(hello, monkeypatch):
    from balsam.api import Job

    _jobs(hello, 5)
    manager = type(Job.objects)
    real_patch = manager._patch_chunk
    calls = []

    def patch_then_ctrl_c(self, chunk, skip_missing):
        calls.append(len(chunk))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_patch(self, chunk, skip_missing)

    with monkeypatch.context() as m:
        m.setattr(manager, "bulk_chunk_size", 2)
        m.setattr(manager, "_patch_chunk", patch_then_ctrl_c)
        out = balsam("job", "modify", "--site", "all", "-t", "g=a", "-s", "FAILED", "-y")
    assert out.exit_code == 130, out.output
    assert "Interrupted: 2 of 5 job(s) were set to FAILED" in out.output
    assert "run the command again to change the rest" in out.output
    assert sorted(j.state.value for j in Job.objects.all()) == ["FAILED"] * 2 + ["STAGED_IN"] * 3


@pytest.fixture
def home_env(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, BALSAM_HOME=str(home))
    for key in ("BALSAM_CLIENT_PATH", "BALSAM_DATABASE_URL", "BALSAM_AUTH_SECRET_KEY"):
        env.pop(key, None)
    yield env
    subprocess.run([BALSAM, "server", "stop"], env=env, capture_output=True, timeout=90)


def test_ctrl_c_while_server_start_waits_says_the_server_goes_on_starting(home_env):
    """Before: "Aborted!", status 1, and not a word about the server left starting in the background."""
    proc = subprocess.Popen([BALSAM, "server", "start", "--port", "0"], env=home_env, preexec_fn=_sigint_as_in_a_terminal,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        seen = b""
        while b"(pid " not in seen:  # "Starting Balsam server at ... (pid N, log ...) " then a dot per 0.5 s
            byte = proc.stdout.read(1)
            assert byte, proc.stderr.read().decode()
            seen += byte
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.decode()
    assert proc.returncode == 130, text
    assert "Interrupted: the server (pid " in text and "goes on starting in the background" in text, (seen + out, text)
    assert "Aborted!" not in text and "Traceback" not in text
    deadline = time.monotonic() + 60
    while subprocess.run([BALSAM, "server", "status"], env=home_env, capture_output=True, timeout=60).returncode != 0:
        assert time.monotonic() < deadline, "the server did not come up after the interrupted start"
        time.sleep(0.5)
    start = subprocess.run([BALSAM, "server", "start", "--port", "0"], env=home_env, capture_output=True, text=True,
                           timeout=90)
    assert start.returncode == 0, start.stderr
    assert "already running" in start.stdout
