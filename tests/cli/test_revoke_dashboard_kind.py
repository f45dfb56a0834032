"""``balsam server revoke --kind`` offers every credential kind, the dashboard's browser sessions too."""

from __future__ import annotations

from server_cli_testlib import server_cli  # tests/server_cli_testlib.py


def test_revoke_kind_dashboard_revokes_only_the_dashboard_sessions(tmp_path, monkeypatch) -> None:
    import sqlalchemy as sa

    from balsam.server.auth import CREDENTIAL_KINDS, issue_credential
    from balsam.server.tables import credentials, users

    with server_cli(tmp_path, monkeypatch, "alice") as (run, engine):
        with engine.begin() as conn:
            alice = conn.execute(sa.select(users.c.id).where(users.c.username == "alice")).scalar_one()
            dashboard, _, _ = issue_credential(conn, alice, "dashboard", "dashboard login", 3600)
            login, _, _ = issue_credential(conn, alice, "login", "balsam login", 3600)

        revoked = run("server", "revoke", "--user", "alice", "--kind", "dashboard")
        assert revoked.exit_code == 0, revoked.output  # 2 (invalid choice) before
        assert f"Revoked 1 credential(s): {dashboard}" in revoked.output
        with engine.connect() as conn:
            rows = dict(conn.execute(sa.select(credentials.c.id, credentials.c.revoked)).all())
        assert rows[dashboard] and not rows[login]
        # Every kind the server issues can be named.
        for kind in CREDENTIAL_KINDS:
            assert run("server", "revoke", "--user", "alice", "--kind", kind).exit_code == 0, kind
