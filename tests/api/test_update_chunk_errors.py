"""A bulk update refused in a later chunk raises the same kind of error, re-worded ("N of M records
were updated before this error"), keeping what the client set on it: an AuthenticationError's
``credential_refused`` (a launcher's status updater stops when it is set)."""

from __future__ import annotations

from typing import Any

import pytest

from balsam._api.manager import Manager
from balsam.client.rest import APIError, AuthenticationError


class Job:
    _path = "/jobs/"


class _Client:
    def __init__(self, error: APIError) -> None:
        self.error = error
        self.calls = 0

    def patch(self, path: str, json: Any) -> None:
        self.calls += 1
        if self.calls > 1:
            raise self.error


class _Manager(Manager):
    has_bulk_patch = True
    bulk_chunk_size = 2

    def __init__(self, client: _Client) -> None:
        super().__init__(Job)  # type: ignore[arg-type]
        self._fake = client

    @property
    def _client(self) -> Any:
        return self._fake


@pytest.mark.parametrize("refused", [True, False])
def test_a_later_chunks_authentication_error_keeps_credential_refused(refused: bool) -> None:
    error = AuthenticationError("PATCH", "/jobs/", 401, "credential revoked")
    if refused:
        error.credential_refused = True
    manager = _Manager(_Client(error))
    with pytest.raises(AuthenticationError) as info:
        manager._update_many([{"id": i, "state": "RESTART_READY"} for i in range(4)])
    assert info.value is not error and info.value.__cause__ is error
    assert "2 of 4 Job records were updated before this error" in str(info.value)
    assert info.value.credential_refused is refused
