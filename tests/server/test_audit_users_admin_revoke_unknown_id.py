"""``balsam server revoke --id N`` with an id no credential has (a typo) answered "Revoked 0
credential(s)", exit status 0, as if the credential were dealt with: the administrator who meant to
end a leaked credential was told nothing. It is an error now, naming the id; nothing is revoked."""

from __future__ import annotations

import pytest

from balsam.server.admin import Admin, AdminError
from balsam.server.migrate import upgrade


def test_revoking_an_unknown_credential_id_is_an_error(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    with Admin(url) as admin:
        admin.add_user("alice", "a long enough password", 12)
        admin.local_login("alice", 3600, 600, "k" * 40, "test login")
        (cred,) = admin.credentials("alice")
        with pytest.raises(AdminError, match=r"no credential 999999\b"):
            admin.revoke(ids=[cred.id, 999999])
        assert [c.revoked for c in admin.credentials("alice")] == [None]  # nothing revoked
        assert admin.revoke(ids=[cred.id]) == [cred.id]
        assert admin.revoke(ids=[cred.id]) == []  # already revoked: known, nothing left to do
