"""More key/value filter tags than an acquire takes (the API's MAX_TAG_FILTERS: 100) stop the
launcher at start with one line naming the count and where the tags came from. Each acquire was a
422, and the launcher retried it for its whole allocation, running nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from balsam.launcher.entry import LauncherError, Partition, check_filter_tag_count
from balsam.models import MAX_TAG_FILTERS

from launcher_helpers import closed_port, offline_site


def test_merged_tags_beyond_the_cap_name_the_count_and_their_sources() -> None:
    settings_tags = {f"s{i}": "v" for i in range(60)}
    cli_tags = {f"c{i}": "v" for i in range(40)}
    check_filter_tag_count(settings_tags, cli_tags, [Partition("mpi", 1)])  # 100: taken
    # A key in two sources counts once (the later source's value wins, as in the acquire).
    check_filter_tag_count(settings_tags, {**cli_tags, "s0": "w"}, [Partition("mpi", 1, {"c0": "x"})])
    try:
        check_filter_tag_count(settings_tags, cli_tags, [Partition("mpi", 1), Partition("serial", 1, {"p": "1"})])
    except LauncherError as exc:
        line = str(exc)
    else:
        raise AssertionError("101 merged tags were taken")
    assert "\n" not in line
    assert line == ("101 filter tags (settings.yml filter_tags: 60, --tag (the BatchJob's filter_tags): 40, "
                    "--part 1's tags: 1; keys counted once): an acquire takes at most 100")


def test_the_launcher_stops_at_start(tmp_path: Path) -> None:
    # No server is needed: the launcher stops before its first acquire (a closed port, no retry).
    site, env = offline_site(tmp_path, f"http://127.0.0.1:{closed_port()}", retry_count=0)
    settings = yaml.safe_load((site / "settings.yml").read_text())
    settings["filter_tags"] = {f"s{i}": "v" for i in range(50)}
    (site / "settings.yml").write_text(yaml.safe_dump(settings))
    argv = [sys.executable, "-m", "balsam.launcher", "-j", "mpi", "-t", "1", "--site", str(site)]
    for i in range(51):
        argv += ["--tag", f"b{i}=v"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert line == ("Error: 101 filter tags (settings.yml filter_tags: 50, --tag (the BatchJob's filter_tags): 51; "
                    "keys counted once): an acquire takes at most 100"), proc.stderr
