"""settings.yml bad input as a user meets it: each malformed file gives one line naming the file.

An audit of ~75 malformed files (wrong types, negatives, unknown keys in every plugin section,
YAML syntax errors, unknown plugins) through ``load_settings`` and ``balsam site check-settings``
found one that did not: lists or mappings nested ~1,000 deep made the YAML loaders recurse, and
the RecursionError escaped ``load_settings``. ``balsam site check-settings``, ``balsam site sync``
(which checks the file before pushing or restarting anything) and the running agent's check of
an edited file all said "maximum recursion depth exceeded while calling a Python object", naming
neither the file nor the problem; `sync` did not say that the running agent keeps its settings.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

import balsam.site.agent as agent_module
from balsam.cli.site_commands import sync
from balsam.config import SettingsError, load_settings

#: Valid YAML, but no settings file (it was called "invalid YAML"): the line where level 101 opens.
DEEP_PROBLEM = "2: lists or mappings nested more than 100 levels inside one another (a settings file nests five or so)"


def deep_file(tmp_path: Path, depth: int, kind: str) -> Path:
    value = "[" * depth + "]" * depth if kind == "list" else "{a: " * depth + "1" + "}" * depth
    path = tmp_path / "settings.yml"
    path.write_text(f"scheduler:\n  allowed_projects: {value}\n")
    return path


@pytest.mark.parametrize(("depth", "kind"), [(1500, "list"), (1500, "mapping"), (20000, "mapping")])
def test_settings_nested_too_deeply_are_one_located_error(tmp_path: Path, depth: int, kind: str) -> None:
    path = deep_file(tmp_path, depth, kind)
    with pytest.raises(SettingsError) as caught:
        load_settings(path)
    assert caught.value.errors == [f"{path}:{DEEP_PROBLEM}"]


def test_sync_of_a_file_nested_too_deeply_names_it_and_keeps_the_running_agent(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))  # no login: nothing could be pushed anyway
    site = tmp_path / "site"
    site.mkdir()
    (site / ".balsam-site").write_text("1\n")
    deep_file(site, 3000, "mapping")
    monkeypatch.setattr(agent_module, "agent_running", lambda path: (socket.gethostname(), 4242))
    result = CliRunner().invoke(sync, [str(site)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {site / 'settings.yml'}:{DEEP_PROBLEM} (nothing was pushed; the running site agent [pid 4242] "
        "keeps its current settings)"]


def test_settings_nested_too_deeply_in_block_style_name_the_line_of_level_101(tmp_path: Path) -> None:
    path = tmp_path / "settings.yml"  # valid YAML ("invalid YAML" it was called), not a settings file
    path.write_text("scheduler:\n" + "".join("  " * depth + "a:\n" for depth in range(1, 110)) + "  " * 110 + "b: 1\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(path)
    assert caught.value.errors == [f"{path}:101: lists or mappings nested more than 100 levels inside one another "
                                   "(a settings file nests five or so)"]
