"""``balsam app rm --all`` counts the jobs once and asks once (as Balsam 0.7 did), then deletes each
app (the API has no bulk app delete): it sent a count per app and asked per app. ``balsam job
modify`` stopped by Ctrl-C counts the request in flight, which the server carries out: it said
"5000 of 12000 were set" where 10000 were."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cli_test_utils import balsam, fresh_api_state, record_requests  # noqa: F401 (fresh_api_state: autouse)


@pytest.fixture
def site(balsam_env: Any, tmp_path: Path) -> Any:
    from balsam.api import Site

    path = tmp_path / "site-rm"
    (path / "data").mkdir(parents=True)
    return Site.objects.create(name="site-rm", path=str(path))


def _apps(n: int, jobs_each: int) -> list[Any]:
    from balsam.api import ApplicationDefinition, Job

    made = []
    for i in range(n):
        app = type(f"App{i}", (ApplicationDefinition,), {"site": "site-rm", "command_template": "echo hi",
                                                          "__module__": __name__})
        app.sync()
        made.append(app)
        Job.objects.bulk_create([Job(workdir=f"a{i}/{k}", app_id=app) for k in range(jobs_each)])
    return made


def test_app_rm_all_counts_once_asks_once_and_deletes_each_app(site: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.api import App, Job

    _apps(4, 3)
    sent = record_requests(monkeypatch)
    out = balsam("app", "rm", "--all", "--site", str(site.id), input="y\n")
    assert out.exit_code == 0, out.output
    assert out.output.count("Really delete") == 1
    assert "Really delete 4 app(s) (App0, App1, App2, App3) of --site" in out.output
    assert "There are 12 Jobs that will be ERASED!" in out.output
    assert "Deleted 4 app(s) and their 12 job(s)" in out.output
    assert sum(1 for method, path in sent if path.startswith("/jobs")) == 1  # one count, not one per app
    assert sum(1 for method, path in sent if method == "DELETE") == 4  # DELETE /apps/{id}: no bulk route
    assert list(App.objects.all()) == [] and Job.objects.count() == 0


def test_app_rm_all_answered_no_deletes_nothing(site: Any) -> None:
    from balsam.api import App, Job

    _apps(2, 1)
    out = balsam("app", "rm", "--all", "--site", str(site.id), input="n\n")
    assert out.exit_code == 0 and "Nothing deleted." in out.output
    assert App.objects.count() == 2 and Job.objects.count() == 2
    out = balsam("app", "rm", "--all", "--site", str(site.id), "-y")
    assert out.exit_code == 0 and "Really" not in out.output and App.objects.count() == 0


def test_ctrl_c_while_a_modify_request_is_in_flight_counts_it(site: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after the server received the second of three requests (before its answer): the
    server applies it. The message counted only the answered ones (2 of 5) while 4 were set."""
    from balsam.api import Job
    from balsam.client import RESTClient

    _apps(1, 5)
    real_patch = RESTClient.patch
    calls = []

    def patch_then_ctrl_c(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        answer = real_patch(self, *args, **kwargs)  # the server has it and carries it out
        if len(calls) == 2:
            raise KeyboardInterrupt
        return answer

    monkeypatch.setattr(type(Job.objects), "bulk_chunk_size", 2)
    monkeypatch.setattr(RESTClient, "patch", patch_then_ctrl_c)
    ids = [arg for j in Job.objects.all() for arg in ("-i", str(j.id))]
    out = balsam("job", "modify", *ids, "-s", "FAILED", "-y")
    assert out.exit_code == 130, out.output
    failed = Job.objects.filter(state="FAILED").count()
    assert failed == 4
    assert ("Interrupted: 2 of 5 job(s) were set to FAILED, and up to 2 more by the request in flight (the server "
            "carries out a request it has received): 2 to 4 in all; run the command again") in out.output


def test_ctrl_c_with_one_request_per_job_counts_one_in_flight(site: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without bulk PATCH (one PUT per job) at most one job is in flight: it said "up to 3 more"
    (the 5,000 of a bulk request, capped by the jobs left) where one more at most was set."""
    from balsam.api import Job
    from balsam.client import RESTClient

    _apps(1, 5)
    real_put = RESTClient.put
    calls = []

    def put_then_ctrl_c(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        answer = real_put(self, *args, **kwargs)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return answer

    monkeypatch.setattr(type(Job.objects), "has_bulk_patch", False)
    monkeypatch.setattr(RESTClient, "put", put_then_ctrl_c)
    ids = [arg for j in Job.objects.all() for arg in ("-i", str(j.id))]
    out = balsam("job", "modify", *ids, "-s", "FAILED", "-y")
    assert out.exit_code == 130, out.output
    assert Job.objects.filter(state="FAILED").count() == 3
    assert ("Interrupted: 2 of 5 job(s) were set to FAILED, and up to 1 more by the request in flight (the server "
            "carries out a request it has received): 2 to 3 in all; run the command again") in out.output
