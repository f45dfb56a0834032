"""A Globus collection id written in capitals in one ``transfer_locations`` alias and in lower case in
another names one collection: two jobs staging out to one path of it write one file, so they take
turns (balsam.site.modules.transfers, SAME_FILE_WAIT).

Before: the agent compared locations' addresses as written, so ``globus://ABCDEF01-...`` and
``globus://abcdef01-...`` were two places and both items went at once (Globus then named the
destination of a failed file, which both wrote: a try of both failed). Core knows no Globus: it asks
the backend class for the address (``TransferBackend.location_address``), which the Globus plugin
spells as Globus does.

Real components: the ``transfers`` module on the live API (SQLite), its Globus backend on
globus-sdk's test client and registered responses (nothing reaches Globus); the address check also
through the installed Globus plugin, with no backend built (no credentials).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import globus_sdk
import pytest
import responses
from globus_sdk.testing import get_response_set

from globus_test_utils import SITE_EP, TASK_ID, TRANSFER, make_backend, mocked_responses  # noqa: F401
from test_transfer_module_refusals import FakeAPI
from transfer_test_utils import finish_as_a_launcher

LOWER = "abcdef01-2345-6789-abcd-ef0123456789"
OTHER = "abcdef01-2345-6789-abcd-ef0123456780"
LOCATIONS = {"lower": f"globus://{LOWER}", "upper": f"globus://{LOWER.upper()}"}
SECOND_TASK = "00000000-0000-0000-0000-00000000b0b2"


def _module(site: Any, client: Any, tmp_path: Path) -> Any:
    from balsam.site.modules.transfers import TransfersModule, TransfersOptions

    options = TransfersOptions(transfer_locations=LOCATIONS, globus_endpoint_id=SITE_EP,
                               globus_endpoint_site_path="/~/", max_attempts=1)
    return TransfersModule(site, options, client)


def _site(tmp_path: Path) -> tuple[Any, Any]:
    from balsam._api.model import reset_default_client
    from balsam.client import load_client
    from balsam.config import SiteConfig
    from balsam.site.site_ops import init_site

    reset_default_client()
    client = load_client()
    site_path = tmp_path / "gsite"
    init_site(site_path, "gsite", "default", client, settings_overrides={"transfers": {
        "transfer_locations": LOCATIONS, "globus_endpoint_id": SITE_EP, "globus_endpoint_site_path": "/~/"}})
    return client, SiteConfig(site_path)


def _submissions() -> list[dict]:
    return [json.loads(c.request.body) for c in responses.calls if c.request.url.endswith("/v0.10/transfer")]


@pytest.mark.usefixtures("mocked_responses")
def test_live_stage_outs_to_one_path_of_a_collection_written_in_two_cases_take_turns(balsam_env,
                                                                                   tmp_path: Path) -> None:
    from balsam.api import ApplicationDefinition, Job
    from balsam.site.modules.transfers import SAME_FILE_WAIT

    responses.add_passthru(balsam_env.url)
    client, site = _site(tmp_path)
    site_id = site.site_id

    class Publish(ApplicationDefinition):
        site = site_id
        command_template = "true"
        transfers = {"res": {"required": True, "direction": "out", "local_path": "out.dat"}}

    Publish.sync()
    jobs = [Job(f"pub/{alias}", Publish, transfers={"res": f"{alias}:/proj/latest.dat"}) for alias in LOCATIONS]
    for job in jobs:
        job.save()
        (Path(site.data_path) / job.workdir).mkdir(parents=True, exist_ok=True)
        (Path(site.data_path) / job.workdir / "out.dat").write_text(str(job.workdir))
        finish_as_a_launcher(client, site_id, job.id)
    module = _module(site, client, tmp_path)
    module.backends["globus"] = make_backend(tmp_path, endpoint_site_path="/~/")
    module.backends["globus"].site_path = str(site.site_path)
    body = get_response_set(globus_sdk.TransferClient.submit_transfer).lookup("default").json
    for task_id in (TASK_ID, SECOND_TASK):
        responses.add(responses.POST, f"{TRANSFER}/transfer", json={**body, "task_id": task_id})
    try:
        module.run_cycle()
        items = [client.get("/transfers/", params={"job_id": job.id})["results"][0] for job in jobs]
        # One task for the file; the other alias's item waits for it, no try used.
        assert len(_submissions()) == 1, [s["DATA"] for s in _submissions()]
        assert [item["state"] for item in items] == ["active", "pending"]
        assert SAME_FILE_WAIT in items[1]["transfer_info"]["reason"]
        assert not items[1]["transfer_info"].get("attempts")
        # Sent to the collection as Globus writes it, whichever alias.
        assert _submissions()[0]["destination_endpoint"] == LOWER
    finally:
        module.close()


def test_the_installed_globus_backend_spells_the_address_with_no_backend_built(tmp_path: Path) -> None:
    from balsam.site.modules.transfers import TransfersModule, TransfersOptions

    # The module as the agent builds it; no Globus backend is built (no tokens): the plugin's class answers.
    site = SimpleNamespace(site_path=str(tmp_path / "site"), data_path=str(tmp_path / "site" / "data"), site_id=1)
    module = TransfersModule(site, TransfersOptions(transfer_locations={**LOCATIONS, "other": f"globus://{OTHER}"},
                                                    globus_endpoint_id=SITE_EP), FakeAPI([], []))
    keys = {module._file_key("out", alias, "/proj//latest.dat", False) for alias in LOCATIONS}
    assert keys == {("out", f"globus://{LOWER}", "/proj/latest.dat")}, keys
    assert not module.backends  # asked of the class
    # Another collection stays another place.
    assert module._file_key("out", "other", "/proj/latest.dat", False) not in keys
