"""Node counts of PBS jobs whose Resource_List has a select spec but no nodect."""

from __future__ import annotations

import pytest

from balsam_scheduler_pbs import PBSScheduler

from sched_helpers import utc

NOW = utc(2023, 11, 21, 18, 16, 13)


@pytest.mark.parametrize("select, nodes", [
    ("3:ncpus=64:ngpus=4", 3),
    ("1:ncpus=64+2:ncpus=32", 3),  # one chunk of one node and one of two
    ("ncpus=64+2:ncpus=32", 3),  # a chunk without a count is one node
    ("2", 2),
])
def test_nodes_sum_the_select_chunks(select, nodes):
    job = {"Job_Owner": "alice@polaris-login-01", "job_state": "Q", "queue": "debug",
           "qtime": "Tue Nov 21 17:58:13 2023", "Resource_List": {"select": select, "walltime": "00:30:00"}}
    status = PBSScheduler(user="alice").status_from_record("1196243.polaris-pbs-01", job, NOW)
    assert status is not None and status.num_nodes == nodes
