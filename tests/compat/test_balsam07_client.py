"""The unmodified Balsam 0.7 client (``pip install balsam==0.7.0a24`` in a venv of its own, as the
Aurora guide installs it) drives our real server, on SQLite and on PostgreSQL: its CLI (login, site
ls) and its Python API in a subprocess (tests/compat/balsam07_driver.py): site create, app sync,
bulk create, a DAG child, session acquire and 0.7's own bulk status updater, events, BatchJob
delete, query delete. The venv is cached in ``.cache/balsam-0.7-venv`` (``$BALSAM07_VENV``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import filelock
import pytest

pytestmark = pytest.mark.slow

VERSION = "0.7.0a24"
REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("balsam07_driver.py")
PASSWORD = "correct horse battery"
#: Variables the 0.7 venv's processes must not inherit from ours: a PYTHONPATH to our tree (a test
#: run with PYTHONPATH=core) put our `balsam` ahead of 0.7's (ModuleNotFoundError: balsam.cmdline;
#: and pip, installing into the venv, saw our core/balsam.egg-info as balsam installed), and a
#: PYTHONHOME would point the venv's python at another prefix.
NOT_FOR_07 = ("PYTHONPATH", "PYTHONHOME")


def env_for_07() -> dict[str, str]:
    """Our environment without ``BALSAM_*`` settings and Python paths: the 0.7 venv's own packages only."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_") and k not in NOT_FOR_07}


@pytest.fixture(scope="session")
def balsam07_venv() -> Path:
    venv = Path(os.environ.get("BALSAM07_VENV") or REPO / ".cache" / "balsam-0.7-venv")
    stamp = venv / ".balsam-version"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(venv) + ".lock", timeout=900):
        if not (stamp.is_file() and stamp.read_text().strip() == VERSION):
            # The same pip install into a venv of its own, made quick for the CI (~5 s, was ~15-20 s
            # on its 2 cores): our pip installs into the venv (``--python``) instead of a copy
            # bootstrapped into it by ensurepip, and without byte-compiling every module (Python
            # compiles what the 0.7 client imports as it imports it).
            subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True, timeout=300)
            install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                                      "-q", "--no-compile", "--disable-pip-version-check", f"balsam=={VERSION}"],
                                     capture_output=True, text=True, timeout=900,
                                     env={k: v for k, v in os.environ.items() if k not in NOT_FOR_07})
            assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
            stamp.write_text(VERSION + "\n")
    return venv


@pytest.fixture(scope="module")
def sqlite_server(live_server_factory):
    """One SQLite server for this module's SQLite tests: each logs in as a user of its own and
    makes a site of its own, so they need no server each (a start is seconds on a loaded CI)."""
    return live_server_factory("sqlite")


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_the_unmodified_07_client_works_against_our_server(database, balsam07_venv, live_server_factory, tmp_path,
                                                           request):
    from balsam.server.admin import Admin

    server = request.getfixturevalue("sqlite_server") if database == "sqlite" else live_server_factory(database)
    username = f"user07-{uuid.uuid4().hex[:6]}"
    with Admin(server.database_url) as admin:
        admin.add_user(username, PASSWORD, 12)
    env = env_for_07()
    env.update(HOME=str(tmp_path), BALSAM_CLIENT_PATH=str(tmp_path / "client07.yml"), PYTHONNOUSERSITE="1",
               PATH=f"{balsam07_venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    balsam07 = [str(balsam07_venv / "bin" / "balsam")]

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        proc = subprocess.run(balsam07 + list(args), input=stdin, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, f"balsam {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        return proc

    login = run("login", "-u", server.url, stdin=f"{username}\n{PASSWORD}\n")
    assert "Logged In" in login.stdout

    site_name = f"site07-{uuid.uuid4().hex[:6]}"
    driver = subprocess.run([str(balsam07_venv / "bin" / "python"), str(DRIVER), site_name, str(tmp_path / site_name)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert driver.returncode == 0, driver.stdout[-2000:] + driver.stderr[-5000:]
    seen = json.loads(driver.stdout.strip().splitlines()[-1])
    assert "STAGED_IN->RUNNING" in seen["events"] and "RUN_DONE->POSTPROCESSED" in seen["events"]
    assert seen["deleted"] == 5 and seen["left"] == 1  # the untagged child stays

    listing = run("site", "ls")
    assert site_name in listing.stdout and "Active" in listing.stdout


def test_the_07_client_under_libensembles_pydantic_setting_creates_and_updates(balsam07_venv, sqlite_server, tmp_path):
    """libEnsemble's import makes 0.7's models send "kwargs": {} in every body: each create was a 422
    (and the 0.7 client retried it for 34 minutes), so its executor could submit nothing."""
    from balsam.server.admin import Admin

    server = sqlite_server
    username = f"libe07-{uuid.uuid4().hex[:6]}"
    with Admin(server.database_url) as admin:
        admin.add_user(username, PASSWORD, 12)
    env = env_for_07()
    env.update(HOME=str(tmp_path), BALSAM_CLIENT_PATH=str(tmp_path / "client07.yml"), PYTHONNOUSERSITE="1",
               PATH=f"{balsam07_venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    login = subprocess.run([str(balsam07_venv / "bin" / "balsam"), "login", "-u", server.url], input=f"{username}\n{PASSWORD}\n",
                           capture_output=True, text=True, env=env, timeout=120)
    assert login.returncode == 0, login.stdout[-2000:] + login.stderr[-2000:]
    driver = subprocess.run([str(balsam07_venv / "bin" / "python"), str(DRIVER.with_name("balsam07_libensemble_driver.py")),
                             f"libe-{uuid.uuid4().hex[:6]}", str(tmp_path / "site")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert driver.returncode == 0, driver.stdout[-2000:] + driver.stderr[-5000:]
    seen = json.loads(driver.stdout.strip().splitlines()[-1])
    assert seen["data"] == {"seen": True} and seen["batch_job_id"] > 0
