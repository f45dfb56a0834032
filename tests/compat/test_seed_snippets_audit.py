"""Snippets a Balsam 0.7 (and 0.x) user brings, run as written against the live server.

- ``Job.objects.create(workdir, app_id, ...)``: Balsam 0.7's generated ``create()`` took the
  constructor's arguments, positional ones too; ``Job(workdir, app_id)`` worked here but the
  manager's ``create()`` took keywords only (``TypeError: Manager.create() takes 1 positional
  argument but 3 were given``).
- The 0.x README's lines ``balsam app --name SayHello --executable "echo hello,"`` then ``balsam job
  --name hi --workflow test --application SayHello --args 'world!' --yes``: the first hint writes
  an app whose template takes ``{{ args }}``, the second said ``-p NAME=VALUE`` (a placeholder that
  fails as given); it now names ``-p args='world!'``, and the line it prints creates the job.
- ``Job(app_id="Hello", site_name="my-sit", ...)`` with a misspelt site said ``no app named 'Hello'
  at site 'my-sit': sync() its ApplicationDefinition first``, advice that cannot work (the sync
  fails on the same name): it now names the site as the unknown one. Still ``App.DoesNotExist``
  (what 0.7 raised), still a ``ValueError``.
- ``Job.objects.bulk_create(Job(...) for i in range(n))`` (a generator where the docs' snippets
  have a list) returned ``[]`` and created nothing: the type checks used the generator up before
  the jobs were listed. ``Job.objects.bulk_refresh(j for j in jobs)`` likewise refreshed nothing.
- ``jobs = [Job(...), ...]; Job.objects.bulk_create(jobs); Job.objects.wait(jobs)`` (or
  ``as_completed(jobs)``, or ``job.result()`` of a job never saved): bulk_create leaves the given
  objects unsaved (as 0.7 did), and waiting on them polled jobs without ids for ever (until the
  timeout, if any). It now raises at once, as ``done()`` does, saying what to wait on instead.
"""

from __future__ import annotations

import shlex
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner


@pytest.fixture(autouse=True)
def _fresh_api_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """No site from the environment or the working directory, no client or app class cached."""
    from balsam._api.app import ApplicationDefinition
    from balsam._api.model import reset_default_client

    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    reset_default_client()
    ApplicationDefinition.clear_cache()
    yield
    reset_default_client()


@pytest.fixture
def site(balsam_env: Any, tmp_path: Path) -> Any:
    from balsam.api import Site

    name = f"site-{uuid.uuid4().hex[:8]}"
    (tmp_path / name / "data").mkdir(parents=True)
    return Site.objects.create(name=name, path=str(tmp_path / name))


def _balsam(*args: str) -> Any:
    from balsam.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_job_objects_create_takes_workdir_and_app_id_positionally(site: Any) -> None:
    from balsam.api import ApplicationDefinition, Job

    site_name = site.name  # a class body does not see the function's names it assigns itself

    class Hello(ApplicationDefinition):
        site = site_name
        command_template = "echo Hello, {{ name }}!"

    Hello.sync()
    job = Job.objects.create("hello/1", Hello.__app_id__, parameters={"name": "world"}, tags={"k": "v"})
    stored = Job.objects.get(id=job.id)
    assert (str(stored.workdir), stored.app_id, stored.tags) == ("hello/1", Hello.__app_id__, {"k": "v"})
    assert stored.get_parameters() == {"name": "world"}


def test_the_0x_readme_lines_get_hints_that_work_together(site: Any) -> None:
    from balsam.api import ApplicationDefinition, Job

    app_hint = _balsam("app", "--name", "SayHello", "--executable", "echo hello,")
    assert app_hint.exit_code == 2
    assert "command_template = 'echo hello, {{ args }}'" in app_hint.output, app_hint.output

    job_hint = _balsam("job", "--name", "hi", "--workflow", "test", "--application", "SayHello",
                       "--args", "world!", "--yes")
    assert job_hint.exit_code == 2
    line = next(ln.strip() for ln in job_hint.output.splitlines() if ln.strip().startswith("balsam job create"))
    assert "-p args='world!'" in line, job_hint.output

    # The app as the first hint writes it, then the second hint's line as printed (plus the site).
    site_name = site.name

    class SayHello(ApplicationDefinition):
        site = site_name
        command_template = "echo hello, {{ args }}"

    SayHello.sync()
    created = _balsam(*shlex.split(line)[1:], "--site", site.name)
    assert created.exit_code == 0, created.output
    job = Job.objects.get(workdir__contains="hi", site_id=site.id)
    assert (job.tags, job.get_parameters()) == ({"workflow": "test"}, {"args": "world!"})


