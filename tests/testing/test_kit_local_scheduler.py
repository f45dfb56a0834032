"""The built-in local scheduler runs balsam.testing's SchedulerContract on outputs recorded from
its own queue command (``python -m balsam.builtin.local_queue``: see data/local/README.md)."""

from __future__ import annotations

from pathlib import Path

from balsam.builtin.local_scheduler import LocalScheduler
from balsam.states import BatchJobState
from balsam.testing import HistoryCase, SchedulerContract, utc


class TestLocalSchedulerContract(SchedulerContract):
    scheduler_class = LocalScheduler
    recorded_dir = Path(__file__).parent / "data" / "local"
    now = utc(2026, 11, 30, 17, 40)
    submit_outputs = {"submit_ok": 1}
    status_outputs = {"status_one_running": {1: BatchJobState.running}, "status_empty": {}}
    request_num_nodes = 1  # the local queue runs on this one machine
    # the local queue keeps every record: an id it never saw is an error, not "already gone"
    delete_outputs = {"delete_unknown": "no local job 7"}
    # job 1 still running, job 2 exited 3, job 3 never submitted
    history_cases = [HistoryCase({1: None, 2: BatchJobState.finished, 3: None}, output="history")]
