"""A hook that saves its job itself (``self.job.state = ...; self.job.save()``, as users of the
client API write), against a real server and real hook workers.

The save moved the job and ended its lease to the processing session; the module then sent the same
state again under that session, which the server refused: an ERROR (``server refused update ... job
N is no longer held by session M``) for every such job and a WARNING (``N job updates were not
applied``) at the stop, for jobs that were fine. Now the worker sees that the hook saved the state,
saves the hook's later changes the same way, and the module sends nothing for the job."""

from __future__ import annotations

import logging

from balsam.site.modules.processing import ProcessingModule
from site_test_utils import events, job_rows, process_until, state_path


def test_a_hook_that_saves_its_job_is_not_refused(make_site, client, caplog) -> None:
    from balsam.api import ApplicationDefinition, Job

    site = make_site()
    sid = site.site_id

    class Saver(ApplicationDefinition):
        site = sid
        command_template = "echo hi"

        def preprocess(self):
            self.job.data = {"pre": 1}
            self.job.state = "PREPROCESSED"
            self.job.save()
            self.job.tags = {"after": "save"}  # a change after the save: saved too

    Saver.sync()
    saved, other = Job.objects.bulk_create([Job("s/1", Saver), Job("s/2", Saver)])
    module = ProcessingModule(site, site.settings.processing, client)
    with caplog.at_level(logging.INFO):
        try:
            process_until(module, lambda: all(r["state"] == "PREPROCESSED"
                                              for r in job_rows(client, id=[saved.id, other.id])))
        finally:
            module.close()
    rows = {r["id"]: r for r in job_rows(client, id=[saved.id, other.id])}
    for job_id in (saved.id, other.id):
        assert rows[job_id]["data"] == {"pre": 1} and rows[job_id]["tags"] == {"after": "save"}
        assert state_path(events(client, job_id=job_id)) == ["STAGED_IN", "PREPROCESSED"]
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == [], problems
