"""docs/cli.md's examples against the CLI (an audit of its claims).

1. `balsam queue ls --scheduler-id 123456` with no such batch job said "No active batch jobs.  Use
   --history option ...", as if the site had none at all: it names the scheduler id now.
2. `balsam analytics utilization ... --plot util.png` with nothing to draw yet wrote no file and
   said nothing about it (the docs' example: "draws the whole series"): the line now says so.
3. `balsam job create ... -s in=x:/abs` for an app without that transfer slot said "app Hello has
   no transfer slot(s) in", naming neither the option nor the app's slots (`-p` named both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cli_test_utils import balsam, fresh_api_state, make_marked_site, sync_hello  # noqa: F401 (fixture)


@pytest.fixture
def site(balsam_env: Any, tmp_path: Path) -> Any:
    return make_marked_site(tmp_path, "claims")


def test_queue_ls_by_scheduler_id_names_it_when_none_matches(site: Any) -> None:
    out = balsam("queue", "ls", "--scheduler-id", "123456", "--site", "all")
    assert out.exit_code == 0, out.output
    assert out.output == ("No active batch jobs with scheduler id 123456 (`--history` includes the ended ones).\n")
    out = balsam("queue", "ls", "--scheduler-id", "123456", "-h", "--site", "all")
    assert out.output == "No batch jobs with scheduler id 123456.\n"


@pytest.mark.parametrize("command", ["throughput", "utilization"])
def test_analytics_plot_with_nothing_to_draw_says_no_file_was_written(site: Any, tmp_path: Path, command: str) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "util.png"
    out = balsam("analytics", command, "--site", "claims", "--plot", str(plot))
    assert out.exit_code == 0, out.output
    assert not plot.exists()
    assert out.output.rstrip("\n").endswith(f"Nothing to draw: {plot} was not written."), out.output


def test_job_create_unknown_transfer_slot_names_the_option_and_the_slots(site: Any) -> None:
    sync_hello("claims", "echo {{ name }}")
    out = balsam("job", "create", "-w", "r/1", "-a", "Hello", "-p", "name=x", "-s", "in=x:/abs", "-y")
    assert out.exit_code == 2, out.output
    assert out.output.splitlines()[-1] == ("Error: --stage-data: app Hello has no transfer slot(s) in "
                                          "(transfer slots: none)"), out.output
