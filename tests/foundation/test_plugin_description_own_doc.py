"""`balsam plugins ls/show` describe a driver or agent module by its own docstring, else its
module's, never by a base class's: the elastic queue module (no class docstring) was shown as
"One periodic task of the site agent.", AgentModule's docstring."""

from __future__ import annotations

from balsam.plugins.report import describe
from balsam.site.module import AgentModule

from foundation_helpers import run_balsam


class Undocumented(AgentModule):
    section = "undocumented_for_test"


def test_a_class_without_its_own_docstring_is_described_by_its_module():
    assert describe(Undocumented) == __doc__.splitlines()[0]
    assert describe(AgentModule) == AgentModule.__doc__.strip().splitlines()[0]


def test_elastic_queue_is_described_by_what_it_does():
    result = run_balsam("plugins", "show", "elastic_queue")
    assert result.returncode == 0, result.stderr
    assert "One periodic task of the site agent" not in result.stdout
    assert "elastic_queue" in result.stdout and "backlog" in result.stdout, result.stdout
