"""A ``-t/--tag`` filter whose key holds ':' is a usage error naming the option. The API's tag
filter is ``KEY:VALUE`` split at the first ':', so ``-t a:b=c`` was sent as tag ``a`` = ``b:c``:
``job ls -t a:b=c`` listed (and ``job rm -t a:b=c -y`` deleted) the jobs tagged ``a=b:c``, and never
the ones tagged ``a:b=c``."""

from __future__ import annotations

from typing import Any

import pytest
from cli_test_utils import balsam, fresh_api_state, make_marked_site, record_requests, sync_hello  # noqa: F401


@pytest.mark.parametrize("command", [["job", "ls"], ["job", "rm", "-y"], ["job", "modify", "-s", "RESTART_READY", "-y"],
                                     ["analytics", "throughput"]])
def test_a_tag_key_with_a_colon_is_refused_before_any_request(monkeypatch: pytest.MonkeyPatch,
                                                              command: list[str]) -> None:
    sent = record_requests(monkeypatch)
    out = balsam(*command, "--site", "all", "-t", "a:b=c")
    assert out.exit_code == 2, out.output
    assert "Invalid value for '-t' / '--tag': a:b=c: a tag key holding ':' cannot be filtered on" in out.output, out.output
    assert sent == []


def test_job_rm_with_a_colon_key_leaves_the_job_tagged_with_the_colon_value(balsam_env: Any, tmp_path: Any) -> None:
    from balsam.api import Job

    site = make_marked_site(tmp_path, "colon")
    app = sync_hello(site.name, "echo hi")
    victim = Job(workdir="victim", app_id=app.__app_id__, tags={"a": "b:c"})
    victim.save()
    out = balsam("job", "rm", "--site", str(site.id), "-t", "a:b=c", "-y")
    assert out.exit_code == 2, out.output
    assert [j.id for j in Job.objects.filter(site_id=site.id)] == [victim.id]
    # A colon in the value is sent as it is and selects the job.
    out = balsam("job", "ls", "--site", str(site.id), "-t", "a=b:c")
    assert out.exit_code == 0 and "victim" in out.output, out.output
