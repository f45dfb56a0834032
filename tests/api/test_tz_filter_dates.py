"""A day given to a time filter is a local day, as a naive datetime is local, on a real server.

``EventLog.objects.filter(timestamp_after=date(2026, 11, 20))`` was sent as the text
``2026-11-20``, which the server reads as UTC midnight: in Chicago the filter began at 18:00 the day
before (and in Berlin an hour into the day), where ``datetime(2026, 11, 20)`` begins at local midnight.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

UTC = dt.timezone.utc


def test_a_day_in_a_time_filter_is_the_local_day(bare_site: Any, chicago: Any) -> None:
    from balsam.api import ApplicationDefinition, EventLog, Job, Session

    app = type("Sleeper", (ApplicationDefinition,), {"site": bare_site.name, "command_template": "sleep 1"})
    app.sync()
    jobs = Job.objects.bulk_create([app.submit(workdir=f"d/{i}", save=False) for i in range(2)])
    for job in jobs:
        job.state = "PREPROCESSED"
    Job.objects.bulk_update(jobs)
    acquired = sorted(Session.objects.create(site_id=bare_site.id).acquire_jobs(max_num_jobs=2, app_ids={app.__app_id__}),
                      key=lambda j: j.id)
    # 21:00 CST on the 19th (03:00 UTC on the 20th), and 01:00 CST on the 20th.
    stamps = [dt.datetime(2026, 11, 20, 3, tzinfo=UTC), dt.datetime(2026, 11, 20, 7, tzinfo=UTC)]
    for job, when in zip(acquired, stamps):
        job.state, job.state_timestamp = "RUNNING", when
    Job.objects.bulk_update(acquired)

    def running(**filters: Any) -> list[int]:
        return sorted(e.job_id for e in EventLog.objects.filter(to_state="RUNNING", job_id=[j.id for j in jobs],
                                                                **filters))

    late, early = acquired[0].id, acquired[1].id
    assert running(timestamp_after=dt.datetime(2026, 11, 20)) == [early]  # a naive datetime: local midnight
    assert running(timestamp_after=dt.date(2026, 11, 20)) == [early]
    assert running(timestamp_before=dt.date(2026, 11, 20)) == [late]
    assert running(timestamp_after=dt.date(2026, 11, 20), timestamp_before=dt.date(2026, 11, 21)) == [early]
