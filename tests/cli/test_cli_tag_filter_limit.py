"""More than ``MAX_TAG_FILTERS`` (100) ``-t/--tag KEY=VALUE`` options are refused by the command as
a usage error naming the option, the count and the limit: ``job ls`` and ``job rm -y`` answered
``Job.objects.filter(): at most 100 distinct tags filters ...``, naming a Python API call the user
never wrote (and so did ``job modify`` and ``analytics``). ``queue submit``'s ``--tag`` (the
BatchJob's filter tags, merged with each ``--part``'s) was refused by the server, naming its body's
fields."""

from __future__ import annotations

from typing import Any

import pytest
from cli_test_utils import balsam, fresh_api_state, record_requests  # noqa: F401 (fresh_api_state: autouse)

from balsam.models import MAX_TAG_FILTERS


def _tags(n: int, option: str = "-t") -> list[str]:
    return [x for i in range(n) for x in (option, f"k{i}={i}")]


@pytest.mark.parametrize("command", [["job", "ls"], ["job", "rm", "-y"], ["job", "modify", "-s", "RESTART_READY", "-y"],
                                     ["analytics", "throughput"], ["analytics", "utilization"]])
def test_more_tag_filters_than_the_limit_are_refused_naming_the_option(monkeypatch: pytest.MonkeyPatch,
                                                                       command: list[str]) -> None:
    """A usage error, before any request (no server is needed to say so)."""
    sent = record_requests(monkeypatch)
    out = balsam(*command, *_tags(MAX_TAG_FILTERS + 1))
    assert out.exit_code == 2, out.output
    assert "Invalid value for '-t' / '--tag': 101 tag filters" in out.output, out.output
    assert f"at most {MAX_TAG_FILTERS}" in out.output and "objects" not in out.output, out.output
    assert sent == []


def test_the_limit_counts_distinct_pairs(balsam_env: Any) -> None:
    """A pair given twice is one filter: 101 options naming 100 pairs are taken (no job matches)."""
    out = balsam("job", "ls", *_tags(MAX_TAG_FILTERS), "-t", "k0=0")
    assert out.exit_code == 0, out.output
    assert "Invalid value" not in out.output


def test_queue_submit_names_its_tag_or_part_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before the site is looked up (no server is needed to say so)."""
    sent = record_requests(monkeypatch)
    base = ["queue", "submit", "-n", "1", "-t", "5", "-q", "debug", "-A", "proj", "-j", "mpi"]
    out = balsam(*base, *_tags(MAX_TAG_FILTERS + 1, "--tag"))
    assert out.exit_code == 2, out.output
    assert "Invalid value for '-tag' / '--tag': 101 tags" in out.output, out.output
    assert f"at most {MAX_TAG_FILTERS} filter tags" in out.output
    part = "serial:1:" + ":".join(f"p{i}=1" for i in range(2))
    out = balsam(*base, *_tags(MAX_TAG_FILTERS - 1, "--tag"), "--part", part)
    assert out.exit_code == 2, out.output
    assert "Invalid value for '-p' / '--part':" in out.output and "101 filter tags (--tag: 99, this --part's: 2" in out.output
    assert sent == []
