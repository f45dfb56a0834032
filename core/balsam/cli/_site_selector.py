"""``--site`` selection shared by ``app``, ``job`` and ``queue`` commands (Balsam 0.7 rules).

- no ``--site``: inside a site directory (or with ``$BALSAM_SITE_PATH``) -> that site only;
  elsewhere -> the *active* sites (record refreshed within the last 2 minutes: by the agent or by
  ``site init/sync/mv/rename``);
- ``--site=all`` -> every site; ``--site=active`` -> active sites; ``--site=this`` -> the current site;
- otherwise a comma-separated list of site ids, site names and/or path fragments (a word that is
  the name of one of your sites selects that site; otherwise it matches every site whose path
  contains it).

``queue submit`` needs exactly one site: no selector -> the current site; digits -> that id;
a site name -> that site; else the one site whose path contains the fragment.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import logging
import math
import operator
import os
import sys
import unicodedata
from typing import Any, Iterable, Optional

import click
import yaml

ACTIVE_WINDOW = dt.timedelta(minutes=2)
#: The largest site id the API can hold (its ``sites.id`` column is a 32-bit integer).
MAX_SITE_ID = 2**31 - 1

SITE_OPTION_HELP = ("Sites: all, active, this, or comma-separated ids / names / path fragments "
                    "(default: this site, else active sites)")


#: libyaml's emitter where PyYAML was built with it: the same data as the pure-Python one (a long
#: escaped string may wrap at another point; characters beyond the Basic Multilingual Plane, an
#: emoji, stay escaped), about 9x faster. `job ls -v` spent nine tenths of its
#: time in the emitter: 0.85 ms a job (85 s for 100,000 on SQLite), 0.32 ms with this one.
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump_yaml(data: Any, **options: Any) -> str:
    """``data`` as the YAML of the ``-v`` outputs, keys in their order. Text of the Basic
    Multilingual Plane is written as it is (``allow_unicode``): a workdir ``runs/ü`` or a tag
    ``name=日本`` came out as ``"runs/\\xFC"`` and ``"\\u65E5\\u672C"``, readable by a YAML parser
    but not by the user; control characters are still escaped."""
    options = {"sort_keys": False, "allow_unicode": True, **options}
    try:
        return yaml.dump(data, Dumper=_YAML_DUMPER, **options)
    except UnicodeEncodeError:
        # libyaml cannot write a lone surrogate (a non-UTF-8 byte of argv or of a file name,
        # decoded with surrogateescape, kept in a job's parameters): it raised part-way through a
        # `job ls -v`. The pure-Python emitter escapes it ("caf\\uDCE9"), as before libyaml.
        return yaml.dump(data, Dumper=yaml.SafeDumper, **options)


JSON_OPTION_HELP = ("Print one JSON array of objects (every field of -v, datetimes ISO 8601 with their UTC "
                    "offset) instead of a table")


def json_option(func: Any) -> Any:
    """``--json``, as ``balsam plugins ls`` spells it: the listing as one JSON array, for scripts."""
    return click.option("--json", "as_json", is_flag=True, help=JSON_OPTION_HELP)(func)


def jsonable(value: Any) -> Any:
    """``value`` as JSON values: a job's decoded parameters may hold any Python object (a set, a
    numpy array or number, a Path, NaN), which ``json.dumps`` refuses or writes as invalid JSON
    (``NaN``). Containers become objects and arrays (keys: see :func:`_json_keys`), an object with
    ``tolist()`` (numpy arrays and numbers) what that gives, integers (``__index__``) numbers, a
    float that is not finite and any other object its ``str()``. Never raises for one value: the
    others are still written."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, dict):
        return _json_keys(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    # Before __index__: a numpy array has one that raises ("only integer scalar arrays can be
    # converted to a scalar index"), and np.float32 / np.bool_ have no other way to a number / a
    # bool than their str(). tolist() gives Python values (a list for an array, a scalar for a
    # numpy number).
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        try:
            plain = tolist()
        except Exception:  # noqa: BLE001 - another object's tolist(): its str() below
            pass
        else:
            if type(plain) is not type(value):  # one that gives itself back would recurse for ever
                return jsonable(plain)
    if hasattr(type(value), "__index__"):
        try:
            return operator.index(value)
        except Exception:  # noqa: BLE001 - an __index__ that refuses: its str() below
            pass
    return _text(value)


def _text(value: Any) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a __str__ that fails: the object's type and id, as repr() has
        return object.__repr__(value)


def _json_keys(value: dict) -> dict[str, Any]:
    """A dict as a JSON object: a key that is not a string is written as its text (``1`` as
    ``"1"``), or, where a string key or an earlier key already has that text (``{1: "a", "1":
    "b"}``), as the text and its type (``"1 (int)"``): both values kept, never one in silence."""
    taken = {k for k in value if isinstance(k, str)}
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            text = base = _text(key)
            n = 1
            while text in taken:
                text = f"{base} ({type(key).__name__}{'' if n == 1 else f' {n}'})"
                n += 1
            key = text
            taken.add(key)
        out[key] = jsonable(item)
    return out


def json_record(obj: Any) -> dict[str, Any]:
    """A model object (Job, BatchJob, App...) as the JSON object of ``--json``: the fields of its
    ``-v`` YAML (``display_dict()``), datetimes as ISO 8601 with their UTC offset (the YAML has
    local time to the second, with no offset)."""
    data = obj.display_dict()
    for key, fld in type(obj)._fields.items():
        if fld.is_datetime:
            value = getattr(obj, key)  # naive local time, fold set in the repeated hour
            if value is not None:
                data[key] = value.astimezone().isoformat()
    return data


class JsonArray:
    """The output of ``--json``: one JSON array, one object a line, each written as it comes (a
    listing of many pages is written page by page, never held whole); ``[]`` when empty."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, record: dict[str, Any]) -> None:
        # ASCII only: a lone surrogate (a byte of a file name that is not UTF-8) is written as
        # \udce9 instead of failing to encode; allow_nan=False: NaN is not JSON.
        text = json.dumps(record, allow_nan=False)
        click.echo(("[\n" if not self.written else ",\n") + text, nl=False)
        self.written += 1

    def close(self) -> None:
        click.echo("\n]" if self.written else "[]")


def write_json_array(records: Iterable[dict[str, Any]]) -> None:
    """Write ``records`` (an iterable: a generator over pages is written as it goes) as ``--json``'s
    one JSON array (:class:`JsonArray`)."""
    out = JsonArray()
    for record in records:
        out.write(record)
    out.close()


def site_option(func: Any) -> Any:
    return click.option("--site", "site_selector", default="", help=SITE_OPTION_HELP)(func)


def site_option_short(func: Any) -> Any:
    """``-s/--site``: Balsam 0.7 spelled it so on ``app ls`` and ``app rm`` (``job`` commands use
    ``-s`` for ``--state``)."""
    return click.option("-s", "--site", "site_selector", default="", help=SITE_OPTION_HELP)(func)


def site_option_with(help_text: str) -> Any:
    """``--site`` with its own help, for commands whose default or arity differs (``queue submit/term``)."""
    return click.option("--site", "site_selector", default="", help=help_text)


class UpperChoice(click.Choice):
    """A choice of upper-case names (job states) taken in any case and shown as they are written
    (``RESTART_READY``): click 8.2's case-insensitive Choice showed them casefolded in ``--help``
    and its errors (``'bogus' is not one of 'created', ...``), unlike every listing and Balsam 0.7."""

    def __init__(self, choices: Any) -> None:
        super().__init__(choices, case_sensitive=False)

    def normalize_choice(self, choice: Any, ctx: Optional[click.Context]) -> str:
        normed = choice.name if isinstance(choice, enum.Enum) else str(choice)
        if ctx is not None and ctx.token_normalize_func is not None:
            normed = ctx.token_normalize_func(normed)
        return normed.upper()


def current_site_id() -> Optional[int]:
    """Id of the site this command runs in (cwd or ``$BALSAM_SITE_PATH``), else None.

    Only "``$BALSAM_SITE_PATH`` unset and the cwd in no site" gives None. A ``$BALSAM_SITE_PATH``
    that names no site (a typo) or a ``.balsam-site`` that holds no site id is a UsageError: falling
    back to the active sites would make ``job rm --all`` act on *other* sites' jobs."""
    from balsam.config import SITE_MARKER, SiteConfig, SiteNotFoundError
    from balsam.config.site_config import SITE_PATH_ENV

    try:
        cfg = SiteConfig()
    except SiteNotFoundError as exc:
        if os.environ.get(SITE_PATH_ENV):
            raise click.UsageError(str(exc)) from None
        return None  # not inside a site: the caller picks the active sites
    marker = cfg.site_path / SITE_MARKER
    try:
        site_id = cfg.site_id
    except SiteNotFoundError as exc:
        raise click.UsageError(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise click.UsageError(f"{marker}: cannot read the site id ({getattr(exc, 'strerror', None) or exc})") from None
    if site_id is None:
        raise click.UsageError(f"{marker} is empty: it should hold the site id (is the site registered? "
                               "see `balsam site ls`)")
    return int(site_id)


def silent_for(last: Optional[dt.datetime], now: Optional[dt.datetime] = None) -> Optional[dt.timedelta]:
    """Real time from ``last`` (a site's ``last_refresh``: naive local as the Python API gives it,
    or aware) to ``now`` (default: the present); None for never. By instant: naive local times
    subtracted ignore ``fold`` and the daylight saving change between them, so a site refreshed a
    second before the spring-forward read an hour silent (not active, "no site agent has
    reported"), and one silent for 50 minutes across the fall-back read -10 minutes (active)."""
    if last is None:
        return None
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.astimezone(dt.timezone.utc) - last.astimezone(dt.timezone.utc)


def is_active(site: Any, now: Optional[dt.datetime] = None) -> bool:
    silent = silent_for(site.last_refresh, now)
    return silent is not None and silent < ACTIVE_WINDOW


def active_since(now: Optional[dt.datetime] = None) -> dt.datetime:
    """The ``last_refresh_after`` of the active sites, aware UTC: ``datetime.now() - window`` on
    naive local time drops ``fold``: in the second pass of the hour the fall-back repeats it
    selected the sites refreshed in the last 62 minutes."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.astimezone(dt.timezone.utc) - ACTIVE_WINDOW


def _active_site_ids(Site: Any) -> list[int]:
    return [s.id for s in Site.objects.filter(last_refresh_after=active_since())]


def resolve_site_ids(selector: str) -> Optional[list[int]]:
    """Site ids selected by ``selector``; None means every site (no filter)."""
    from balsam.api import Site
    # The words the server refuses as site names (balsam.models.site_name_problem); imported here
    # as balsam.api is: the CLI's modules load the client's on use (start-up time).
    from balsam.models import SITE_SELECTOR_ACTIVE, SITE_SELECTOR_ALL, SITE_SELECTOR_THIS

    selector = (selector or "").strip()
    if not selector:
        here = current_site_id()
        if here is not None:
            return [here]
        active = _active_site_ids(Site)
        if not active:
            click.echo("Note: not inside a site and no site is active (agent heard from in the last 2 minutes);"
                       " use --site=all to see every site.", err=True)
        return active
    if selector == SITE_SELECTOR_ALL:
        return None
    if selector == SITE_SELECTOR_ACTIVE:
        return _active_site_ids(Site)
    if selector == SITE_SELECTOR_THIS:
        here = current_site_id()
        if here is None:
            raise click.UsageError("--site=this: not inside a Balsam site (cd into one or set BALSAM_SITE_PATH)")
        return [here]
    parts = [p.strip() for p in selector.split(",") if p.strip()]
    if not parts:
        # "--site ," (say "--site $A,$B" with both empty) selected no site: an empty listing, exit 0.
        raise click.UsageError(f"--site {selector!r} names no site (give ids, names or path fragments, "
                               "or all, active, this)")
    ids: set[int] = set()
    given_ids: set[int] = set()
    for part in parts:
        if part.isdecimal():  # (isdigit() is true of '²', which int() refuses)
            given_ids.add(int(part))
            continue
        ids.update(s.id for s in _sites_named_or_containing(Site, part))
    if given_ids:
        # One query for all of them. An id of no site of yours (a typo, a deleted site) is a usage
        # error, as an unknown name is: taken as it was, it printed "No matching jobs." and exit 0.
        # Ids past the sites' 32-bit column name no site: not sent (the server's answer named its own
        # query parameter, "query.id: integer out of range").
        askable = sorted(i for i in given_ids if i <= MAX_SITE_ID)
        unknown = given_ids - ({s.id for s in Site.objects.filter(id=askable)} if askable else set())
        if unknown:
            listed = ", ".join(str(i) for i in sorted(unknown))
            raise click.UsageError(f"--site: no site with id {listed} (see `balsam site ls`)")
        ids |= given_ids
    return sorted(ids)


def _sites_named_or_containing(Site: Any, word: str) -> list[Any]:
    """The site named ``word``, else the sites whose path contains it (UsageError when none)."""
    named = list(Site.objects.filter(name=word))
    if named:
        return named
    matched = list(Site.objects.filter(path=word))
    if not matched:
        raise click.UsageError(f"--site: no site is named {word!r} and no site path contains it (see `balsam site ls`)")
    return matched


def resolve_one_site(selector: str) -> Any:
    """The single Site for commands acting on one site (``queue submit``)."""
    from balsam.api import Site
    from balsam.models import SITE_SELECTOR_THIS

    selector = (selector or "").strip()
    if not selector or selector == SITE_SELECTOR_THIS:
        here = current_site_id()
        if here is None:
            raise click.UsageError("not inside a Balsam site: cd into one, set BALSAM_SITE_PATH or pass "
                                   "--site ID|NAME|PATH")
        return Site.objects.get(id=here)
    if selector.isdecimal():  # (not isdigit(): '²' is a digit int() refuses)
        if int(selector) > MAX_SITE_ID:  # past the sites' 32-bit column: no site (not sent)
            raise click.UsageError(f"--site: no site with id {selector}")
        try:
            return Site.objects.get(id=int(selector))
        except Site.DoesNotExist:
            raise click.UsageError(f"--site: no site with id {selector}") from None
    matches = _sites_named_or_containing(Site, selector)
    if len(matches) > 1:
        listing = ", ".join(f"{s.id} ({s.path})" for s in matches)
        raise click.UsageError(f"--site {selector!r} matches several sites: {listing}; give an id")
    return matches[0]


def site_filter(selector: str) -> dict[str, Any]:
    """``{"site_id": [...]}`` for a query, or ``{}`` for all sites."""
    ids = resolve_site_ids(selector)
    return {} if ids is None else {"site_id": ids}


def site_names(ids: Optional[list[int]] = None) -> dict[int, str]:
    from balsam.api import Site

    query = Site.objects.all() if ids is None else Site.objects.filter(id=ids)
    return {s.id: s.name for s in query}


def parse_key_values(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    """``("a=1", "b=2")`` -> ``{"a": "1", "b": "2"}``; a clear UsageError naming the bad item.

    A key given twice with different values (``-t exp=1 -t exp=2``) is refused: a tag has one value,
    and keeping the last one silently made ``job ls``/``job rm`` act on the jobs of ``exp=2`` only.
    The same pair given twice is harmless and kept once."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"{what} {pair!r}: expected KEY=VALUE")
        key, value = key.strip(), value.strip()
        if key in result and result[key] != value:
            raise click.UsageError(f"{what}: key {key!r} given twice ({key}={result[key]} and {key}={value}); "
                                   "give each key once")
        result[key] = value
    return result


def escape_cell(text: str) -> str:
    """``text`` with its control characters written out (``\\n``, ``\\t``, ``\\xNN``; U+2028/U+2029
    as ``\\uNNNN``): a tag value or workdir holding a newline split its row over two lines (``awk``
    and ``wc -l`` read two jobs), and an ESC or a tab printed raw moved the terminal's cursor."""
    if text.isprintable():
        return text  # the common case (U+2028/U+2029 are not printable either), one C-level pass
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or 0x7F <= code <= 0x9F:
            out.append(f"\\x{code:02x}")
        elif ch in "\u2028\u2029":
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def display_width(text: str) -> int:
    """Terminal columns of ``text`` (escaped: no control characters): East Asian wide and full-width
    characters take two, combining marks and zero-width format characters none. Padding by code
    points misaligned the columns after a CJK workdir or tag."""
    if text.isascii():
        return len(text)
    width = 0
    for ch in text:
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def _cells(row: list[Any]) -> list[str]:
    return [escape_cell("" if c is None else str(c)) for c in row]


def _pad(cell: str, width: int, right: bool) -> str:
    fill = " " * max(0, width - display_width(cell))
    return fill + cell if right else cell + fill


def table_widths(headers: list[str], rows: list[list[Any]]) -> list[int]:
    """The column widths (terminal columns) of :func:`format_table` for these rows (its header counts too)."""
    cells = [_cells(headers)] + [_cells(row) for row in rows]
    return [max(display_width(r[i]) for r in cells) for i in range(len(headers))]


def format_rows(rows: list[list[Any]], widths: list[int], right: "set[int] | None" = None) -> str:
    """Rows laid out in columns of ``widths`` (a longer cell overflows its column), no header; each
    row on one line (control characters escaped, see :func:`escape_cell`)."""
    right = right or set()
    lines = []
    for row in rows:
        parts = [_pad(c, widths[i], i in right) for i, c in enumerate(_cells(row))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def format_table(headers: list[str], rows: list[list[Any]], right: "set[int] | None" = None,
                 widths: "list[int] | None" = None) -> str:
    """Columns padded to their widest cell (+2), a header line then one line per row, as Balsam
    0.7 printed them (scripts skip the header with ``awk 'NR>1'``: an underline would read as a
    row); ``right`` = right-aligned columns. ``widths`` (from :func:`table_widths`) lays the table
    out in given columns instead."""
    widths = widths or table_widths(headers, rows)
    header = format_rows([list(headers)], widths, right)
    lines = [header]
    if rows:
        lines.append(format_rows(rows, widths, right))
    return "\n".join(lines)


class _NoRetryLines(logging.Filter):
    """Drops the REST client's ``... retrying in N s`` lines (the records that carry ``retries``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not hasattr(record, "retries")


def watch_output(draw: Any, interval: float, *, title: str, iterations: Optional[int] = None) -> None:
    """Call ``draw()`` every ``interval`` seconds, clearing the terminal first, until Ctrl-C
    (or ``iterations`` rounds). Off a terminal each round is separated by a header line instead.

    A round the API cannot answer (unreachable, or a 5xx after the client's retries: a server
    restart, a database outage) prints one line and the watch goes on; other errors end it."""
    import time

    from balsam.client import APIError, ServerUnavailable

    tty = sys.stdout.isatty()
    done = 0
    # The watch retries every round itself: the client's retry lines (three a round while the
    # server was down) came on top of the round's one line, which says the same.
    rest_logger = logging.getLogger("balsam.client.rest")
    quiet = _NoRetryLines()
    rest_logger.addFilter(quiet)
    try:
        while True:
            if tty:
                click.clear()
            click.echo(click.style(f"{title}  (every {interval:g} s, Ctrl-C to stop)  {dt.datetime.now():%Y-%m-%d %H:%M:%S}",
                                   dim=True))
            try:
                draw()
            except (ServerUnavailable, APIError) as exc:
                if isinstance(exc, APIError) and exc.status_code < 500 and exc.status_code != 429:
                    raise
                click.echo(click.style(f"API not answering, trying again in {interval:g} s: "
                                       f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", fg="yellow"))
            done += 1
            if iterations is not None and done >= iterations:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        click.echo("")
    finally:
        rest_logger.removeFilter(quiet)


class Progress:
    """A click progress bar on stderr for bulk operations (``progress(done, total)`` callback)."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.enabled = enabled and total > 0
        self._bar: Any = None
        self.total = total
        self.label = label
        self._done = 0

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._bar = click.progressbar(length=self.total, label=self.label, file=sys.stderr)  # click 8.2 deprecates get_text_stream
            self._bar.__enter__()
        return self

    @property
    def done(self) -> int:
        """The count of the last ``progress(done, total)`` call (0 before the first)."""
        return self._done

    def __call__(self, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.update(done - self._done)
        self._done = done

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
