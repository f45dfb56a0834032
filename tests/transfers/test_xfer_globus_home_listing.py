"""The home directory of a collection, read from Globus's listing of ``/~/`` (``operation_ls``, the
file_list document's ``absolute_path``), answered through globus-sdk's registered responses.

Globus answers ``"absolute_path": null`` for ``/~/`` on some collections (a file_list captured from
a real collection: ``"path": "/~/"``, ``"absolute_path": None``). Nothing is guessed then (home
unknown), and the listing is asked again every HOME_RECHECK_SEC; each of those asks logged the same
warning again (12 an hour per collection). It is now logged once, the later ones at DEBUG; a
different reason on a later ask (a 403: a permission to grant) is a WARNING again, not DEBUG.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import responses

from balsam_transfer_globus.backend import HOME_RECHECK_SEC
from globus_test_utils import REMOTE_EP, TRANSFER, make_backend, mocked_responses  # noqa: F401

pytestmark = pytest.mark.usefixtures("mocked_responses")


def null_home_listing(collection: str) -> None:
    """A listing of ``/~/`` as a real collection answered it: ``absolute_path`` null."""
    responses.add(responses.GET, f"{TRANSFER}/operation/endpoint/{collection}/ls", json={
        "DATA_TYPE": "file_list", "endpoint": collection, "path": "/~/", "absolute_path": None,
        "rename_supported": True, "symlink_supported": False, "length": 0, "total": 0, "DATA": []})


def null_home_backend(tmp_path: Path) -> tuple[Any, Any, list[float]]:
    """A backend whose listing of ``/~/`` on REMOTE_EP answers ``absolute_path`` null, on a clock the
    test moves: (backend, its transfer client, the clock's one-element list of seconds)."""
    null_home_listing(REMOTE_EP)
    backend = make_backend(tmp_path)
    clock = [1000.0]
    backend.clock = lambda: clock[0]
    return backend, backend.client(), clock


def test_a_listing_without_absolute_path_leaves_the_home_unknown_and_warns_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend, client, clock = null_home_backend(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="balsam_transfer_globus"):
        assert backend._home(client, REMOTE_EP) is None
        assert backend._home(client, REMOTE_EP) is None  # remembered: no second call yet
        clock[0] += HOME_RECHECK_SEC + 1
        assert backend._home(client, REMOTE_EP) is None  # asked again
    asks = [c for c in responses.calls if c.request.url.split("?")[0].endswith(f"/endpoint/{REMOTE_EP}/ls")]
    assert len(asks) == 2
    said = [r for r in caplog.records if "cannot be told from its listing" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG]
    assert "absolute_path None" in said[0].getMessage()


def test_a_new_reason_after_a_null_listing_is_warned_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The first ls of /~/ answers absolute_path null (WARNING); HOME_RECHECK_SEC later it is refused
    (403 PermissionDenied): that was logged at DEBUG only, as a repeat. Now WARNING; its repeat DEBUG."""
    backend, client, clock = null_home_backend(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="balsam_transfer_globus"):
        assert backend._home(client, REMOTE_EP) is None
        responses.replace(responses.GET, f"{TRANSFER}/operation/endpoint/{REMOTE_EP}/ls", status=403,
                          json={"code": "PermissionDenied", "message": "No permission on /~/", "request_id": "r1",
                                "resource": f"/operation/endpoint/{REMOTE_EP}/ls"})
        for _ in range(2):
            clock[0] += HOME_RECHECK_SEC + 1
            assert backend._home(client, REMOTE_EP) is None
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "home directory" in r.getMessage()]
    assert [level for level, _ in said] == [logging.WARNING, logging.WARNING, logging.DEBUG]
    assert "absolute_path None" in said[0][1]
    assert "403" in said[1][1] and "PermissionDenied" in said[1][1]
