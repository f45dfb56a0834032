"""PBS queue discovery reads each queue's fewest nodes (``resources_min.nodect``) into
``AllowedQueue.min_nodes``, and ``site_defaults()`` writes it only where it is above 1.

``QSTAT_Q_MIN_NODES`` is ``qstat -Q -f -F json`` written by hand in the format PBS Pro 2022.1 prints
on ALCF Polaris (as tests/schedulers/data/pbs/qstat_Qf_json.txt, no PBS server runs here): the
routing queue ``prod`` and its route-only destination ``small`` state ``resources_min.nodect`` 10,
``debug-scaling`` states 1 (no minimum), ``debug`` a minimum wall time only. ``bad-min`` holds a
value PBS never prints (a string), ``inverted`` a minimum above its maximum (a misconfigured queue).
"""

from __future__ import annotations

import logging

from balsam.models import AllowedQueue
from balsam_scheduler_pbs import PBSScheduler

from sched_helpers import ReplayRunner, result

QSTAT_Q_MIN_NODES = """
{
    "timestamp":1700590573,
    "pbs_version":"2022.1.3.20230614134139",
    "pbs_server":"polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov",
    "Queue":{
        "debug":{
            "queue_type":"Execution",
            "Priority":250,
            "total_jobs":14,
            "state_count":"Transit:0 Queued:6 Held:0 Waiting:0 Running:8 Exiting:0 Begun:0 ",
            "max_queued":"[u:PBS_GENERIC=1]",
            "resources_max":{
                "nodect":2,
                "walltime":"01:00:00"
            },
            "resources_min":{
                "walltime":"00:05:00"
            },
            "resources_default":{
                "walltime":"00:05:00"
            },
            "max_run":"[u:PBS_GENERIC=1]",
            "enabled":"True",
            "started":"True"
        },
        "debug-scaling":{
            "queue_type":"Execution",
            "total_jobs":3,
            "state_count":"Transit:0 Queued:2 Held:0 Waiting:0 Running:1 Exiting:0 Begun:0 ",
            "max_queued":"[u:PBS_GENERIC=1]",
            "resources_max":{
                "nodect":10,
                "walltime":"01:00:00"
            },
            "resources_min":{
                "nodect":1
            },
            "enabled":"True",
            "started":"True"
        },
        "prod":{
            "queue_type":"Route",
            "total_jobs":0,
            "state_count":"Transit:0 Queued:0 Held:0 Waiting:0 Running:0 Exiting:0 Begun:0 ",
            "max_queued":"[u:PBS_GENERIC=100]",
            "resources_max":{
                "nodect":496,
                "walltime":"24:00:00"
            },
            "resources_min":{
                "nodect":10,
                "walltime":"00:05:00"
            },
            "route_destinations":"small,medium,large,backfill-small,backfill-medium,backfill-large",
            "enabled":"True",
            "started":"True"
        },
        "small":{
            "queue_type":"Execution",
            "from_route_only":"True",
            "resources_max":{
                "nodect":24,
                "walltime":"03:00:00"
            },
            "resources_min":{
                "nodect":10
            },
            "enabled":"True",
            "started":"True"
        },
        "bad-min":{
            "queue_type":"Execution",
            "max_queued":"[u:PBS_GENERIC=5]",
            "resources_max":{
                "nodect":8,
                "walltime":"02:00:00"
            },
            "resources_min":{
                "nodect":"ten"
            },
            "enabled":"True",
            "started":"True"
        },
        "inverted":{
            "queue_type":"Execution",
            "max_queued":"[u:PBS_GENERIC=5]",
            "resources_max":{
                "nodect":4,
                "walltime":"02:00:00"
            },
            "resources_min":{
                "nodect":16
            },
            "enabled":"True",
            "started":"True"
        }
    }
}
"""


def test_resources_min_nodect_is_the_queues_min_nodes(caplog):
    with caplog.at_level(logging.INFO):
        queues = PBSScheduler(user="alice").parse_discover_queues(result(stdout=QSTAT_Q_MIN_NODES))
    assert queues["prod"] == AllowedQueue(max_nodes=496, max_walltime=1440, max_queued_jobs=100, min_nodes=10)
    assert queues["debug"].min_nodes == 1  # a minimum wall time only
    assert queues["debug-scaling"].min_nodes == 1
    assert "small" not in queues  # route-only, as before
    # A value PBS never prints: the queue stays, without a minimum, and the log says which one.
    assert queues["bad-min"] == AllowedQueue(max_nodes=8, max_walltime=120, max_queued_jobs=5)
    assert any("bad-min" in r.getMessage() and "resources_min.nodect" in r.getMessage() for r in caplog.records)
    # No job fits a queue whose minimum exceeds its maximum: left out, logged.
    assert "inverted" not in queues
    assert any("inverted" in r.getMessage() for r in caplog.records)


def test_site_defaults_write_min_nodes_only_above_one():
    runner = ReplayRunner({"qstat": result(stdout=QSTAT_Q_MIN_NODES)})
    queues = PBSScheduler(runner, user="alice").site_defaults()["scheduler"]["allowed_queues"]
    assert queues["prod"] == {"max_nodes": 496, "max_walltime": 1440, "max_queued_jobs": 100, "min_nodes": 10}
    assert "min_nodes" not in queues["debug"] and "min_nodes" not in queues["debug-scaling"]
    assert queues["debug-scaling"] == {"max_nodes": 10, "max_walltime": 60, "max_queued_jobs": 1}
