"""A "still referenced" refusal names the row that is referenced (the parent), not the table that
refers to it: PostgreSQL's own foreign-key error sets its table field to the *referencing* table
(the 0007 triggers set the parent), so the answer said "The Job 5 is still referred to" of a site."""

from __future__ import annotations

from typing import Optional

import attrs
import sqlalchemy as sa

from balsam.server.errors import database_refusal, refusal_answer


@attrs.frozen
class _Diag:
    message_primary: str
    message_detail: str
    table_name: str
    constraint_name: str
    column_name: Optional[str] = None


class _ForeignKeyViolation(Exception):
    """What psycopg2 raises: the SQLSTATE and the error's fields (``diag``)."""

    pgcode = "23503"

    def __init__(self, diag: _Diag) -> None:
        super().__init__(diag.message_primary)
        self.diag = diag


def _refusal(table: str) -> sa.exc.IntegrityError:
    diag = _Diag('update or delete on table "sites" violates foreign key constraint "fk_x_site_id_sites" on table "jobs"',
                 'Key (id)=(5) is still referenced from table "jobs".', table, "fk_x_site_id_sites")
    return sa.exc.IntegrityError("DELETE FROM sites WHERE id = 5", {}, _ForeignKeyViolation(diag))


def test_a_still_referenced_row_is_named_by_its_own_table() -> None:
    # PostgreSQL's native error (table field: the referencing table) and the 0007 trigger's (the parent).
    for table_field in ("jobs", "sites"):
        refusal = database_refusal(_refusal(table_field))
        assert (refusal.kind, refusal.table, refusal.name, refusal.key) == ("referenced", "sites", "Site", "5")
        answer = refusal_answer(refusal)
        assert (answer.status_code, answer.detail) == (409, "The Site 5 is still referred to by other records: it cannot change")
