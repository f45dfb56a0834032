"""`balsam queue submit` warns (once, not an error) when a batch scheduler's launchers would be
given an api root that only this host can reach (the test server listens on 127.0.0.1)."""

from __future__ import annotations

import pytest
import yaml
from cli_test_utils import balsam, fresh_api_state  # noqa: F401 (fresh_api_state: autouse)


def _site(tmp_path, scheduler: str):
    from balsam.api import Site

    path = tmp_path / "site-a"
    (path / "data").mkdir(parents=True)
    (path / "settings.yml").write_text(yaml.safe_dump({"scheduler": {"name": scheduler}}))
    s = Site.objects.create(
        name="site-a", path=str(path), allowed_projects=["proj"],
        allowed_queues={"debug": {"max_nodes": 4, "max_walltime": 60, "max_queued_jobs": 3}},
    )
    (path / ".balsam-site").write_text(f"{s.id}\n")
    return s


@pytest.mark.parametrize("scheduler, warned", [("pbs", True), ("local", False)])
def test_loopback_server_with_a_batch_scheduler(balsam_env, tmp_path, scheduler: str, warned: bool) -> None:
    assert "127.0.0.1" in balsam_env.url
    _site(tmp_path, scheduler)
    out = balsam("queue", "submit", "-n", "1", "-t", "30", "-q", "debug", "-A", "proj", "-j", "mpi", "--site", "site-a")
    assert out.exit_code == 0, out.output
    lines = [ln for ln in out.output.splitlines() if "only this host can reach" in ln]
    if warned:
        (line,) = lines
        assert line.startswith("Warning: site site-a's scheduler is pbs") and balsam_env.url.rstrip("/") in line
    else:
        assert lines == []
