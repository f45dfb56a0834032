"""Engine creation: SQLite (WAL, busy timeout, serialized writers) or PostgreSQL (pooled)."""

from __future__ import annotations

import configparser
import datetime as dt
import functools
import os
import weakref
from contextlib import contextmanager
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql


SQLITE_BUSY_TIMEOUT_MS = 60_000


def _json_dumps(value: object) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def normalize_database_url(url: str) -> str:
    """``postgresql://`` means psycopg2 (SQLAlchemy 2.1 would pick psycopg 3, which we do not ship)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


#: The URL each engine was created from, as its user wrote it: ``engine.url`` names the driver
#: balsam picked (``postgresql+psycopg2://``), which is not what the user gave or will look for.
_GIVEN_URLS: "weakref.WeakKeyDictionary[sa.Engine, str]" = weakref.WeakKeyDictionary()


def display_url(engine: sa.Engine) -> str:
    """The engine's database URL for messages: as the user gave it, the password masked."""
    given = _GIVEN_URLS.get(engine)
    url = sa.engine.make_url(given) if given is not None else engine.url
    return url.render_as_string(hide_password=True)


def create_db_engine(url: str, *, pool_size: int = 10, max_overflow: int = 20) -> sa.Engine:
    given = url
    url = normalize_database_url(url)
    if url.startswith("sqlite"):
        engine = _sqlite_engine(url)
        _GIVEN_URLS[engine] = given
        return engine
    engine = sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        pool_recycle=3600,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
        connect_args={"options": pg_options(url), **pg_connect_defaults(url)} if url.startswith("postgresql") else {},
    )
    _GIVEN_URLS[engine] = given
    return engine


#: libpq connection parameters every PostgreSQL connection of the server gets unless its URL sets
#: them (``?connect_timeout=30``). Without them a database host that vanished without closing its
#: connections (power loss, a network partition, a fail-over that moved its address) held each
#: request's thread: a connection attempt for ~130 s (the kernel's SYN retries) and a pooled
#: connection's pre-ping or query for ~15 min (TCP retransmissions), so every worker thread hung and
#: nothing was answered, not even 503, until then. With them such a connection fails within about a
#: minute (``tcp_user_timeout``: data unacknowledged; keepalives: an idle wait for a long query's
#: result), a new one within ``connect_timeout``; the request is answered 503 with Retry-After and
#: the next one connects afresh. A query that runs long on a live database is not cut: its server
#: acknowledges the packets and answers the keepalives, and a wait for its result (or for a lock)
#: leaves nothing unsent. What ``tcp_user_timeout`` does cut on a live database is a backend that
#: stops reading for longer while the server still sends (a closed TCP window: a bare COPY whose
#: row waits on another transaction's lock was cut at the timeout). The server's one streaming
#: statement, the bulk create's COPY, never waits so: its rows' ids come from the sequence and its
#: foreign keys are checked at its end (statement triggers, migration 0007), after it has read
#: every row (tests/server/test_create_copy_lock_wait.py). A new statement that streams rows into
#: a table with unique keys given by the client, or with row triggers that lock, would be cut
#: after ``tcp_user_timeout`` of such a wait.
PG_CONNECT_DEFAULTS: "dict[str, int]" = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # milliseconds
}


def pg_connect_defaults(url: "str | sa.engine.URL") -> "dict[str, int]":
    """:data:`PG_CONNECT_DEFAULTS` less the parameters libpq takes from elsewhere: the URL's query,
    the service it names (``?service=`` or ``$PGSERVICE``, in the service file) or libpq's
    environment (``$PGCONNECT_TIMEOUT``). Parameters passed to the connect override all of those
    (SQLAlchemy's ``connect_args`` override the URL's query too): given anyway, a service's or
    the environment's ``connect_timeout=30`` was silently replaced by 10 s."""
    given = _libpq_given(url)
    return {name: value for name, value in PG_CONNECT_DEFAULTS.items()
            if name not in given and (name != "tcp_user_timeout" or _libpq_version() >= 120000)}


