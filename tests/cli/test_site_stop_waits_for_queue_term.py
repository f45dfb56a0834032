"""`balsam queue term --id ID; balsam site stop` (the README's way to end everything) left the
launcher running: the agent ends a BatchJob marked pending_deletion at its next scheduler poll
(every 10 s by default), and `site stop` stopped it before that poll. `site stop` now waits for the
marked BatchJobs of its site first, saying so, and warns when they are still marked at its timeout.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import balsam.cli.site_commands as site_commands


class FakeClient:
    """The BatchJobs of site 3 marked pending_deletion: BatchJob 24 for the first ``marked_reads`` reads."""

    def __init__(self, marked_reads: int):
        self.marked_reads = marked_reads
        self.reads = 0
        self.retry_count = 10

    def get(self, path, params=None, deadline=None):
        assert path == "/batch-jobs/", path
        assert dict(params or {}).get("site_id") == 3 and dict(params or {}).get("state") == "pending_deletion", params
        assert deadline is not None  # a server that accepts and never answers must not hold the stop
        self.reads += 1
        rows = [{"id": 24, "state": "pending_deletion", "scheduler_id": 7}] if self.reads <= self.marked_reads else []
        return {"count": len(rows), "results": rows}


@pytest.fixture
def stop_site(monkeypatch, tmp_path):
    import balsam.site.agent
    import balsam.site.site_ops

    def run(client: FakeClient, *args: str):
        stopped_after: list[int] = []

        def stop_agent(path, *, timeout, force, progress=None, echo=None):
            stopped_after.append(client.reads)
            return 4242

        monkeypatch.setattr(site_commands, "_site_path", lambda path: tmp_path)
        monkeypatch.setattr(site_commands, "_site_config", lambda path: SimpleNamespace(site_id=3))
        monkeypatch.setattr(site_commands, "_client", lambda: client)
        monkeypatch.setattr(balsam.site.agent, "agent_running", lambda path: (socket.gethostname(), 4242))
        monkeypatch.setattr(balsam.site.site_ops, "stop_agent", stop_agent)
        result = CliRunner().invoke(site_commands.stop, [str(tmp_path), *args])
        return result, stopped_after

    return run


def test_site_stop_lets_the_agent_end_the_batch_jobs_queue_term_marked(stop_site):
    client = FakeClient(marked_reads=2)
    result, stopped_after = stop_site(client)
    assert result.exit_code == 0, result.output
    assert stopped_after == [3], stopped_after  # stopped once the third read found none marked
    assert "Waiting for the site agent to end 1 BatchJob(s) marked by `balsam queue term` (24)" in result.stderr, \
        result.stderr
    assert "Site agent [pid 4242] shutdown OK" in result.stdout


def test_site_stop_warns_when_they_are_still_marked_at_its_timeout(stop_site):
    client = FakeClient(marked_reads=10**6)
    result, stopped_after = stop_site(client, "--timeout", "3")  # the wait gets at most half of it
    assert result.exit_code == 0, result.output
    assert stopped_after and stopped_after[0] >= 2, stopped_after
    assert ("Warning: BatchJob(s) 24 still await deletion after 2 s; their launchers run on until idle "
            "(launcher.idle_ttl_sec) or their wall time; `balsam site start` has them ended") in result.stderr


def test_site_stop_without_marked_batch_jobs_stops_at_once(stop_site):
    client = FakeClient(marked_reads=0)
    result, stopped_after = stop_site(client)
    assert result.exit_code == 0, result.output
    assert stopped_after == [1] and "Waiting" not in result.stderr, (stopped_after, result.stderr)
