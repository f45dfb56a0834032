"""A PATCH the status updater sent before close() (the API already gone) does not hold close()
past its give-up: the launcher's SIGTERM exit took 37 s when its RUN_TIMEOUT update went out
between the stop and the updater's close (test_launcher_reliability.py::
test_sigterm_with_the_api_gone_exits_in_seconds_and_spools_the_updates, 1 run in 2-3)."""
import logging
import socket
from pathlib import Path

import pytest
from failure_proxy import wait_until  # tests/failure_proxy.py

from balsam.client.rest import RESTClient
from balsam.client.status_updater import BulkStatusUpdater


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_close_gives_up_on_a_patch_sent_before_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A real client with its default retry budget (10 tries, backoff to 30 s), as a launcher's.
    client = RESTClient(f"http://127.0.0.1:{closed_port()}", token="t")
    updater = BulkStatusUpdater(client, close_timeout=0.5, spool_dir=tmp_path / "spool")
    updater.put_update({"id": 1, "state": "RUN_TIMEOUT"})
    # The call went out (and failed) before close(): the case of the slow exit.
    assert wait_until(lambda: updater.calls >= 1, 30)
    with caplog.at_level(logging.INFO, logger="balsam.client.status_updater"):
        updater.close()
    # Given up by the sender's own clock (close_timeout), not by close()'s join running out
    # while the call slept in the client's backoff.
    assert not any("did not finish within" in r.getMessage() for r in caplog.records), caplog.text
    assert updater.gave_up and updater.spooled == 1
    assert len(list((tmp_path / "spool").glob("*.jsonl"))) == 1
