"""What a launcher process imports before its first job (issue 14: start -> first RUNNING).

A launcher's start-up is CPU-bound imports (0.2-0.3 s of CPU on the 2-CPU VM, docs/performance.md):
a module pulled onto its path by accident (the server's stack, the agent, a CLI tool) costs every
launcher of every allocation. These tests run a fresh interpreter through the launcher's own
start-up steps (its entry module, the settings, the plugin manager, both job modes, the platform)
and look at ``sys.modules``; no timing is asserted.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from balsam.plugins import discovery

#: Top-level packages (or balsam modules) no launcher needs: the server's stack (starlette,
#: sqlalchemy, uvicorn, jinja2 for its pages), the site agent and its CLI, process inspection
#: (psutil), Globus' SDK, the httpx client and its command-line tool (the launcher's REST client
#: speaks http.client), setuptools' resource scanner.
NOT_ON_THE_LAUNCHER_PATH = (
    "sqlalchemy", "starlette", "uvicorn", "jinja2", "fastapi", "psutil", "globus_sdk", "httpcore", "h11", "anyio",
    "rich", "pygments", "pkg_resources", "setuptools", "alembic", "psycopg", "psycopg2",
    "balsam.server", "balsam.site.agent", "balsam.site.site_ops", "balsam.cli.site", "balsam.cli.job",
)

START_UP = r"""
import json, os, sys
import balsam.launcher.__main__  # the job template's `python -m balsam.launcher` (without running it)
from balsam.config import SiteConfig
from balsam.launcher import entry
site = SiteConfig(sys.argv[1])
settings = entry._load_settings(site)
entry._platform(settings).discover_nodes(dict(os.environ))
entry._job_mode_class("mpi")
entry._job_mode_class("serial")
import balsam.launcher.service_calls as api
api.api_models()  # the early lease's: balsam.api (Job objects) and the app codec
import balsam.launcher.app_run, balsam.client.lease, balsam.client.status_updater
print(json.dumps(sorted(sys.modules)))
"""


def _loaded(site: Path) -> set[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(site), "BALSAM_HOME": str(site / "home")}
    if os.environ.get("PYTHONPATH"):  # a copy of the tree under test
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    out = subprocess.run([sys.executable, "-c", START_UP, str(site)], capture_output=True, text=True, timeout=120,
                         env=env, cwd=site)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / ".balsam-site").write_text("1\n")
    (tmp_path / "settings.yml").write_text(yaml.safe_dump({"launcher": {"idle_ttl_sec": 3}}))
    for sub in ("data", "log"):
        (tmp_path / sub).mkdir()
    return tmp_path


def test_the_launcher_start_up_imports_nothing_of_the_server_agent_or_cli_tools(site: Path) -> None:
    loaded = _loaded(site)
    # The steps above ran: both job modes, the platform and the API models are loaded.
    assert {"balsam.launcher.modes.mpi", "balsam.launcher.modes.serial", "balsam.api", "balsam.plugins.manager"} <= loaded
    unwanted = sorted(m for m in loaded for name in NOT_ON_THE_LAUNCHER_PATH if m == name or m.startswith(name + "."))
    assert unwanted == []
    # httpx's command-line tool is kept out by balsam.launcher.__main__ (a None entry), not imported.
    assert "httpx" not in loaded or "httpx._main" in loaded


def test_plugin_identities_read_off_the_metadata_head_match_the_email_parser() -> None:
    # The plugin listing reads each distribution's Name and Version off its METADATA's head
    # instead of parsing the whole file (discovery._name_and_version): same answers.
    checked = 0
    for dist in importlib.metadata.distributions():
        cheap = discovery._name_and_version(dist)
        if cheap is None:
            continue
        assert cheap == (dist.metadata["Name"], dist.metadata["Version"]), dist
        checked += 1
    assert checked > 10


class _Dist:
    def __init__(self, text: str) -> None:
        self.text = text

    def read_text(self, name: str) -> str | None:
        return self.text if name == "METADATA" else None


@pytest.mark.parametrize("text", [
    "Metadata-Version: 2.1\nname: lower-case\nVersion: 1\n",  # a key the e-mail parser matches, this reader not
    "Metadata-Version: 2.1\nVersion: 1\n\nName: in-the-body\n",  # after the headers: not a header
    "",
])
def test_a_metadata_head_without_plain_name_and_version_is_left_to_the_email_parser(text: str) -> None:
    assert discovery._name_and_version(_Dist(text)) is None
