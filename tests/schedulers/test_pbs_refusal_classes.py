"""Which qsub refusals the PBS driver takes as permanent: every answer the server gives (its hooks,
queues, limits) is a verdict whatever words it uses; only a qsub that got no answer is transient."""

from __future__ import annotations

import pytest

from balsam.scheduler import SchedulerError
from balsam_scheduler_pbs import PBSScheduler

from sched_helpers import recorded, result


def _refusal(said: str) -> SchedulerError:
    with pytest.raises(SchedulerError) as info:
        PBSScheduler(user="alice").parse_submit(result(stderr=said, returncode=2))
    return info.value


@pytest.mark.parametrize("said", [
    # A hook's advice to the user is no connection trouble: the same job gets the same answer.
    "qsub: Request rejected by server hook: Project bogus is not valid. Please try again with a valid project.\n",
    "qsub: Request rejected by server hook: eagle is temporarily unavailable for new jobs, not permitted\n",
    "qsub: Request rejected by server hook: pbs_server timed out reading the project database\n",
    "qsub: Job rejected by all possible destinations (check indirect queues). Try again later\n",
    recorded("pbs", "qsub_hook_reject.stderr.txt"),
    recorded("pbs", "qsub_unknown_queue.stderr.txt"),
    recorded("pbs", "qsub_exceeds_queue_resources.stderr.txt"),
])
def test_server_answers_are_permanent(said):
    assert _refusal(said).permanent


@pytest.mark.parametrize("said", [
    recorded("pbs", "qsub_no_server.stderr.txt"),
    "qsub: cannot connect to server polaris-pbs-01 (errno=15010)\n",
    "pbs_iff: cannot read reply from pbs_server\nqsub: End of File\n",
    "qsub: Connection refused\n",
])
def test_connection_failures_are_transient(said):
    assert not _refusal(said).permanent