#: What every server connection sets in the session (``options``): timestamps are read in UTC.
_SERVER_OPTIONS = "-c timezone=utc"


def pg_options(url: "str | sa.engine.URL") -> str:
    """The ``options`` of the server's connections: the ones libpq would take (the URL's
    ``?options=``, its service's, ``$PGOPTIONS``) followed by :data:`_SERVER_OPTIONS`. Passed
    alone, ours replaced the user's (a ``statement_timeout`` given as ``?options=-c
    statement_timeout=...`` was silently not set)."""
    theirs = _libpq_given(url).get("options", "").strip()
    return f"{theirs} {_SERVER_OPTIONS}" if theirs else _SERVER_OPTIONS


def _libpq_given(url: "str | sa.engine.URL") -> "dict[str, str]":
    """The connection parameters libpq takes for ``url`` from elsewhere than its defaults, as
    libpq ranks them: the URL's query, then its service's section, then the environment (only
    the variables of the parameters we set: $PGCONNECT_TIMEOUT, $PGOPTIONS)."""
    query = {name: value if isinstance(value, str) else value[-1]
             for name, value in sa.engine.make_url(url).query.items()}
    given = dict(query)
    service = query.get("service") or os.environ.get("PGSERVICE")
    if service:
        for name, value in _service_params(service).items():
            given.setdefault(name, value)
    for name, variable in (("connect_timeout", "PGCONNECT_TIMEOUT"), ("options", "PGOPTIONS")):
        if os.environ.get(variable):
            given.setdefault(name, os.environ[variable])
    return given


def _service_params(service: str) -> "dict[str, str]":
    """The parameters of ``service`` as libpq reads them: from the user's service file
    (``$PGSERVICEFILE``, else ``~/.pg_service.conf``), else the system's (``$PGSYSCONFDIR/
    pg_service.conf``; without ``$PGSYSCONFDIR``, the directory libpq was built with is not
    known here: a service defined only there gets our defaults). Empty if none defines it."""
    files = [Path(os.environ.get("PGSERVICEFILE") or Path.home() / ".pg_service.conf")]
    if os.environ.get("PGSYSCONFDIR"):
        files.append(Path(os.environ["PGSYSCONFDIR"]) / "pg_service.conf")
    for path in files:
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read(path, encoding="utf-8")
        except (OSError, configparser.Error, UnicodeDecodeError):
            continue  # libpq refuses the connection itself, with its own words
        if parser.has_section(service):
            return {name.strip(): value.strip() for name, value in parser.items(service)}
    return {}


@functools.lru_cache(maxsize=1)
def _libpq_version() -> int:
    # A psycopg2 built against a libpq older than 12 refuses tcp_user_timeout ("invalid connection
    # option"): it gets the keepalives and the connect timeout only.
    try:
        from psycopg2.extensions import libpq_version
    except ImportError:  # pragma: no cover - SQLite-only installations never connect to PostgreSQL
        return 0
    return libpq_version()


def _sqlite_engine(url: str) -> sa.Engine:
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        pool_size=16,
        max_overflow=16,
        poolclass=sa.pool.QueuePool,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        # Take over transaction control so that writers can BEGIN IMMEDIATE (pysqlite's
        # implicit BEGIN is deferred, which lets two writers deadlock on lock upgrade).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        mode = "IMMEDIATE" if conn.get_execution_options().get("balsam_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


