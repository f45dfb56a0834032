"""The windowed job count switches planner settings off for its one statement (jobs_logic
``_in_index_order``) and puts them back. It read them with ``current_setting(name)``, which raises
"unrecognized configuration parameter" for a setting the server lacks: ``jit`` on PostgreSQL < 11,
where every windowed count (the dashboard's, with filters) failed. A missing setting is left alone."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from starlette.datastructures import QueryParams as StarletteQueryParams

from server_testlib import create_site_and_app, logged_in_test_client

SECRET = "index-order-missing-setting-secret-0123456789-abcdef"
MISSING = "balsam_no_such_planner_setting"  # no '.': not a custom placeholder, unknown as jit is to PostgreSQL 10


def test_a_setting_the_server_lacks_is_skipped_and_the_others_are_restored(database_url, monkeypatch) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("planner settings: PostgreSQL only")
    import balsam.server.jobs_logic as logic
    from balsam.server.http import QueryParams

    monkeypatch.setattr(logic, "_INDEX_ORDER_OFF", ("enable_bitmapscan", "enable_seqscan", MISSING))
    with logged_in_test_client(database_url, SECRET) as (client, app):
        _site, app_id = create_site_and_app(client, "miss")
        made = client.post("/jobs/", json=[{"app_id": app_id, "workdir": f"w/{i}"} for i in range(6)])
        assert made.status_code == 201, made.text
        with app.state.engine.connect() as conn, conn.begin():
            with pytest.raises(sa.exc.DBAPIError):  # the server indeed lacks it
                conn.exec_driver_sql(f"SELECT current_setting('{MISSING}')")
        with app.state.engine.connect() as conn, conn.begin():
            query = QueryParams(StarletteQueryParams([("workdir__contains", "w/")]))  # the windowed count's
            counts, exact = logic.count_jobs_by_state(conn, 1, query, window=100)
            after = conn.exec_driver_sql("SELECT current_setting('enable_bitmapscan'), "
                                         "current_setting('enable_seqscan')").one()
    assert sum(counts.values()) == 6 and exact, counts
    assert tuple(after) == ("on", "on"), after
