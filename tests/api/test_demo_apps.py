"""The demo's shell app prints what docs/quickstart.md shows, without stray shell quotes."""

from __future__ import annotations

import subprocess
from pathlib import Path


def test_demo_hello_greets_without_literal_quotes(site, tmp_path: Path) -> None:
    from balsam.api import Job
    from balsam.demo import register_apps

    apps = register_apps(site.id)
    hello = apps["hello"]
    job = Job("hello/0001", hello, parameters={"name": "job 1", "x": 3})
    command = hello(job).get_arg_str()
    out = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    # The parameter is shell-quoted ('job 1'); inside double quotes the quotes would be printed.
    assert out.stdout == "Hello, job 1!\n"
    assert (tmp_path / "square.txt").read_text() == "9\n"