@contextmanager
def write_tx(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A write transaction: serialized on SQLite (BEGIN IMMEDIATE), plain on PostgreSQL."""
    with engine.connect().execution_options(balsam_write=True) as conn:
        with conn.begin():
            yield conn


@contextmanager
def read_tx(engine: sa.Engine) -> Iterator[sa.Connection]:
    with engine.connect() as conn:
        with conn.begin():
            yield conn


@contextmanager
def raw_cursor(conn: sa.Connection) -> Iterator[Any]:
    """A cursor of the DBAPI connection under ``conn``, for what SQLAlchemy cannot send as fast
    (COPY, one JSON document per statement, executemany without its per-row work); its errors are
    raised as SQLAlchemy's (:func:`dbapi_errors_as_sqlalchemy`). Every raw cursor of the server's
    requests is taken here."""
    with dbapi_errors_as_sqlalchemy(conn):
        cur = conn.connection.dbapi_connection.cursor()
    with dbapi_errors_as_sqlalchemy(conn, cur):
        try:
            yield cur
        finally:
            cur.close()


@contextmanager
def dbapi_errors_as_sqlalchemy(conn: sa.Connection, cur: Any = None, statement: "str | None" = None) -> Iterator[None]:
    """Raise the DBAPI errors of statements sent past SQLAlchemy on ``conn`` (with cursor ``cur``)
    as SQLAlchemy raises those of its own: ``OperationalError``, ``IntegrityError``... with
    ``connection_invalidated`` set for a lost connection, which is then invalidated, as SQLAlchemy
    does (a dead connection must not go back to the pool).

    Why: the app answers database errors by their SQLAlchemy classes (503 + Retry-After for an
    outage, a deadlock or SQLite's "database is locked"; 409 for a conflict); a DBAPI error raised
    as it is reached none of those handlers and was answered 500 "Internal server error"."""
    dbapi_error = conn.dialect.loaded_dbapi.Error
    try:
        yield
    except dbapi_error as exc:
        invalidated = conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, cur)
        if statement is None:
            sent = getattr(cur, "query", None)  # psycopg2: the statement that failed, as sent
            statement = sent.decode(errors="replace") if isinstance(sent, bytes) else sent
        error = sa.exc.DBAPIError.instance(statement, None, exc, dbapi_error, connection_invalidated=invalidated,
                                           dialect=conn.dialect)
        if invalidated and not conn.invalidated:
            conn.invalidate(error)
        raise error from exc


# ---------------------------------------------------------------------------------------------
# Bulk inserts. PostgreSQL: the whole batch travels as one JSON document that the server expands
# with jsonb_to_recordset (serialized by orjson in C, parsed by PostgreSQL in C: no per-value
# Python work). SQLite: executemany (in-process, already fast).
# ---------------------------------------------------------------------------------------------

def pg_record_type(col_type: sa.types.TypeEngine) -> str:
    from .tables import UTCDateTime

    if isinstance(col_type, sa.JSON):
        return "jsonb"
    if isinstance(col_type, UTCDateTime):
        return "timestamptz"
    if isinstance(col_type, sa.Boolean):
        return "boolean"
    if isinstance(col_type, sa.Integer):
        return "bigint"
    if isinstance(col_type, sa.Float):
        return "double precision"
    return "text"


def where_eq(stmt: sa.Select, column: sa.ColumnElement, value: Any) -> sa.Select:
    """``stmt`` limited to rows whose ``column`` equals ``value``; unchanged when ``value`` is None (no filter)."""
    return stmt if value is None else stmt.where(column == value)


def where_gt(stmt: sa.Select, column: sa.ColumnElement, value: Any) -> sa.Select:
    """``stmt`` limited to rows whose ``column`` is greater than ``value``; unchanged when ``value`` is None
    (no filter). On a primary key (``id__gt``, keyset paging) both databases start an id-ordered page
    at the bound in the key's index, whatever the page's depth (an offset walks every row before it)."""
    return stmt if value is None else stmt.where(column > value)


def where_in(stmt: sa.Select, column: sa.ColumnElement, values: "list[Any] | None") -> sa.Select:
    """``stmt`` limited to rows whose ``column`` is one of ``values``; unchanged when ``values`` is None (no filter)."""
    return stmt if values is None else stmt.where(column.in_(values))


def id_in(column: sa.ColumnElement, ids: "list[int]", dialect: str) -> sa.ColumnElement[bool]:
    """``column IN ids`` with the ids sent as one parameter: an array on PostgreSQL, a JSON array
    read by ``json_each`` on SQLite. SQLAlchemy's ``in_(list)`` coerces each value into its own
    bound parameter and re-renders the list at every execution; on the bulk update path (100-1,000
    ids per call, several lists per request) that cost more server time per job than the SQL itself."""
    return _in_ids_param(column, sa.bindparam(None, ids_param(ids, dialect), type_=_ids_type(dialect), unique=True), dialect)


def ids_in_param(column: sa.ColumnElement, dialect: str) -> sa.ColumnElement[bool]:
    """:func:`id_in` with the ids in the parameter ``b_ids`` (its value: :func:`ids_param`), for a
    statement built once and executed with parameters."""
    return _in_ids_param(column, sa.bindparam("b_ids", type_=_ids_type(dialect)), dialect)


def ids_param(ids: "list[int]", dialect: str) -> Any:
    """The value of an ids parameter of :func:`id_in` / :func:`ids_in_param`."""
    return list(ids) if dialect == "postgresql" else orjson.dumps(list(ids)).decode()


def _ids_type(dialect: str) -> sa.types.TypeEngine:
    # bigint[]: an id from a path may exceed the 32-bit columns (no such row, rather than an error).
    return postgresql.ARRAY(sa.BigInteger) if dialect == "postgresql" else sa.String()


def _in_ids_param(column: sa.ColumnElement, param: sa.BindParameter, dialect: str) -> sa.ColumnElement[bool]:
    if dialect == "postgresql":
        return column == sa.any_(param)
    return column.in_(sa.select(sa.column("value")).select_from(sa.func.json_each(param)))


def count_and_page(conn: sa.Connection, stmt: sa.Select, order_by: list[Any], limit: int, offset: int) -> tuple[int, list[sa.Row]]:
    """Total rows ``stmt`` matches, and one page of them in ``order_by`` order (list endpoints).

    The count is exact, but counted only when the page cannot tell it: the page is read with one
    row more, and a page that ends the listing (that row absent; not empty past its start) gives
    the total as ``offset + its rows``. A full count reads every match (3*10^6 events: 2 s), and
    most listings (a job's events, a site's sessions, a client's last page) end on their first or
    current page. Counting only the first page, or up to a cap, was rejected: Balsam 0.7's client
    plans all its pages from the count of its first request (at the slice's offset, not always 0)
    and stops at that count, and ours takes the count of its last page as the query's ``count()``."""
    if limit == 0:
        return conn.execute(sa.select(sa.func.count()).select_from(stmt.subquery())).scalar_one(), []
    rows = conn.execute(stmt.order_by(*order_by).limit(limit + 1).offset(offset)).all()
    if len(rows) <= limit and (rows or offset == 0):
        return offset + len(rows), rows
    count = conn.execute(sa.select(sa.func.count()).select_from(stmt.subquery())).scalar_one()
    return count, rows[:limit]


def update_rows_by_id(conn: sa.Connection, table: sa.Table, values_by_id: dict[int, dict[str, Any]]) -> None:
    """Set different values on many rows: one UPDATE per distinct set of column names.

    PostgreSQL: the rows travel as one JSON document joined with ``UPDATE ... FROM
    jsonb_to_recordset`` (as :func:`bulk_insert` inserts). An executemany UPDATE would be one
    statement and one round trip per row there: psycopg2's ``executemany`` loops over its rows, and
    SQLAlchemy batches only INSERTs (5,000 jobs, each with its own ``data`` or return value, took
    ~0.4 s of database round trips). SQLite: executemany (in-process)."""
    groups: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]] = {}
    for row_id, values in values_by_id.items():
        if values:
            groups.setdefault(tuple(sorted(values)), []).append((row_id, values))
    for names, rows in groups.items():
        if conn.dialect.name == "postgresql":
            _pg_update_from_json(conn, table, names, rows)
            continue
        stmt = (
            sa.update(table)
            .where(table.c.id == sa.bindparam("b_id"))
            .values({name: sa.bindparam(f"v_{name}", type_=table.c[name].type) for name in names})
        )
        conn.execute(stmt, [{"b_id": row_id, **{f"v_{k}": v for k, v in values.items()}} for row_id, values in rows])


def _pg_update_from_json(conn: sa.Connection, table: sa.Table, names: tuple[str, ...],
                         rows: list[tuple[int, dict[str, Any]]]) -> None:
    # Each value goes through its column's own bind processor first, so that it is stored exactly
    # as SQLAlchemy stores it: a JSON column's value becomes its JSON text (Python None -> 'null',
    # as SQLAlchemy's JSON type stores it; jsonb_to_recordset would read a JSON null in a jsonb
    # field as SQL NULL), cast back to the column's type in the SET (json for jobs.data: a cast of
    # the text through jsonb would sort its keys); a datetime becomes an aware UTC one.
    processors = [table.c[name].type.dialect_impl(conn.dialect).bind_processor(conn.dialect) for name in names]
    is_json = [isinstance(table.c[name].type, sa.JSON) for name in names]
    record = ", ".join(['"id" bigint', *(f'"{name}" {"text" if json else pg_record_type(table.c[name].type)}'
                                        for name, json in zip(names, is_json))])
    casts = ["::jsonb" if isinstance(table.c[name].type.dialect_impl(conn.dialect), postgresql.JSONB) else "::json"
             for name in names]
    assignments = ", ".join(f'"{name}" = x."{name}"' + (cast if json else "") for name, json, cast in zip(names, is_json, casts))
    converters = list(zip(names, processors, is_json))
    payload = []
    for row_id, values in rows:
        record_values: dict[str, Any] = {"id": row_id}
        for name, proc, json in converters:
            value = values[name]
            record_values[name] = value if proc is None or (value is None and not json) else proc(value)
        payload.append(record_values)
    with raw_cursor(conn) as cur:
        cur.execute(
            f'UPDATE "{table.name}" SET {assignments} FROM jsonb_to_recordset(%s::jsonb) AS x({record}) '
            f'WHERE "{table.name}".id = x.id',
            (orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS).decode(),),
        )


_UTC = dt.timezone.utc


def _sqlite_utc_text(processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A UTCDateTime column's SQLite bind processor for the common case, a ``datetime``: its UTC
    time as SQLAlchemy's SQLite DATETIME stores it (``YYYY-MM-DD HH:MM:SS.ffffff``, naive), in one
    C call instead of UTCDateTime.process_bind_param and a ``%`` format of seven fields (an event
    row's timestamp cost more than the rest of its row). Anything else goes to ``processor``."""
    def convert(value: Any) -> Any:
        if type(value) is not dt.datetime:
            return processor(value)
        if value.tzinfo is _UTC:
            return value.isoformat(" ", "microseconds")[:-6]  # without its "+00:00"
        if value.tzinfo is not None:
            value = value.astimezone(_UTC).replace(tzinfo=None)
        return value.isoformat(" ", "microseconds")  # naive: UTC already (process_bind_param)
    return convert


def _json_text(processor: Callable[[Any], Any], serializer: Callable[[Any], str]) -> Callable[[Any], Any]:
    """A JSON column's SQLite bind processor for a dict (every ``data`` of an event row): the
    engine's serializer, which the processor calls for it; anything else goes to ``processor``."""
    def convert(value: Any) -> Any:
        return serializer(value) if type(value) is dict else processor(value)
    return convert


_PROBE_TIMES = (
    dt.datetime(2026, 12, 6, 12, 0, 0, 0, tzinfo=_UTC), dt.datetime(1, 1, 1, 0, 0, 0, 1),
    dt.datetime(999, 3, 4, 5, 6, 7, 123456, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
    dt.datetime(2026, 3, 29, 1, 30, 0, 999999, tzinfo=dt.timezone(-dt.timedelta(hours=7))),
)
_PROBE_JSON = ({}, {"a": 1, "b": [1.5, None, "x"]}, {1: {"z": True}}, {"message": "caf\u00e9\n\"q\""})


@functools.lru_cache(maxsize=64)
def _sqlite_insert_plan(table: sa.Table, names: tuple[str, ...],
                        dialect: sa.Dialect) -> tuple[str, list[tuple[int, Callable[[Any], Any]]]]:
    """The INSERT statement of ``names`` into ``table`` and the (position, converter) of each column
    that has a bind processor, built once per table, columns and engine. A fast converter
    replaces the processor only where it gives the same text on probe values (a SQLAlchemy
    whose storage format differs keeps its own processor)."""
    from .tables import UTCDateTime

    converters: list[tuple[int, Callable[[Any], Any]]] = []
    serializer = getattr(dialect, "_json_serializer", None)
    for position, name in enumerate(names):
        col_type = table.c[name].type
        processor = col_type.dialect_impl(dialect).bind_processor(dialect)
        if processor is None:
            continue
        convert, probes = processor, ()
        if isinstance(col_type, UTCDateTime):
            convert, probes = _sqlite_utc_text(processor), _PROBE_TIMES
        elif isinstance(col_type, sa.JSON) and serializer is not None:
            convert, probes = _json_text(processor, serializer), _PROBE_JSON
        if any(convert(value) != processor(value) for value in probes):
            convert = processor
        converters.append((position, convert))
    columns = ", ".join(f'"{name}"' for name in names)
    return f'INSERT INTO "{table.name}" ({columns}) VALUES ({", ".join("?" * len(names))})', converters


def bulk_insert(conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]], *, return_ids: bool = False) -> list[int]:
    """Insert ``rows`` (same keys each) in one statement; returns the new ids in row order if asked."""
    if not rows:
        return []
    if conn.dialect.name != "postgresql":
        if return_ids:
            result = conn.execute(sa.insert(table).returning(table.c.id, sort_by_parameter_order=True), rows)
            return [r[0] for r in result]
        # The DBAPI's executemany with the values converted as the columns' own bind processors
        # convert them (stored exactly as SQLAlchemy stores them): SQLAlchemy's per-row parameter
        # handling was most of the cost of the event rows every bulk state update writes.
        names = tuple(rows[0])
        statement, converters = _sqlite_insert_plan(table, names, conn.dialect)
        values_of = itemgetter(*names)
        rows_values = [[values_of(row)] for row in rows] if len(names) == 1 else [list(values_of(row)) for row in rows]
        for position, convert in converters:
            for values in rows_values:
                value = values[position]
                if value is not None:
                    values[position] = convert(value)
        conn.exec_driver_sql(statement, [tuple(values) for values in rows_values])  # SQLAlchemy takes tuples
        return []
    names = list(rows[0])
    ids: list[int] = []
    if return_ids:
        # Ids are allocated first so that they map to the rows without relying on RETURNING order.
        ids = list(conn.execute(
            sa.text("SELECT nextval(pg_get_serial_sequence(:table, 'id')) FROM generate_series(1, :n)"),
            {"table": table.name, "n": len(rows)},
        ).scalars())
        names = ["id", *names]
        rows = [{"id": new_id, **row} for new_id, row in zip(ids, rows)]
    record = ", ".join(f'"{name}" {pg_record_type(table.c[name].type)}' for name in names)
    column_list = ", ".join(f'"{name}"' for name in names)
    payload = orjson.dumps(rows, option=orjson.OPT_NON_STR_KEYS).decode()
    with raw_cursor(conn) as cur:
        cur.execute(
            f"INSERT INTO {table.name} ({column_list}) SELECT {column_list} FROM jsonb_to_recordset(%s::jsonb) AS x({record})",
            (payload,),
        )
    return ids
