"""PostgreSQL ``COPY ... FROM STDIN`` of rows built in Python (the bulk job create).

Why COPY: an ``INSERT ... SELECT FROM jsonb_to_recordset(document)`` makes PostgreSQL parse one
JSON document of every row, call ``nextval`` per row and insert the rows one by one; ``COPY`` reads
tab-separated text and writes the rows in batches (``heap_multi_insert``; the ids are given, so no
volatile column default stops it). For 5,000 jobs and their created events that was about a third
of the database's time. ``COPY`` fires the same triggers as an ``INSERT`` (the row triggers of the
foreign keys, the statement triggers with their transition tables: migrations 0003, 0005, 0007),
so every guarantee of the tables holds as for any other statement.

Errors are raised as SQLAlchemy's exceptions (``IntegrityError``, ``OperationalError``...), as the
statements run through SQLAlchemy are, so that the server answers them the same way
(``balsam.server.db.dbapi_errors_as_sqlalchemy``, as for every raw cursor of the server).
"""

from __future__ import annotations

import datetime as dt
import io
from typing import Any, Callable, Iterable

import orjson
import sqlalchemy as sa

from .db import dbapi_errors_as_sqlalchemy
from .tables import UTCDateTime

#: What stands for NULL in COPY's text format.
NULL = "\\N"
#: COPY's text format escapes: a backslash, and the characters that separate fields and rows.
_TEXT_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def text_field(value: str) -> str:
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_TEXT_ESCAPES)
    return value


def json_field(value: Any) -> str:
    # orjson escapes every control character inside JSON strings: only backslashes need escaping.
    text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    return text.replace("\\", "\\\\") if "\\" in text else text


def _int_field(value: Any) -> str:
    return str(int(value))


def _float_field(value: Any) -> str:
    return repr(float(value))


def _bool_field(value: Any) -> str:
    return "t" if value else "f"


def _datetime_field(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.isoformat()


def field_writer(col_type: sa.types.TypeEngine) -> Callable[[Any], str]:
    """The function writing a (non-NULL) value of a column of this type as a COPY text field."""
    if isinstance(col_type, sa.JSON):
        return json_field
    if isinstance(col_type, UTCDateTime):
        return _datetime_field
    if isinstance(col_type, sa.Boolean):
        return _bool_field
    if isinstance(col_type, sa.Integer):
        return _int_field
    if isinstance(col_type, sa.Float):
        return _float_field
    return text_field


def column_fields(values: Iterable[Any], write: Callable[[Any], str], default: str) -> list[str]:
    """The COPY text of a column's values; ``default`` where a value is None. Empty JSON objects
    and lists (most jobs' data and parents) are written without a call."""
    if write is json_field:
        empty = _EMPTY_JSON
        return [default if v is None else empty[type(v)] if not v and type(v) in empty else json_field(v)
                for v in values]
    return [default if v is None else write(v) for v in values]


_EMPTY_JSON = {dict: "{}", list: "[]"}


def copy_body(columns: list[Iterable[str]]) -> str:
    """The COPY text of rows given column by column (each an iterable of field texts)."""
    return "".join([line + "\n" for line in map("\t".join, zip(*columns))])


def allocate_ids(cur: Any, table: str, n: int) -> list[int]:
    """``n`` new ids from the table's sequence, increasing (one statement; the rows are then
    written with their ids, so that rows of other tables referring to them go in the same way).
    The sequence is looked up once (``OFFSET 0`` keeps the lookup out of the per-row call)."""
    cur.execute("SELECT nextval(s) FROM (SELECT pg_get_serial_sequence(%s, 'id')::regclass AS s OFFSET 0) AS q, "
                "generate_series(1, %s)", (table, n))
    return sorted(row[0] for row in cur.fetchall())


def copy_rows(conn: sa.Connection, cur: Any, table: str, columns: list[str], body: str) -> None:
    """COPY the rows of ``body`` (see ``copy_body``) into these columns of ``table``."""
    statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
    with dbapi_errors_as_sqlalchemy(conn, cur, statement):
        cur.copy_expert(statement, io.StringIO(body))
