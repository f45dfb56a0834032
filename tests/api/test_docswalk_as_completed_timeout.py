"""as_completed()'s timeout says where the jobs left wait (docs walk: the README's campaign whose
BatchJob the site refused waited out its timeout with "3 of 3 jobs not completed in 600 s" alone)."""

from __future__ import annotations

import concurrent.futures

import pytest


def test_as_completed_timeout_counts_the_jobs_left_by_state_and_names_what_they_wait_for(site):
    from balsam.api import ApplicationDefinition, Job

    site_name = site.name

    class Echo(ApplicationDefinition):
        site = site_name
        command_template = "echo {{ x }}"

    # No site agent runs here: new jobs stay STAGED_IN, a child of them AWAITING_PARENTS.
    staged = Job.objects.bulk_create([Echo.submit(workdir=f"w/{i}", x=i, save=False) for i in range(3)])
    runnable = staged[2]
    runnable.state = "PREPROCESSED"
    runnable.save()
    child = Echo.submit(workdir="w/child", x=9, parent_ids={staged[0].id})
    with pytest.raises(concurrent.futures.TimeoutError) as info:
        list(Job.objects.as_completed(staged + [child], timeout=0.2, poll_interval=0.1))
    message = str(info.value)
    assert message.startswith("4 of 4 jobs not completed in 0.2 s: 2 STAGED_IN, 1 PREPROCESSED, 1 AWAITING_PARENTS")
    assert "PREPROCESSED wait for a launcher" in message and "balsam queue ls --history" in message
    assert "STAGED_IN wait for the site agent" in message
    assert "AWAITING_PARENTS wait for their parents" in message
    assert "\n" not in message


def test_result_timeout_names_what_the_job_waits_for(site):
    from balsam.api import ApplicationDefinition

    site_name = site.name

    class Square(ApplicationDefinition):
        site = site_name

        def run(self, x):
            return x * x

    job = Square.submit(workdir="sq/1", x=3)  # no site agent here: it stays STAGED_IN
    with pytest.raises(concurrent.futures.TimeoutError) as info:
        job.result(timeout=0.2)
    assert str(info.value) == (f"Job(id={job.id}) not done after 0.2 s (state STAGED_IN; STAGED_IN wait for the "
                               "site agent (`balsam site status` in the site directory))")
