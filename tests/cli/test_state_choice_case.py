"""Job states on the command line (``job ls/rm -s/-ns``, ``job modify -s/-f``, ``analytics``) are
taken in any case and shown as Balsam writes them everywhere else, upper case: click 8.2's
case-insensitive Choice showed them casefolded in ``--help`` and in its usage errors."""

from __future__ import annotations

import pytest
from cli_test_utils import balsam, fresh_api_state  # noqa: F401 (fresh_api_state: autouse)


@pytest.mark.parametrize("command, option", [(["job", "ls"], "-s"), (["job", "rm"], "-ns"),
                                             (["job", "modify", "-i", "1"], "-f")])
def test_a_wrong_state_is_answered_with_the_states_as_balsam_writes_them(command, option):
    out = balsam(*command, option, "bogus")
    assert out.exit_code == 2
    assert "'bogus' is not one of 'CREATED', 'AWAITING_PARENTS'," in out.output, out.output
    assert "'restart_ready'" not in out.output


def test_help_lists_the_states_in_upper_case():
    out = balsam("job", "modify", "--help")
    assert out.exit_code == 0
    assert "[CREATED|AWAITING_PARENTS|READY|" in out.output.replace("\n", "").replace(" ", ""), out.output


@pytest.mark.parametrize("given", ["failed", "Failed", "FAILED", "restart_ready"])
def test_any_case_is_taken_and_given_to_the_command_upper_case(given):
    from balsam.cli.job import _state_type

    assert _state_type().convert(given, None, None) == given.upper()
