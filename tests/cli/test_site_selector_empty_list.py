"""``--site ,`` (say ``--site "$A,$B"`` with both empty) names no site: a usage error, not an empty
selection that listed "No matching jobs." and deleted nothing with exit status 0."""

from __future__ import annotations

import pytest
from cli_test_utils import balsam, fresh_api_state  # noqa: F401 (fresh_api_state: autouse)


@pytest.mark.parametrize("command", [["job", "ls"], ["job", "rm", "-y"], ["app", "ls"], ["queue", "ls"]])
@pytest.mark.parametrize("selector", [",", " , ,"])
def test_a_site_list_of_empty_items_is_a_usage_error(balsam_env, command, selector):
    from balsam.api import Site

    Site.objects.create(name="site-e", path="/tmp/site-e")
    out = balsam(*command, "--site", selector)
    assert out.exit_code == 2, out.output
    assert "names no site" in out.output
    assert "No matching" not in out.output


@pytest.mark.parametrize("selector", ["²", "1,²", "³"])
def test_a_superscript_digit_is_a_site_name_not_an_id(balsam_env, selector):
    """``'²'.isdigit()`` is true but ``int('²')`` raises: ``--site ²`` failed with ``invalid literal
    for int() with base 10: '²'`` (exit 1). Only decimal digits are an id now; '²' is looked up as
    a name or path fragment, and no site has it: a usage error (exit 2)."""
    from balsam.api import Site

    site = Site.objects.create(name="site-d", path="/tmp/site-d")
    for command in (["job", "ls"], ["queue", "ls"]):
        out = balsam(*command, "--site", selector.replace("1", str(site.id)))
        assert out.exit_code == 2, out.output
        assert "no site is named" in out.output and "invalid literal" not in out.output, out.output
    out = balsam("queue", "submit", "-n", "1", "-t", "5", "-q", "local", "-A", "p", "-j", "mpi", "--site", selector)
    assert out.exit_code == 2, out.output
    assert "invalid literal" not in out.output, out.output
