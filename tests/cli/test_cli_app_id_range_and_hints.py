"""Review fixes of the CLI's id options and hints:

- ``-a/--app`` (``job ls``, ``job create``) given an id beyond the server's 32-bit app ids is a
  usage error naming the option, before any request (the server answered ``query.id: integer out
  of range``, a parameter the user never wrote). A name is taken as before.
- An id option's range error says the range (``-10**20`` was told "at most ...", which it is).
- ``analytics -t a:b=c`` (a tag key holding ':') is not told to "select by --id": analytics has none.
- ``balsam app sync`` is not called "a Balsam 0.7 command": 0.7's command line never had it."""

from __future__ import annotations

from typing import Any

import pytest
from cli_test_utils import balsam, fresh_api_state, record_requests  # noqa: F401 (autouse)

BIG = str(10**20)


@pytest.mark.parametrize("args", [
    ["job", "ls", "--site", "all", "-a", BIG],
    ["job", "create", "--site", "all", "-w", "w", "-a", BIG, "-y"],
    ["job", "ls", "--site", "all", "--app", str(2**31)],
])
def test_an_app_id_past_32_bits_is_a_usage_error(balsam_env: Any, monkeypatch: pytest.MonkeyPatch, args: list) -> None:
    sent = record_requests(monkeypatch)
    out = balsam(*args)
    assert out.exit_code == 2, out.output
    value = args[args.index("-a" if "-a" in args else "--app") + 1]
    assert (f"Error: Invalid value for '-a' / '--app': {value}: app ids are 32-bit integers (-2147483648 to "
            "2147483647)") in out.stderr, out.output
    assert sent == []


def test_an_app_name_and_the_largest_app_id_are_taken(balsam_env: Any) -> None:
    out = balsam("job", "ls", "--site", "all", "-a", str(2**31 - 1))
    assert out.exit_code == 2 and "--app: no app with id 2147483647" in out.stderr, out.output
    out = balsam("job", "ls", "--site", "all", "-a", "NoSuchApp")
    assert out.exit_code == 2 and "no app named 'NoSuchApp'" in out.stderr, out.output


def test_an_id_below_the_range_is_told_the_range(balsam_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sent = record_requests(monkeypatch)
    out = balsam("job", "ls", "--site", "all", "--id", str(-10**20))
    assert out.exit_code == 2, out.output
    assert (f"Invalid value for '--id': {-10**20}: job ids are 64-bit integers (-9223372036854775808 to "
            "9223372036854775807)") in out.stderr, out.output
    assert sent == []


def test_analytics_colon_key_hint_fits_analytics(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = record_requests(monkeypatch)
    out = balsam("analytics", "throughput", "--site", "all", "-t", "a:b=c")
    assert out.exit_code == 2, out.output
    assert "--id" not in out.stderr, out.stderr
    assert "the events of such jobs cannot be selected by tag (narrow by --site)" in out.stderr, out.stderr
    out = balsam("job", "ls", "--site", "all", "-t", "a:b=c")  # job commands have --id
    assert out.exit_code == 2 and "select these jobs by --id" in out.stderr, out.output
    assert sent == []