def test_a_misspelt_site_name_of_a_job_is_named_as_the_unknown_site(site: Any) -> None:
    from balsam.api import ApplicationDefinition, Job
    from balsam._api.models import App

    site_name = site.name

    class Hello(ApplicationDefinition):
        site = site_name
        command_template = "echo Hello, {{ name }}!"

    Hello.sync()
    typo = site_name + "x"
    with pytest.raises(App.DoesNotExist, match=rf"^no site named '{typo}' \(site_name= of app 'Hello'; see `balsam site ls`\)$"):
        Job(app_id="Hello", site_name=typo, workdir="w/1", parameters={"name": "a"})
    # A wrong app name at a real site keeps its own message (and its ValueError side).
    with pytest.raises(ValueError, match=rf"^no app named 'Helo' at site '{site_name}': sync\(\) its"):
        Job(app_id="Helo", site_name=site_name, workdir="w/2", parameters={"name": "a"})


def test_bulk_create_takes_a_generator(site: Any) -> None:
    from balsam.api import ApplicationDefinition, Job

    site_name = site.name

    class Hello(ApplicationDefinition):
        site = site_name
        command_template = "echo Hello, {{ name }}!"

    Hello.sync()
    created = Job.objects.bulk_create(
        Job(app_id="Hello", site_name=site_name, workdir=f"gen/{i}", parameters={"name": str(i)}) for i in range(3))
    assert [str(j.workdir) for j in created] == ["gen/0", "gen/1", "gen/2"]
    assert Job.objects.filter(site_id=site.id, workdir__contains="gen/").count() == 3


def test_bulk_refresh_takes_a_generator(site: Any) -> None:
    from balsam.api import ApplicationDefinition, Job

    site_name = site.name

    class Hello(ApplicationDefinition):
        site = site_name
        command_template = "echo Hello, {{ name }}!"

    Hello.sync()
    created = Job.objects.bulk_create(
        [Job(app_id="Hello", site_name=site_name, workdir=f"ref/{i}", parameters={"name": str(i)}) for i in range(3)])
    Job.objects.filter(id=[j.id for j in created]).update(data={"seen": 1})
    Job.objects.bulk_refresh(j for j in created)
    assert [j.data for j in created] == [{"seen": 1}] * 3


def test_waiting_on_jobs_never_saved_says_so_at_once(site: Any) -> None:
    from balsam.api import ApplicationDefinition, Job

    site_name = site.name

    class Hello(ApplicationDefinition):
        site = site_name
        command_template = "echo Hello, {{ name }}!"

    Hello.sync()
    given = [Job(app_id="Hello", site_name=site_name, workdir=f"unsaved/{i}", parameters={"name": "a"}) for i in range(2)]
    created = Job.objects.bulk_create(given)
    message = r"^cannot wait for 2 Job\(s\) never saved \(the first: workdir='unsaved/0'\): .*bulk_create\(\) returns"
    with pytest.raises(AttributeError, match=message):
        Job.objects.wait(given, timeout=0.5)
    with pytest.raises(AttributeError, match=message):
        next(iter(Job.objects.as_completed(given, timeout=0.5)))
    with pytest.raises(AttributeError, match=r"^cannot wait for 1 Job\(s\) never saved"):
        given[0].result(timeout=0.5)
    # The returned jobs are saved: waiting on them is a plain timeout while no launcher runs them.
    waited = Job.objects.wait(created, timeout=0.2, poll_interval=0.1)
    assert [j.id for j in waited.not_done] == [j.id for j in created]
