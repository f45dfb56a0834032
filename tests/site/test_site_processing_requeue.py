"""The processing module keeps the jobs it leased when a cycle fails half-way through dispatching
them (an API outage while an app loads): they stay in its backlog and are dispatched next cycle.
Before, they were dropped from the backlog while its session still held them, so no one ran their
hooks until the agent restarted."""

from __future__ import annotations

from balsam.site.modules.processing import ProcessingModule
from site_test_utils import job_rows


def test_jobs_of_a_failed_dispatch_are_dispatched_next_cycle(make_site, client, monkeypatch) -> None:
    import pytest

    from balsam.api import ApplicationDefinition, Job

    site = make_site()
    module = ProcessingModule(site, site.settings.processing, client)
    try:
        site_id = site.site_id

        class Echo(ApplicationDefinition):
            site = site_id
            command_template = "echo {{ word }}"

        Echo.sync()
        ids = [j.id for j in Job.objects.bulk_create([Job(f"echo/{i}", Echo, parameters={"word": "w"}) for i in range(5)])]
        real_info, calls = module.apps.info, []

        def info_once_down(app_id):
            calls.append(app_id)
            if len(calls) == 2:  # the second job: its app's record expired and the API is away
                raise ConnectionError("API unreachable")
            return real_info(app_id)

        monkeypatch.setattr(module.apps, "info", info_once_down)
        with pytest.raises(ConnectionError):
            module.run_cycle()  # the agent logs it and backs off
        assert sorted(j["id"] for j in module.backlog) == sorted(ids)
        module.run_cycle()
        module.flush()
        assert {r["state"] for r in job_rows(client, id=ids)} == {"PREPROCESSED"}
        assert module.backlog == []
    finally:
        module.close()
