"""The unmodified Balsam 0.7 client reads the result of its ``run()`` apps run by our site agent and
launcher: ``job.result()`` returns the value, or raises the app's exception (type, message,
traceback), as it did against Balsam 0.7's own launcher.

Our runner wrote every exception in our envelope (a pickled dict), and 0.7's
``raise_from_serialized``, which unpacks ``(exception, traceback)``, raised ``ValueError: too many
values to unpack (expected 2)`` in place of the app's error. The venv of 0.7 is the one of
test_balsam07_client.py (cached in ``.cache/balsam-0.7-venv``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from balsam._api import codec
from balsam._api.app import parse_run_markers, python_runner_command
# balsam07_venv: the session fixture that builds the 0.7 venv.
from test_balsam07_client import balsam07_venv, env_for_07  # noqa: F401

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("h9_run_app_driver.py")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_07_client_gets_the_values_and_exceptions_of_its_run_apps(balsam07_venv, balsam_env, tmp_path):  # noqa: F811
    from balsam.client import load_client
    from balsam.site.site_ops import init_site

    site_path = tmp_path / f"site-{uuid.uuid4().hex[:6]}"
    site_id = init_site(site_path, site_path.name, "default", load_client(), settings_overrides={
        "logging": {"buffer_num_records": 1}, "processing": {"num_workers": 1},
        "launcher": {"idle_ttl_sec": 5, "delay_sec": 1}})

    env07 = env_for_07()
    env07.update(HOME=str(tmp_path / "home07"), BALSAM_CLIENT_PATH=str(tmp_path / "client07.yml"), PYTHONNOUSERSITE="1",
                 PATH=f"{balsam07_venv / 'bin'}{os.pathsep}{env07.get('PATH', '')}")
    login = subprocess.run([str(balsam07_venv / "bin" / "balsam"), "login", "-u", balsam_env.url],
                           input=f"{balsam_env.username}\n{balsam_env.password}\n", capture_output=True, text=True,
                           env=env07, timeout=120)
    assert login.returncode == 0, login.stdout[-2000:] + login.stderr[-2000:]

    ours = {**os.environ, "BALSAM_SITE_PATH": str(site_path),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    console = open(tmp_path / "site.console", "wb")
    agent = subprocess.Popen([sys.executable, "-m", "balsam.site", str(site_path), "--log-to-stderr"], env=ours,
                             stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
    driver = subprocess.Popen([str(balsam07_venv / "bin" / "python"), str(DRIVER), str(site_id)], env=env07,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    launcher = None
    try:
        # The launcher once the driver's six jobs are ready to run (it leaves when idle again).
        from balsam.api import Job

        deadline = time.monotonic() + 240
        while Job.objects.filter(site_id=site_id, state="PREPROCESSED").count() < 6:
            assert driver.poll() is None and agent.poll() is None and time.monotonic() < deadline, (
                f"jobs not PREPROCESSED: {sorted(j.state for j in Job.objects.filter(site_id=site_id))}\n"
                + (tmp_path / "site.console").read_text()[-3000:])
            time.sleep(0.5)
        launcher = subprocess.Popen([sys.executable, "-m", "balsam.launcher", "-j", "serial", "-t", "5"], env=ours,
                                    stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        out, err = driver.communicate(timeout=400)
        assert driver.returncode == 0, out[-2000:] + err[-5000:]
    finally:
        for proc in (driver, launcher, agent):
            if proc is not None:
                _stop(proc)
        console.close()
    seen = json.loads(out.strip().splitlines()[-1])

    assert seen["value"] == {"value": {"sum": 42, "items": [41, "two"]}}
    assert seen["instance"] == {"value": ["Point", 41, -41]}
    # The app's exception, with run()'s frames: not "too many values to unpack (expected 2)".
    module, name, message, is_value_error, frames = seen["builtin"]["raised"]
    assert (module, name, message, is_value_error) == ("builtins", "ValueError", "bad input 41", True)
    assert "solver" in frames
    module, name, message, is_value_error, frames = seen["custom"]["raised"]
    assert (name, message, is_value_error) == ("SimulationError", "diverged at step 41", False)
    assert "solver" in frames
    # An exception dill cannot pickle: its type and message still reach the 0.7 client.
    module, name, message, is_value_error, _ = seen["unpicklable"]["raised"]
    assert is_value_error and "holds a generator 41" in message
    # A return value that cannot be serialized: an error 0.7 can load (not one of our modules').
    module, name, message, is_value_error, _ = seen["unserializable value"]["raised"]
    assert is_value_error and module == "builtins" and "cannot be serialized" in message and "generator" in message


# Written by our runner's code in a script of its own (its classes live in __main__, as an app's do).
_WRITE_PAYLOADS = r'''
import json, sys
from balsam._api import codec
from balsam.models import MAX_SERIALIZED_PAYLOAD_CHARS


class TwoArgs(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.state = (i for i in range(3))  # dill cannot pickle a generator

    def __str__(self):
        return f"code {self.args[0]}: {self.args[1]}"


def deeper(n):
    return deeper(n + 1)


def failing(how):
    if how == "huge message":
        raise ValueError("v" * 600_000)
    if how == "recursion":
        deeper(0)
    if how == "ours":
        raise codec.SerializeError("the return value of run() cannot be serialized: no")
    raise TwoArgs(7, "solver state lost")


payloads = {}
for how in ("huge message", "recursion", "ours", "unpicklable two-argument type"):
    try:
        failing(how)
    except Exception as exc:
        payloads[how] = codec.serialize_exception_07(exc, MAX_SERIALIZED_PAYLOAD_CHARS)
print(json.dumps(payloads))
'''

# Read by Balsam 0.7's own serializer, as its job.result() does.
_RAISE_PAYLOADS = r'''
import json, sys, traceback
from balsam.schemas.serializer import raise_from_serialized

seen = {}
for how, payload in json.loads(sys.stdin.read()).items():
    try:
        raise_from_serialized(payload)
    except BaseException as exc:
        seen[how] = [type(exc).__module__, type(exc).__name__, str(exc),
                     [frame.name for frame in traceback.extract_tb(exc.__traceback__)]]
print(json.dumps(seen))
'''


def test_exception_payloads_of_07_apps_fit_the_server_and_load_in_the_07_client(balsam07_venv):  # noqa: F811
    from balsam.models import MAX_SERIALIZED_PAYLOAD_CHARS

    written = subprocess.run([sys.executable, "-c", _WRITE_PAYLOADS], capture_output=True, text=True, timeout=120)
    assert written.returncode == 0, written.stderr[-3000:]
    payloads = json.loads(written.stdout)
    assert all(len(payload) <= MAX_SERIALIZED_PAYLOAD_CHARS for payload in payloads.values())
    env07 = env_for_07()
    read = subprocess.run([str(balsam07_venv / "bin" / "python"), "-c", _RAISE_PAYLOADS], input=written.stdout,
                          capture_output=True, text=True, env={**env07, "PYTHONNOUSERSITE": "1"}, timeout=120)
    assert read.returncode == 0, read.stderr[-3000:]
    seen = json.loads(read.stdout)

    module, name, message, frames = seen["huge message"]
    assert (module, name) == ("builtins", "ValueError") and "characters cut" in message and "failing" in frames
    module, name, message, frames = seen["recursion"]
    assert (module, name) == ("builtins", "RecursionError") and "deeper" in frames
    assert len(frames) <= codec.TRACEBACK_MAX_FRAMES + 3  # + raise_from_serialized's own
    module, name, message, _ = seen["ours"]
    assert (module, name, message) == ("builtins", "ValueError", "the return value of run() cannot be serialized: no")
    module, name, message, frames = seen["unpicklable two-argument type"]
    assert (module, name, message) == ("builtins", "Exception", "__main__.TwoArgs: code 7: solver state lost")
    assert "failing" in frames
    # Our own client reads them as well.
    assert isinstance(codec.deserialize_exception(payloads["recursion"]), RecursionError)


def test_our_apps_keep_our_envelope_with_the_exception_chain(tmp_path):
    """Only the apps a 0.7 client synced get 0.7's format: ours keep the cause of an exception."""
    from balsam.api import ApplicationDefinition, Job

    class Chained(ApplicationDefinition):
        site = 1

        def run(self):
            try:
                {}["missing"]
            except KeyError as exc:
                raise RuntimeError("simulation failed") from exc

    Chained.__app_id__ = 5
    job = Job._from_api({"id": 3, "workdir": "w", "app_id": 5, "serialized_parameters": codec.serialize({})})
    ran = subprocess.run(python_runner_command(Chained, job), shell=True, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    _, payload = parse_run_markers(ran.stdout)
    assert ran.returncode == 70 and payload, ran.stderr[-2000:]
    exc = codec.deserialize_exception(payload)
    assert isinstance(exc, RuntimeError) and isinstance(exc.__cause__, KeyError)
