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
