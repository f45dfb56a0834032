"""How the ``transfers`` agent module reads a done task's per-file errors, and what settings.yml
refuses in ``transfer_locations``, without a server (the module's items are given as the API
returns them)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace

import pytest

from balsam.config import SettingsError, loads_settings
from balsam.site.modules.transfers import TransfersModule, TransfersOptions, match_file_errors
from balsam.transfer import TaskState, TaskStatus

NOW = dt.datetime(2026, 11, 30, 18, 0, tzinfo=dt.timezone.utc)


def module(tmp_path: Path) -> TransfersModule:
    site_config = SimpleNamespace(site_path=str(tmp_path), data_path=str(tmp_path / "data"), site_id=1)
    return TransfersModule(site_config, TransfersOptions(transfer_locations={"proj": "local://"}, max_attempts=3), client=None)


def item(item_id: int, dest: str, recursive: bool = False) -> dict:
    return {"id": item_id, "job_id": item_id, "direction": "out", "state": "active", "recursive": recursive,
            "task_id": "local:t", "transfer_info": {"dest": dest}}


def test_errors_match_their_item_or_the_directory_item_holding_them() -> None:
    items = [(1, "/r/a.txt", False), (2, "/r/dir/", True), (3, "/r/dir/sub", True), (4, "/r/dirt", False)]
    errors, unmatched = match_file_errors(items, {
        "/r//a.txt": "gone", "/r/dir/x": "denied", "/r/dir/sub/y/": "denied", "/elsewhere/z": "lost"})
    assert errors == {1: "gone", 2: "/r/dir/x: denied", 3: "/r/dir/sub/y/: denied"}
    assert unmatched == {"/elsewhere/z": "lost"}
    errors, _ = match_file_errors(items, {"/r/dir/p": "e1", "/r/dir/q": "e2"})
    assert errors == {2: "/r/dir/p: e1 (and 1 more failed files)"}


def test_a_task_with_errors_matching_no_item_marks_none_of_its_items_done(tmp_path: Path) -> None:
    """The agent dropped an error whose key matched no item and called every item done: with the
    local backend's prefixed keys, a stage-out that copied nothing finished its job."""
    status = TaskStatus(TaskState.done, file_errors={"/prefix/out/0.txt": "no such file or directory: /s/0"})
    updates: dict = {}
    module(tmp_path)._apply_status("local:t", status, [item(1, "/out/0.txt"), item(2, "/out/1.txt")], updates, NOW)
    assert {u["state"] for u in updates.values()} == {"pending"}  # a failed try each, never done
    assert all(u["transfer_info"]["attempts"] == 1 for u in updates.values())
    assert "matching none of its items (/prefix/out/0.txt: no such file" in updates[1]["transfer_info"]["error"]

    updates = {}
    clean = TaskStatus(TaskState.done, file_errors={"/out/0.txt": "no such file or directory: /s/0"})
    module(tmp_path)._apply_status("local:t", clean, [item(1, "/out/0.txt"), item(2, "/out/1.txt")], updates, NOW)
    assert (updates[1]["state"], updates[2]["state"]) == ("pending", "done")


@pytest.mark.parametrize("url, problem", [
    ("local://scratch/inputs", "local:// takes no host, got 'scratch': write local:///scratch/inputs"),
    ("rsync://me@dtn:port", "rsync://user@host[:port]: bad port 'port'"),
])
def test_malformed_locations_are_settings_errors_with_their_line(url: str, problem: str) -> None:
    """They passed validation: the mistake showed only when every job using them failed."""
    with pytest.raises(SettingsError) as info:
        loads_settings(f"transfers:\n  transfer_locations:\n    ok: 'local://'\n    bad: '{url}'\n")
    (error,) = info.value.errors
    assert error.startswith(f"settings.yml:4 transfers.transfer_locations.bad: {problem}")
    # Locations of protocols no installed backend serves still load: their jobs fail with that reason.
    settings = loads_settings("transfers:\n  transfer_locations:\n    p: 'local:///scratch'\n    q: 'nosuch://x'\n")
    assert settings.transfers.transfer_locations == {"p": "local:///scratch", "q": "nosuch://x"}
