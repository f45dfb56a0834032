"""Follow-ups of the Globus-at-scale fixes, checked on the transfers module with the scripted backend
of test_transfer_module_refusals (no server):

- A ``done`` task could not say its failed files must not be retried (``file_errors_retryable``).
- A queued task was always shown "all its threads are busy" and a queued task carrying its backend's
  own reason was logged as "not moving".
- ``transfers:`` section keys a backend takes (0.7's ``globus_endpoint_id``, a relative
  ``globus_endpoint_site_path``) were checked at load only when ``backend_options`` was not empty.
- ``num_items_query_limit`` capped the tasks in flight: batches of 1,000 and 10 slots against a
  2,000-item read ran 2 tasks at a time.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest

from balsam.config import SettingsError, loads_settings
from balsam.site.modules.transfers import QUEUED_REASON, TransfersOptions
from balsam.transfer import TaskState, TaskStatus
from test_transfer_module_refusals import LOGGER, T0, loud, setup

REMOTE_EP = "9d6d994a-6d04-11e5-ba46-22000b92c6ec"


def test_a_done_task_may_say_its_failed_files_are_not_to_be_retried(tmp_path: Path) -> None:
    api, module, backend, clock = setup(tmp_path, {"far": 4}, transfer_batch_size=4)
    module.run_cycle()
    (task_id,) = backend.files
    dests = [f.dest for f in backend.files[task_id]]
    backend.tasks[task_id] = TaskStatus(TaskState.done, file_errors={dests[1]: "cancelled by its owner; not retried"},
                                        file_errors_retryable=False)
    clock[0] = T0 + dt.timedelta(seconds=5)
    module.run_cycle()
    assert [api.items[i]["state"] for i in (1, 2, 3, 4)] == ["done", "error", "done", "done"]
    assert api.items[2]["transfer_info"]["error"] == "cancelled by its owner; not retried"
    assert "retry_after" not in api.items[2]["transfer_info"]


def test_a_queued_task_shows_its_backends_reason_and_is_not_taken_for_a_stall(tmp_path: Path, caplog) -> None:
    api, module, backend, clock = setup(tmp_path, {"far": 2}, transfer_batch_size=2, task_timeout_sec=60)
    module.run_cycle()
    (task_id,) = backend.files
    backend.tasks[task_id] = TaskStatus(TaskState.active, queued=True, reason="waiting in the service's queue")
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for cycle in range(1, 30):  # 145 s queued: more than task_timeout_sec, no deadline
            clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
            module.run_cycle()
    assert api.items[1]["state"] == "active" and api.items[1]["transfer_info"]["reason"] == "waiting in the service's queue"
    assert not loud(caplog), loud(caplog)
    assert backend.cancelled == []
    # Without a reason of its own: the backend-neutral one.
    backend.tasks[task_id] = TaskStatus(TaskState.active, queued=True)
    module.run_cycle()
    assert api.items[1]["transfer_info"]["reason"] == QUEUED_REASON and "threads" not in QUEUED_REASON


@pytest.mark.parametrize("line, problem", [
    ("  globus_endpoint_id: 'nope'\n", "settings.yml:4 transfers.globus_endpoint_id: expected a Globus collection UUID"),
    ("  globus_endpoint_site_path: relative/site\n",
     "settings.yml:4 transfers.globus_endpoint_site_path: expected an absolute path on the site's collection"),
])
@pytest.mark.parametrize("location", [f"globus://{REMOTE_EP}", "local://"])
def test_section_keys_of_a_backend_are_checked_when_settings_yml_is_read(line: str, problem: str, location: str) -> None:
    with pytest.raises(SettingsError) as info:
        loads_settings(f"transfers:\n  transfer_locations:\n    here: '{location}'\n{line}")
    (error,) = info.value.errors
    assert error.startswith(problem) and "\n" not in error, error


def test_good_section_keys_pass_and_a_set_option_is_checked_under_its_own_key() -> None:
    loads_settings(f"transfers:\n  transfer_locations:\n    aps: 'globus://{REMOTE_EP}'\n"
                   f"  globus_endpoint_id: '{REMOTE_EP}'\n  globus_endpoint_site_path: /~/site\n")
    with pytest.raises(SettingsError) as info:
        loads_settings(f"transfers:\n  globus_endpoint_id: 'nope'\n  backend_options:\n    globus:\n      sync_level: size\n")
    assert [e.split(":", 2)[:2] for e in info.value.errors] == [["settings.yml", "2 transfers.globus_endpoint_id"]]
    assert TransfersOptions(globus_endpoint_id="nope").validate().keys() == {"globus_endpoint_id"}


def test_tasks_in_flight_are_not_capped_by_num_items_query_limit(tmp_path: Path) -> None:
    """Batches of 10, 5 slots, a read of 20 items: the in-flight items filled the read, so 2 tasks ran
    at a time (the others were neither polled nor counted, and no pending item was read)."""
    api, module, backend, clock = setup(tmp_path, {"far": 200}, transfer_batch_size=10, max_concurrent_transfers=5,
                                        num_items_query_limit=20)
    in_flight = []
    for cycle in range(4):
        clock[0] = T0 + dt.timedelta(seconds=5 * cycle)
        module.run_cycle()
        in_flight.append(len({it["task_id"] for it in api.items.values() if it["state"] == "active"}))
        assert module.last_cycle_calls <= 6, module.last_cycle_calls  # bulk GETs, no call per item
    assert in_flight[-1] == 5, in_flight
    # Every task in flight is polled: one finishing is seen, and its slot goes to the next batch (the
    # next cycle: a cycle that read every slot taken reads no pending item).
    first = sorted(backend.files)[0]
    backend.tasks[first] = TaskStatus(TaskState.done)
    for _ in range(2):
        clock[0] += dt.timedelta(seconds=5)
        module.run_cycle()
    assert api.states("far")["done"] == 10
    assert len({it["task_id"] for it in api.items.values() if it["state"] == "active"}) == 5
