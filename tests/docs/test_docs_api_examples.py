"""The Jobs example of docs/api.md runs as written, on a real server, against the site and app it
names ("my-site", an app "Hello" with a `name` parameter)."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def jobs_example() -> str:
    section = PAGE.read_text().split("\n## Jobs\n", 1)[1]
    return re.search(r"```python\n(.*?)\n```", section, re.DOTALL).group(1)


@pytest.fixture
def hello_app(balsam_env, tmp_path):
    from balsam._api.app import ApplicationDefinition
    from balsam._api.model import reset_default_client
    from balsam.api import Site

    reset_default_client()
    ApplicationDefinition.clear_cache()
    (tmp_path / "my-site" / "data").mkdir(parents=True)
    Site.objects.create(name="my-site", path=str(tmp_path / "my-site"))

    class Hello(ApplicationDefinition):
        site = "my-site"
        command_template = "echo Hello, {{ name }}!"

    Hello.sync()
    yield Hello
    reset_default_client()
    ApplicationDefinition.clear_cache()


def test_the_jobs_example_runs_as_written(hello_app):
    from balsam.api import Job

    namespace: dict = {"Job": Job}
    exec(compile(jobs_example(), "docs/api.md (Jobs)", "exec"), namespace)
    job = Job.objects.get(id=namespace["job"].id)
    assert (job.workdir.as_posix(), job.app_id, job.threads_per_rank) == ("demo/1", hello_app.__app_id__, 1)


def test_its_transfers_line_is_refused_without_the_slot_it_needs(hello_app):
    # what the comment in the example says: an app without an "input" slot cannot take it
    from balsam.api import Job
    from balsam.client import APIError

    job = Job(workdir="demo/2", app_id="Hello", site_name="my-site", parameters={"name": "world"},
              transfers={"input": "laptop:/home/me/input.dat"})
    with pytest.raises(APIError) as info:
        job.save()
    assert info.value.status_code == 422
