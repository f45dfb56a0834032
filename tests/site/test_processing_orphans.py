"""A SIGKILLed site agent leaves none of the processing module's processes behind.

The hook pool's workers, their forkserver and multiprocessing's resource tracker used to outlive a
``kill -9`` of the agent for ever, re-parented to init (about 70 MiB per killed agent: an audit
found 9 of them after 3 kill/restart cycles of a campaign). Real agent daemon, real server, real
hooks: one hook running when the agent is killed, the other worker idle.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from site_test_utils import state_counts, wait_for

pytestmark = pytest.mark.slow


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_sigkilled_agent_leaves_no_hook_worker_forkserver_or_resource_tracker(make_site, agent_daemon,
                                                                                 client) -> None:
    from balsam.api import ApplicationDefinition, Job

    site = make_site(overrides={"processing": {"num_workers": 2}})
    site_name = Path(site.site_path).name
    started = Path(site.site_path) / "slow-hook-started"

    class QuickHook(ApplicationDefinition):
        site = site_name
        command_template = "true"

        def preprocess(self):
            self.job.state = "PREPROCESSED"

    class SlowHook(ApplicationDefinition):
        site = site_name
        command_template = "true"
        marker = str(started)

        def preprocess(self):
            import time
            from pathlib import Path

            Path(self.marker).touch()
            time.sleep(600)  # still running when the agent is killed
            self.job.state = "PREPROCESSED"

    QuickHook.sync()
    SlowHook.sync()
    Job.objects.bulk_create([QuickHook.submit(workdir=f"quick/{i}", save=False) for i in range(6)])
    SlowHook.submit(workdir="slow/0")

    pid = agent_daemon(site)
    wait_for(lambda: state_counts(client, site_id=site.site_id)["PREPROCESSED"] >= 6 and started.exists(),
             timeout=120, what="the quick hooks done and the slow one running")
    descendants = psutil.Process(pid).children(recursive=True)
    try:
        commands = [" ".join(p.cmdline()) for p in descendants]
        assert sum("multiprocessing.forkserver" in c for c in commands) >= 3, commands  # server + 2 workers
        assert any("multiprocessing.resource_tracker" in c for c in commands), commands

        os.kill(pid, signal.SIGKILL)
        # No bound on how fast: a generous one on how long, then the survivors are named.
        wait_for(lambda: not any(_alive(p) for p in descendants), timeout=60, interval=0.2, fail=False)
        survivors = [(p.pid, p.ppid(), " ".join(p.cmdline())[:80]) for p in descendants if _alive(p)]
        assert not survivors, f"still alive 60 s after the agent's SIGKILL: {survivors}"
    finally:
        for proc in descendants:  # only what this test started, by pid
            if _alive(proc):
                proc.kill()
