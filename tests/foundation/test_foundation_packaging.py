"""Packaging: every distribution of the repository declares its licence as an SPDX expression.

setuptools deprecated the TOML-table form (``license = { text = ... }``) with a removal date
(2027-02-18); the string form needs setuptools >= 77, so each build-system asks for it.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]


def distributions() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*pyproject.toml", "pyproject.toml"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    return sorted({REPO / path for path in listed} | set(REPO.glob("plugins/*/pyproject.toml")))


def test_every_distribution_has_an_spdx_license_string():
    found = distributions()
    assert REPO / "pyproject.toml" in found and len(found) >= 3
    for path in found:
        data = tomllib.loads(path.read_text())
        where = path.relative_to(REPO)
        license_ = data["project"].get("license")
        assert isinstance(license_, str) and license_, f"{where}: project.license must be an SPDX string"
        assert not any(c.startswith("License ::") for c in data["project"].get("classifiers", [])), \
            f"{where}: licence classifiers are refused beside an SPDX license"
        requires = " ".join(data["build-system"]["requires"])
        assert "setuptools>=77" in requires.replace(" ", ""), f"{where}: the SPDX form needs setuptools>=77"


def test_a_plugin_builds_without_licence_deprecation_warnings(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(REPO / "plugins" / "scheduler_cobalt")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "license" not in (proc.stdout + proc.stderr).lower().replace("license-file", ""), proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    import zipfile

    metadata = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("METADATA"))
    assert "License-Expression: BSD-3-Clause" in zipfile.ZipFile(wheel).read(metadata).decode()


def test_the_core_ships_py_typed(tmp_path):
    assert (REPO / "core" / "balsam" / "py.typed").is_file()
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "py.typed" in data["tool"]["setuptools"]["package-data"]["*"]
