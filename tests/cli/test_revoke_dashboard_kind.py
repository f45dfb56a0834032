"""``balsam server revoke --kind`` offers every credential kind, the dashboard's browser sessions too."""

from __future__ import annotations

import os

PASSWORD = "a long enough password"


def test_revoke_kind_dashboard_revokes_only_the_dashboard_sessions(tmp_path, monkeypatch) -> None:
    import sqlalchemy as sa
    from click.testing import CliRunner

    from balsam.cli import main
    from balsam.server.auth import CREDENTIAL_KINDS, issue_credential
    from balsam.server.db import create_db_engine
    from balsam.server.tables import credentials, users

    for key in [k for k in os.environ if k.startswith("BALSAM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    database_url = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("BALSAM_DATABASE_URL", database_url)

    def run(*args: str, stdin: str = ""):
        return CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)

    assert run("server", "migrate").exit_code == 0
    assert run("server", "user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n").exit_code == 0
    engine = create_db_engine(database_url)
    try:
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
    finally:
        engine.dispose()
