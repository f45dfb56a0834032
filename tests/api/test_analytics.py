"""balsam.analytics on real EventLog and BatchJob records."""

from __future__ import annotations

import datetime as dt


def test_reports_from_a_real_campaign(site, run_jobs):
    from balsam.analytics import available_nodes, throughput_report, utilization_report
    from balsam.api import ApplicationDefinition, BatchJob, EventLog, Job

    site_name = site.name

    class Work(ApplicationDefinition):
        site = site_name
        command_template = "true"

    jobs = Job.objects.bulk_create([Work.submit(workdir=f"a/{i}", num_nodes=2, tags={"c": "1"}, save=False)
                                   for i in range(3)]
                                  + [Work.submit(workdir=f"b/{i}", num_nodes=1, node_packing_count=4, tags={"c": "1"},
                                                 save=False) for i in range(2)])
    run_jobs(site, jobs, fail=[jobs[-1].id])
    events = EventLog.objects.filter(tags={"c": "1"})

    times, counts = throughput_report(events, to_state="JOB_FINISHED")
    assert counts == [1, 2, 3, 4] and times == sorted(times)
    assert all(isinstance(t, dt.datetime) for t in times)
    assert throughput_report(events, to_state="FAILED")[1] == [1]

    times, busy = utilization_report(events, node_weighting=True)
    assert max(busy) == 6.5 and busy[-1] == 0  # 3 x 2 nodes + 2 x 1/4 node at the peak
    assert utilization_report(events, node_weighting=False)[1][-1] == 0
    assert max(utilization_report(events, node_weighting=False)[1]) == 5

    now = dt.datetime.now()
    a = BatchJob.objects.create(site_id=site.id, num_nodes=4, wall_time_min=10, job_mode="mpi", queue="debug",
                                project="datascience")
    b = BatchJob.objects.create(site_id=site.id, num_nodes=2, wall_time_min=10, job_mode="mpi", queue="debug",
                                project="datascience")
    for bj, start, end in ((a, now - dt.timedelta(minutes=30), now - dt.timedelta(minutes=10)),
                           (b, now - dt.timedelta(minutes=20), now - dt.timedelta(minutes=5))):
        bj.state = "running"
        bj.start_time = start
        bj.save()
        bj.state = "finished"
        bj.end_time = end
        bj.save()
    times, nodes = available_nodes(BatchJob.objects.filter(site_id=site.id))
    assert nodes == [4, 6, 2, 0]
    assert abs((times[0] - (now - dt.timedelta(minutes=30))).total_seconds()) < 1
