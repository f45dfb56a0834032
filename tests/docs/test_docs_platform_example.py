"""The complete platform plugin of docs/plugins/writing-a-platform-plugin.md works: its files are
extracted from the page, registered as an installed distribution (a dist-info directory on the
path, as `pip install -e` makes one) and its own conformance test runs against balsam.testing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "plugins" / "writing-a-platform-plugin.md"

#: "`path`: ..." on its own line, a blank line, then the fenced block holding that file.
FILE_BLOCK = re.compile(r"^`([\w./-]+)`[^\n]*:\n\n```\w*\n(.*?)\n```", re.MULTILINE | re.DOTALL)


def example_files() -> dict[str, str]:
    return {path: body + "\n" for path, body in FILE_BLOCK.findall(PAGE.read_text())}


def test_the_page_holds_a_whole_package():
    assert set(example_files()) == {"pyproject.toml", "balsam_platform_brook/__init__.py", "tests/test_brook.py"}


def test_the_example_platform_passes_the_conformance_kit(tmp_path: Path):
    package = tmp_path / "balsam-platform-brook"
    for path, text in example_files().items():
        (package / path).parent.mkdir(parents=True, exist_ok=True)
        (package / path).write_text(text)
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    dist_info = package / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (dist_info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in points.items())
        for group, points in project["entry-points"].items()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
                          cwd=package, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    # every check ran but the job-template ones (Brook uses Slurm's template)
    assert re.search(r"\b12 passed, 2 skipped\b", summary), proc.stdout[-3000:]
