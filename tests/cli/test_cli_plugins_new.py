"""`balsam plugins new platform|scheduler NAME` writes a package that builds, installs (its entry
point registered), and whose balsam.testing conformance test passes as generated."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from balsam.cli.plugins import plugins


def _run_package_tests(package: Path, path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
                          cwd=package, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc.stdout


def _skip_reasons(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("SKIPPED")]


def _scaffold(tmp_path: Path, kind: str, name: str) -> Path:
    result = CliRunner().invoke(plugins, ["new", kind, name, "--path", str(tmp_path)])
    assert result.exit_code == 0, result.output
    package = tmp_path / f"balsam-{kind}-{name.replace('_', '-')}"
    assert f"wrote {package}" in result.output and "TODO" in (package / "README.md").read_text()
    return package


KINDS = [("platform", "brook", "BrookPlatform"), ("scheduler", "lsf_like", "LsfLikeScheduler")]


@pytest.mark.parametrize("kind, name, klass", KINDS)
def test_new_package_tests_pass_from_the_source_tree(tmp_path, kind, name, klass):
    package = _scaffold(tmp_path, kind, name)
    output = _run_package_tests(package, package)
    # not installed yet: only the entry-point, settings-loader (and template) checks skip
    assert " passed" in output.splitlines()[-1]
    assert all(re.search(r"not installed|no installed|job template", s) for s in _skip_reasons(output))


def _build_install_and_test(package: Path, site: Path) -> str:
    """pip wheel + pip install --target (a real installation, kept out of this environment), then
    the package's own tests with the installation on the path."""
    wheels = package.parent / "wheels"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(package)],
                   check=True, capture_output=True, timeout=300)
    subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    *map(str, wheels.glob("*.whl"))], check=True, capture_output=True, timeout=300)
    return _run_package_tests(package, site)


@pytest.mark.slow
@pytest.mark.parametrize("kind, name, klass", KINDS)
def test_new_package_builds_installs_and_is_green(tmp_path, kind, name, klass):
    package = _scaffold(tmp_path, kind, name)
    output = _build_install_and_test(package, tmp_path / "site")
    assert " passed" in output.splitlines()[-1]
    # installed: every check runs (the platform uses its scheduler's job template)
    assert all("job template" in s for s in _skip_reasons(output)), _skip_reasons(output)
    entry_points = next((tmp_path / "site").glob("*.dist-info")) / "entry_points.txt"
    assert f"{name} = balsam_{kind}_{name}:{klass}" in entry_points.read_text()


def test_new_refuses_bad_names_and_existing_directories(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(plugins, ["new", "platform", "My-Machine", "--path", str(tmp_path)])
    assert bad.exit_code == 2 and "use lower-case letters" in bad.output
    assert runner.invoke(plugins, ["new", "platform", "ok", "--path", str(tmp_path)]).exit_code == 0
    again = runner.invoke(plugins, ["new", "platform", "ok", "--path", str(tmp_path)])
    assert again.exit_code == 2 and "already exists" in again.output
    assert runner.invoke(plugins, ["new", "transfer", "x", "--path", str(tmp_path)]).exit_code == 2


def test_new_scheduler_template_exports_the_launcher_start_time(tmp_path):
    # The launcher counts its wall time from BALSAM_LAUNCHER_START_TIME; without it a template's
    # set-up time is not counted and jobs are timed out after the allocation has already ended.
    package = _scaffold(tmp_path, "scheduler", "lsf_like")
    lines = (package / "balsam_scheduler_lsf_like" / "job-template.sh").read_text().splitlines()
    assert "export BALSAM_LAUNCHER_START_TIME=$(date +%s)" in lines
    start = lines.index("export BALSAM_LAUNCHER_START_TIME=$(date +%s)")
    # before the site set-up and the launcher's start
    assert start < next(i for i, line in enumerate(lines) if line.startswith("export BALSAM_SITE_PATH="))
    assert start < next(i for i, line in enumerate(lines) if line.startswith("exec "))
