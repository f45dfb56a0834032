"""A site with a ``globus://`` location but no ``transfers.globus_endpoint_id``: the backend refused
each submission for good, so each batch's files failed a try per cycle and their jobs FAILED within
minutes (30 s and 60 s of backoff, 3 tries), for a settings omission, while a wrong id (Globus's 404
for the site's collection) makes the items wait. Now they wait too, with the line naming the key,
and no submission id is asked of Globus for a batch that cannot be sent.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace

import globus_sdk
import pytest
import responses
from globus_sdk.transport import RetryConfig

from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from balsam_transfer_globus.backend import GlobusTransfer
from globus_test_utils import REMOTE_EP, mocked_responses  # noqa: F401
from transfer_test_utils import one_stage_in_api

pytestmark = pytest.mark.usefixtures("mocked_responses")

T0 = dt.datetime(2032, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


def test_items_wait_for_the_site_collection_id_instead_of_failing_their_jobs(tmp_path: Path) -> None:
    site, api = one_stage_in_api(tmp_path)
    module = TransfersModule(SimpleNamespace(site_path=str(site), data_path=str(site / "data"), site_id=1),
                             TransfersOptions(transfer_locations={"aps": f"globus://{REMOTE_EP}"}), api)
    client = globus_sdk.TransferClient(authorizer=globus_sdk.AccessTokenAuthorizer("test-token"),
                                       retry_config=RetryConfig(max_retries=0))
    backend = GlobusTransfer({}, site_path=str(site), transfer_client=client)
    backend._entry_point_name = "globus"
    module.backends["globus"] = backend
    clock = [T0]
    module.now = lambda: clock[0]
    for cycle in range(4):  # past every backoff of the default 3 tries
        clock[0] = T0 + dt.timedelta(minutes=15 * cycle)
        module.run_cycle()
    item = api.items[1]
    assert item["state"] == "pending" and not item["transfer_info"].get("attempts")
    assert item["transfer_info"]["reason"] == ("globus: transfers.globus_endpoint_id (this site's Globus collection "
                                               "id) is not set in settings.yml: set it, then restart the agent")
    assert api.jobs[1]["state"] == "READY"
    assert not responses.calls  # nothing asked of Globus for it
