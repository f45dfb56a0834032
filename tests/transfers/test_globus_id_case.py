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

Also (review of that change): which spellings are one id is decided by a strict check shared by the
settings check, the backend and ``balsam site globus-login`` (a mistyped id is refused, not read by
uuid.UUID as another collection's id), and this site's own collection id is used in Globus'
spelling too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import globus_sdk
import pytest
import responses
from click.testing import CliRunner
from globus_sdk.testing import get_response_set

from balsam.config import SettingsError, loads_settings
from balsam.states import TransferDirection
from balsam.transfer import TransferError, TransferFile, TransferLocation
from balsam_transfer_globus.backend import GlobusTransfer
from balsam_transfer_globus.hooks import _canonical, globus_login
from globus_test_utils import (SITE_EP, TASK_ID, TRANSFER, globus_module, globus_site, make_backend,  # noqa: F401
                               mocked_responses)
from test_transfer_module_refusals import FakeAPI
from transfer_test_utils import finish_as_a_launcher

LOWER = "abcdef01-2345-6789-abcd-ef0123456789"
OTHER = "abcdef01-2345-6789-abcd-ef0123456780"
LOCATIONS = {"lower": f"globus://{LOWER}", "upper": f"globus://{LOWER.upper()}"}
SECOND_TASK = "00000000-0000-0000-0000-00000000b0b2"


def _submissions() -> list[dict]:
    return [json.loads(c.request.body) for c in responses.calls if c.request.url.endswith("/v0.10/transfer")]


@pytest.mark.usefixtures("mocked_responses")
def test_live_stage_outs_to_one_path_of_a_collection_written_in_two_cases_take_turns(balsam_env,
                                                                                   tmp_path: Path) -> None:
    from balsam.api import ApplicationDefinition, Job
    from balsam.site.modules.transfers import SAME_FILE_WAIT

    responses.add_passthru(balsam_env.url)
    client, _site_path, site = globus_site(tmp_path, "/~/", locations=LOCATIONS)
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
    module = globus_module(tmp_path, site, client, "/~/", locations=LOCATIONS)
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


# -- A mistyped id is refused, not read as another collection's ------------------------------------------------
#
# uuid.UUID reads the hex digits with int(..., 16), which also takes a sign, "_" between digits and blanks
# around them: an id of 31 hex digits with one of those passed the settings check, and the Globus backend
# then sent, listed (login command) and compared it as the other, valid-looking id uuid.UUID made of it
# (a leading 0: "+bcdef01..." -> "0bcdef01-..."). Before 9701186 such an id was at least sent as typed.

TYPOS = ["abcdef01_2345678abcdef0123456789", "+bcdef0123456789abcdef0123456789",
         " bcdef0123456789abcdef0123456789"]
SPELLINGS = [LOWER, LOWER.upper(), LOWER.replace("-", ""), LOWER.upper().replace("-", ""), f"{{{LOWER}}}",
             f"urn:uuid:{LOWER}", f"URN:UUID:{LOWER.upper()}", f"urn:uuid:{{{LOWER}}}"]


@pytest.mark.parametrize("typo", TYPOS)
@pytest.mark.parametrize("key", ["transfer_locations", "globus_endpoint_id", "backend_options"])
def test_a_mistyped_collection_id_is_refused_when_settings_yml_is_read(key: str, typo: str) -> None:
    text, line, problem = {
        "transfer_locations": (f"transfers:\n  transfer_locations:\n    aps: 'globus://{typo}'\n", 3,
                               f"transfers.transfer_locations.aps: expected globus://<collection-id> with a "
                               f"collection UUID, got {typo!r}"),
        "globus_endpoint_id": (f"transfers:\n  globus_endpoint_id: '{typo}'\n", 2,
                               f"transfers.globus_endpoint_id: expected a Globus collection UUID "
                               f"(transfers.globus_endpoint_id or backend_options.globus.endpoint_id), got {typo!r}"),
        "backend_options": (f"transfers:\n  backend_options:\n    globus:\n      endpoint_id: '{typo}'\n", 4,
                            f"transfers.backend_options.globus.endpoint_id: expected a Globus collection UUID "
                            f"(transfers.globus_endpoint_id or backend_options.globus.endpoint_id), got {typo!r}"),
    }[key]
    with pytest.raises(SettingsError) as info:
        loads_settings(text)
    (error,) = info.value.errors
    assert error == f"settings.yml:{line} {problem}", error


@pytest.mark.parametrize("typo", TYPOS)
def test_a_mistyped_id_is_not_rewritten_into_another_collections(typo: str) -> None:
    location = TransferLocation.parse("t", f"globus://{typo}")
    assert location.netloc == typo
    assert GlobusTransfer.location_address(location) == typo  # as written, the check refuses it
    with pytest.raises(TransferError, match="with a collection UUID"):
        GlobusTransfer.check_location(location)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_each_form_of_a_uuid_is_taken_and_spelt_as_globus_does(spelling: str) -> None:
    loads_settings(f"transfers:\n  transfer_locations:\n    aps: 'globus://{spelling}'\n  globus_endpoint_id: '{spelling}'\n")
    location = TransferLocation.parse("t", f"globus://{spelling}")
    GlobusTransfer.check_location(location)
    assert GlobusTransfer.location_address(location) == LOWER


@pytest.mark.usefixtures("mocked_responses")
@pytest.mark.parametrize("typo", TYPOS)
@pytest.mark.parametrize("option", ["-e", "--client-id"])
def test_globus_login_refuses_a_mistyped_id_as_the_settings_check_does(tmp_path: Path, monkeypatch, option: str,
                                                                      typo: str) -> None:
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    monkeypatch.delenv("BALSAM_GLOBUS_CLIENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    args = ["--client-id", typo, "-e", LOWER] if option == "--client-id" else ["--client-id", OTHER, "-e", typo]
    result = CliRunner().invoke(globus_login, args, input="the-code\n")
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert f"{typo!r} is not " in line, line
    assert "auth.globus.org/v2/oauth2/authorize" not in result.output  # no login link was made of it
    # A settings.yml id (refused by the agent's check) is not rewritten either.
    assert _canonical(typo) == typo and _canonical(LOWER.upper()) == LOWER


def test_the_hook_module_still_imports_no_globus_sdk() -> None:
    # Every balsam process imports it (launchers too): the shared id check must not pull globus_sdk in.
    code = "import sys, balsam_transfer_globus.hooks; print('globus_sdk' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


# -- This site's collection written in capitals ------------------------------------------------------------------
#
# transfers.globus_endpoint_id was used as written: sent so, and compared as written with the ids Globus names
# in its errors (always lower case), so "Globus does not know this site's collection" (a settings error the
# jobs wait for) became "Globus refused the request", which fails every job of the batch.


@pytest.mark.usefixtures("mocked_responses")
def test_an_unknown_site_collection_written_in_capitals_is_still_a_settings_error(tmp_path: Path) -> None:
    responses.add(responses.POST, f"{TRANSFER}/transfer", status=404, content_type="application/json",
                  json={"code": "EndpointNotFound", "message": f"No such endpoint '{LOWER}'", "request_id": "r"})
    backend = make_backend(tmp_path, endpoint_id=LOWER.upper())
    location = TransferLocation.parse("aps", f"globus://{OTHER}")
    with pytest.raises(TransferError) as err:
        backend.submit(location, TransferDirection.stage_in, [TransferFile("/a", str(tmp_path / "a"))])
    assert str(err.value) == (f"Globus does not know this site's collection {LOWER} (HTTP 404 EndpointNotFound): "
                              "check transfers.globus_endpoint_id in settings.yml, then restart the agent")
    assert err.value.retryable  # the jobs wait for the settings to be fixed
    # Sent as Globus writes it; any other call's 404 naming it is classified the same way.
    assert json.loads(responses.calls[-1].request.body)["destination_endpoint"] == LOWER
    responses.add(responses.GET, f"{TRANSFER}/endpoint/{LOWER}", status=404, content_type="application/json",
                  json={"code": "EndpointNotFound", "message": f"No such endpoint '{LOWER}'", "request_id": "r"})
    with pytest.raises(globus_sdk.TransferAPIError) as refused:
        backend.client().get_endpoint(LOWER)
    assert str(backend._error(refused.value)).startswith(f"Globus does not know this site's collection {LOWER} ")
