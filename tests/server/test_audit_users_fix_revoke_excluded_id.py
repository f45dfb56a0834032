"""``balsam server revoke --id N`` where credential N exists but ``--user`` or ``--kind`` leaves it
out (bob's credential with ``--user alice``, a refresh credential with ``--kind launcher``)
answered "Revoked 0 credential(s)", exit status 0: the administrator was told nothing of the
mismatch. It is an error naming why, as an unknown id is, nothing revoked. An id beyond the 64-bit
range (``--id 9223372036854775808``) is an unknown id too; on SQLite it was ``Error:
OverflowError: Python int too large to convert to SQLite INTEGER``."""

from __future__ import annotations

import sqlalchemy as sa

from server_cli_testlib import server_cli  # tests/server_cli_testlib.py


def test_an_id_that_user_or_kind_leaves_out_is_an_error(tmp_path, monkeypatch) -> None:
    from balsam.server.auth import issue_credential
    from balsam.server.tables import credentials, users

    with server_cli(tmp_path, monkeypatch, "alice", "bob") as (run, engine):
        with engine.begin() as conn:
            ids = dict(conn.execute(sa.select(users.c.username, users.c.id)).all())
            bobs, _, _ = issue_credential(conn, ids["bob"], "login", "bob's login", 3600)
            refresh, _, _ = issue_credential(conn, ids["alice"], "refresh", "alice's refresh", 3600)

        def revoked() -> set[int]:
            with engine.connect() as conn:
                return set(conn.execute(sa.select(credentials.c.id).where(credentials.c.revoked.is_not(None))).scalars())

        other_user = run("server", "revoke", "--user", "alice", "--id", str(bobs))
        assert other_user.exit_code == 1, other_user.output  # before: 0, "Revoked 0 credential(s)"
        assert f"Error: credential {bobs} is bob's, not alice's (see balsam server credentials --all)" in other_user.output
        other_kind = run("server", "revoke", "--id", str(refresh), "--kind", "launcher")
        assert other_kind.exit_code == 1, other_kind.output
        assert f"Error: credential {refresh} is of kind refresh, not launcher" in other_kind.output
        assert revoked() == set()  # nothing revoked, also not the credential that matched
        both = run("server", "revoke", "--user", "alice", "--id", str(refresh), "--id", str(bobs))
        assert both.exit_code == 1 and f"credential {bobs} is bob's" in both.output, both.output
        assert revoked() == set()

        too_big = run("server", "revoke", "--id", str(2**63))
        assert too_big.exit_code == 1, too_big.output
        # The line docs/security.md quotes; before: "Error: OverflowError: Python int too large ..."
        assert too_big.output.strip().splitlines()[-1] == f"Error: no credential {2**63} (see balsam server credentials --all)"

        matching = run("server", "revoke", "--user", "alice", "--id", str(refresh), "--kind", "refresh")
        assert matching.exit_code == 0 and f"Revoked 1 credential(s): {refresh}" in matching.output, matching.output
        assert revoked() == {refresh}
