"""What a platform logs while the launcher discovers its nodes (before its log file is opened: the
GPU and core narrowing) is replayed once logging is configured, and on every way out before that:
a warning there may be what explains the error the launcher stops with."""

from __future__ import annotations

import logging

import pytest

from balsam.launcher import entry
from balsam.launcher.entry import LauncherError, Partition
from balsam.platform import NodeInfo


class _NarrowingPlatform:
    name = "narrowing"

    def discover_nodes(self, env: dict) -> list[NodeInfo]:
        logging.getLogger("balsam.platform.narrowing").warning("CUDA_VISIBLE_DEVICES=0 narrowed the GPUs")
        return [NodeInfo("0", "h0", [0, 1])]


def test_a_discovery_warning_reaches_stderr_when_the_launcher_stops_before_its_log(monkeypatch, capsys) -> None:
    monkeypatch.delenv("BALSAM_LAUNCHER_NODELIST", raising=False)
    monkeypatch.setattr(entry, "_platform", lambda settings: _NarrowingPlatform())
    with pytest.raises(LauncherError, match="2 nodes"):
        entry._run_with_site(None, None, None, [Partition("mpi", 2)], {}, 10.0, 0.0, 0, None, None)
    assert "CUDA_VISIBLE_DEVICES=0 narrowed the GPUs" in capsys.readouterr().err
    assert not any(type(h).__name__ == "HeldRecords" for h in logging.getLogger("balsam").handlers)
