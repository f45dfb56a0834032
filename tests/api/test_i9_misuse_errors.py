"""One-line errors naming the field for two misuses that raised Python internals: a dict field
given a non-dict (``app.submit(..., tags="x")``: ``AttributeError: 'str' object has no attribute
'items'``, no field named) and ``order_by`` given a list (``'list' object has no attribute
'lstrip'``). Through the live server's Python API where a request is involved."""

from __future__ import annotations

import uuid
from typing import Any

import pytest


@pytest.fixture
def app(balsam_env: Any, tmp_path: Any) -> Any:
    from balsam.api import ApplicationDefinition, Site

    name = f"site-{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    site = Site.objects.create(name=name, path=str(tmp_path / name))
    cls = type("Misuse", (ApplicationDefinition,), {"site": site.name, "command_template": "echo {{ n }}"})
    cls.sync()
    return cls


@pytest.mark.parametrize("field, value", [("tags", "experiment:x1"), ("data", 5), ("launch_params", ["-n", "2"])])
def test_dict_field_given_a_non_dict_names_it(app: Any, field: str, value: Any) -> None:
    from balsam.api import Job

    with pytest.raises(ValueError, match=rf"^Job\.{field}: expected a dict, got {type(value).__name__} ") as info:
        app.submit("w/0", n=1, **{field: value})
    assert "\n" not in str(info.value)
    job = app.submit("w/1", n=1)
    with pytest.raises(ValueError, match=rf"^Job\.{field}: expected a dict"):
        setattr(job, field, value)
    with pytest.raises(ValueError, match=rf"^Job\.{field}: expected a dict"):
        Job.objects.filter(id=job.id).update(**{field: value})
    assert Job.objects.get(id=job.id).tags == {}


def test_batch_job_and_site_dict_fields(app: Any) -> None:
    from balsam.api import BatchJob, Site

    site = Site.objects.get(name=app.site)
    with pytest.raises(ValueError, match=r"^BatchJob\.filter_tags: expected a dict, got str"):
        BatchJob(site_id=site.id, project="p", queue="debug", num_nodes=1, wall_time_min=5, job_mode="mpi",
                 filter_tags="experiment=x1")
    with pytest.raises(ValueError, match=r"^Site\.allowed_queues: expected a dict, got list"):
        site.allowed_queues = ["debug"]


def test_order_by_a_list_is_a_type_error_naming_it(app: Any) -> None:
    from balsam.api import Job

    app.submit("w/2", n=1)
    with pytest.raises(TypeError, match=r"^Job\.objects\.order_by\(\) takes one field name .* got list \['-id'\]"):
        Job.objects.order_by(["-id"])
    assert [j.workdir.as_posix() for j in Job.objects.order_by("-id")] == ["w/2"]
