def test_smoke(balsam_env, tmp_path):
    from balsam.api import Site, Job, BatchJob, Session, ApplicationDefinition, EventLog
    site = Site.objects.create(name="s1", path=str(tmp_path / "s1"))
    print(site)
    class Hello(ApplicationDefinition):
        site = "s1"
        command_template = "echo hello {{ name }}"
    Hello.sync()
    print(Hello.__app_id__)
    j = Job(workdir="a/b", app_id="Hello", parameters={"name": "x"}, tags={"k": "v"})
    j.save()
    print(j)
    jobs = Job.objects.bulk_create([Hello.submit(workdir=f"w/{i}", save=False, name=str(i)) for i in range(10)])
    print(len(jobs), Job.objects.count(), Job.objects.filter(tags={"k": "v"}).count())
    bj = BatchJob.objects.create(site_id=site.id, project="p", queue="q", num_nodes=1, wall_time_min=5, job_mode="mpi")
    print(bj)
    for x in Job.objects.all():
        x.state = "PREPROCESSED"
    Job.objects.bulk_update(list(Job.objects.all()))
    jobs = list(Job.objects.all())
    for x in jobs: x.state = "PREPROCESSED"
    print(Job.objects.bulk_update(jobs))
    s = Session.objects.create(site_id=site.id, batch_job_id=bj.id)
    acq = s.acquire_jobs(max_num_jobs=5)
    print(len(acq), acq[0].state)
    for x in acq:
        x.state = "RUNNING"; x.state_data = {"num_nodes": 1}
    Job.objects.bulk_update(acq)
    s.tick()
    print(list(EventLog.objects.filter(to_state="RUNNING"))[:2])
    s.delete()
    j.data["x"] = 1
    assert j.dirty_fields == {"data"}
    j.save()
    j.refresh_from_db()
    assert j.data == {"x": 1}
    print(Job.objects.filter(state="RUN_TIMEOUT").count())
