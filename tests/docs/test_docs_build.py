"""The user documentation builds with `mkdocs build --strict`: a broken link or anchor, or a page of
docs/ missing from mkdocs.yml's nav, fails the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def _build(config: Path, site_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site_dir)], capture_output=True, text=True, timeout=300)


def _nav_pages(nav: list) -> set[str]:
    pages: set[str] = set()
    for entry in nav:
        for value in (entry.values() if isinstance(entry, dict) else [entry]):
            pages.update(_nav_pages(value) if isinstance(value, list) else {value})
    return pages


def test_docs_build_strict(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    pages = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
    missing = sorted(pages - _nav_pages(config["nav"]))
    assert not missing, f"docs pages missing from mkdocs.yml's nav: {missing}"
    proc = _build(REPO / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-4000:]}"
    assert (tmp_path / "site" / "dashboard" / "index.html").is_file()


def test_strict_build_catches_a_broken_link_and_a_page_left_out(tmp_path: Path) -> None:
    """The checks themselves: the same configuration on a copy of docs/ with two faults planted."""
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "docs" / "orphan.md").write_text("# Not in the nav\n")
    with (tmp_path / "docs" / "quickstart.md").open("a") as fh:
        fh.write("\nSee [the missing page](no-such-page.md).\n")
    proc = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0
    assert "no-such-page.md" in proc.stderr and "orphan.md" in proc.stderr
