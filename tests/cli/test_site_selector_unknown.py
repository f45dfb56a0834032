"""An unknown site id or name in ``--site`` is a usage error naming it, for every command that
takes ``--site`` (one resolver: balsam.cli._site_selector); the id used to be taken as it was, and
``balsam job ls --site 99`` printed "No matching jobs." with exit status 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cli_test_utils import balsam, fresh_api_state  # noqa: F401 (fresh_api_state: autouse)


@pytest.fixture
def site(balsam_env: Any, tmp_path: Path) -> Any:
    from balsam.api import Site

    (tmp_path / "known-site" / "data").mkdir(parents=True)
    return Site.objects.create(name="known-site", path=str(tmp_path / "known-site"))


COMMANDS = [("job", "ls"), ("app", "ls"), ("queue", "ls"), ("transfer", "ls"), ("analytics", "throughput"),
            ("analytics", "utilization"), ("job", "rm", "--all", "-y"), ("job", "modify", "-t", "a=b", "-s", "READY", "-y")]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_unknown_site_id_is_a_usage_error_naming_it(site: Any, command: tuple) -> None:
    unknown = site.id + 1000
    out = balsam(*command, "--site", f"{site.id},{unknown}")
    assert out.exit_code == 2, out.output
    assert f"--site: no site with id {unknown} (see `balsam site ls`)" in out.output
    assert "No matching" not in out.output


@pytest.mark.parametrize("command", [("job", "ls"), ("app", "ls"), ("queue", "ls"), ("queue", "submit", "-n", "1", "-t", "5",
                                     "-q", "local", "-A", "p", "-j", "mpi")], ids=lambda c: " ".join(c[:2]))
def test_a_site_id_past_the_api_s_integers_is_no_site(site: Any, command: tuple) -> None:
    # It was sent: "HTTP 422: query.id: integer out of range", exit 1.
    huge = 10**20
    out = balsam(*command, "--site", str(huge))
    assert out.exit_code == 2, out.output
    assert f"--site: no site with id {huge}" in out.output and "out of range" not in out.output


def test_unknown_site_name_is_a_usage_error_naming_it(site: Any) -> None:
    out = balsam("job", "ls", "--site", "no-such-name")
    assert out.exit_code == 2 and "no site is named 'no-such-name'" in out.output, out.output


def test_known_ids_names_and_the_keywords_still_select(site: Any) -> None:
    for selector in (str(site.id), "known-site", f"{site.id},known-site", "all", "active"):
        out = balsam("job", "ls", "--site", selector)
        assert out.exit_code == 0, (selector, out.output)
    # outside a site, `this` stays the error it was
    out = balsam("job", "ls", "--site", "this")
    assert out.exit_code == 2 and "not inside a Balsam site" in out.output


def test_the_known_ids_are_checked_in_one_request(site: Any) -> None:
    from balsam._api.model import get_default_client
    from balsam.cli._site_selector import resolve_site_ids

    client = get_default_client()
    before = dict(client.request_counts)
    assert resolve_site_ids(f"{site.id}, {site.id}") == [site.id]
    after = {k: v - before.get(k, 0) for k, v in client.request_counts.items() if v != before.get(k, 0)}
    assert after == {"GET /sites/": 1}, after
