"""Snippets a Balsam 0.7 (and 0.x) user brings, run as written against the live server.

- ``Job.objects.create(workdir, app_id, ...)``: Balsam 0.7's generated ``create()`` took the fields
  it required positionally, in its order (``Site (name, path)``, ``BatchJob (num_nodes,
  wall_time_min, job_mode, site_id, project, queue)``, ...); the manager's ``create()`` took
  keywords only (``TypeError: Manager.create() takes 1 positional argument but 3 were given``).
  The order of 0.7's optional fields is not known here: more positionals are a TypeError naming
  the keywords, never a value bound to another field.
- The 0.x README's lines ``balsam app --name SayHello --executable "echo hello,"`` then ``balsam job
  --name hi --workflow test --application SayHello --args 'world!' --yes``: the first hint writes
  an app whose template takes ``{{ args }}``, the second said ``-p NAME=VALUE`` (a placeholder that
  fails as given); it now names ``-p 'args=world!'``, and the line it prints creates the job. A -p
  value is one shell-quoted argument, where 0.x's ``--args "world $i"`` gave the program two: an
  --args of several words becomes one parameter per word, with the template that takes them. The
  printed line quotes every value (``--workflow "my wf"`` printed a line that exits 2).
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
  timeout, if any). It now raises at once (``as_completed()`` at the call, not at the first
  ``next()``), as ``done()`` does, saying what to wait on instead.
- ``Site("n", "/p")``, ``BatchJob(2, 10, "mpi", ...)``, ``Session(site_id)``: 0.7's constructors took
  the positionals its ``create()`` did; they said ``BalsamModel.__init__() takes 1 positional
  argument``. The 0.x job hint: ``--url-in URL`` printed ``-s SLOT=ALIAS:/path URL`` (a line that
  exits 2), a repeated ``--args`` gave both, ``--args --yes`` took ``--yes`` as the value, an empty
  ``--args`` gave the program one empty argument, ``--application say-hello`` named no class the
  app hint writes (``sayhello``).
"""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "cli"))

from cli_test_utils import balsam, fresh_api_state  # noqa: F401, E402 (fresh_api_state: autouse; tests/cli)


@pytest.fixture
def site(balsam_env: Any, tmp_path: Path) -> Any:
    from balsam.api import Site

    name = f"site-{uuid.uuid4().hex[:8]}"
    (tmp_path / name / "data").mkdir(parents=True)
    return Site.objects.create(name=name, path=str(tmp_path / name))


@pytest.fixture
def hello(site: Any) -> Any:
    """A synced template app ``Hello`` at ``site``."""
    from balsam.api import ApplicationDefinition

    site_name = site.name  # a class body does not see the function's names it assigns itself

    class Hello(ApplicationDefinition):
        site = site_name
        command_template = "echo Hello, {{ name }}!"

    Hello.sync()
    return Hello


def _hint_line(output: str) -> str:
    return next(ln.strip() for ln in output.splitlines() if ln.strip().startswith("balsam "))


def test_job_objects_create_takes_workdir_and_app_id_positionally(hello: Any) -> None:
    from balsam.api import Job

    job = Job.objects.create("hello/1", hello.__app_id__, parameters={"name": "world"}, tags={"k": "v"})
    stored = Job.objects.get(id=job.id)
    assert (str(stored.workdir), stored.app_id, stored.tags) == ("hello/1", hello.__app_id__, {"k": "v"})
    assert stored.get_parameters() == {"name": "world"}


def test_objects_create_takes_the_fields_0_7_required_positionally_in_its_order(site: Any, hello: Any,
                                                                                  tmp_path: Path) -> None:
    from balsam.api import BatchJob, Job, Site
    from balsam._api.models import EventLog

    other = Site.objects.create(f"s-{uuid.uuid4().hex[:6]}", str(tmp_path))
    assert Site.objects.get(id=other.id).path == tmp_path
    # 0.7's order (num_nodes first), not this project's record order (site_id first).
    batch = BatchJob.objects.create(2, 10, "mpi", site.id, "proj", "debug")
    stored = BatchJob.objects.get(id=batch.id)
    assert (stored.num_nodes, stored.wall_time_min, stored.job_mode, stored.site_id, stored.project,
            stored.queue) == (2, 10, "mpi", site.id, "proj", "debug")
    # 0.7's third positional of Job is not known for sure: refused, naming the keywords; nothing created.
    with pytest.raises(TypeError, match=r"^Job\.objects\.create\(\) takes at most 2 positional field\(s\): "
                                        r"workdir, app_id \(those Balsam 0\.7 took first, in its order\); got 3: give "
                                        r"the others by keyword \(site_name=\.\.\., parameters=\.\.\., .*tags=\.\.\."):
        Job.objects.create("w/3", hello.__app_id__, {"k": "v"})
    with pytest.raises(TypeError, match=r"^Site\.objects\.create\(\) got name both positionally and by keyword$"):
        Site.objects.create("a", name="b", path=str(tmp_path))
    assert Job.objects.filter(site_id=site.id).count() == 0
    # The model that cannot be created says so first.
    with pytest.raises(TypeError, match=r"^EventLog records are created by the server, not by the API$"):
        EventLog.objects.create(1)


def test_model_constructors_take_the_positionals_create_takes(tmp_path: Path) -> None:
    """0.7's generated ``__init__`` took the fields its ``create()`` did (no server needed)."""
    from balsam.api import BatchJob, Job, Site
    from balsam._api.models import Session

    assert (Site("n", str(tmp_path)).name, Site("n", str(tmp_path)).path) == ("n", tmp_path)
    batch = BatchJob(2, 10, "mpi", 1, "proj", "q")
    assert (batch.num_nodes, batch.wall_time_min, batch.job_mode, batch.site_id, batch.project, batch.queue) == (
        2, 10, "mpi", 1, "proj", "q")
    assert (Session(1).site_id, Session(1, 7).batch_job_id) == (1, 7)
    with pytest.raises(TypeError, match=r"^Session\(\) takes at most 2 positional field\(s\): site_id, batch_job_id "
                                        r"\(those Balsam 0\.7 took first, in its order\); got 3$"):
        Session(1, 2, 3)
    with pytest.raises(TypeError, match=r"^Site\(\) got name both positionally and by keyword$"):
        Site("a", name="b")
    # Job keeps its own constructor; its third positional is refused the same way, naming Job(). The
    # keywords offered are a user's, not the launcher's (serialized_*, state, return_code, ...).
    with pytest.raises(TypeError, match=r"^Job\(\) takes at most 2 positional field\(s\): workdir, app_id .*"
                                        r"\(site_name=\.\.\., parameters=\.\.\., transfers=\.\.\., data=") as refused:
        Job("w", 1, {"k": "v"})
    for internal in ("serialized_", "state=", "return_code=", "batch_job_id=", "pending_file_cleanup="):
        assert internal not in str(refused.value)
    with pytest.raises(TypeError, match=r"^BatchJob\(\) takes at most 6 .*\(filter_tags=\.\.\., optional_params=\.\.\., "
                                        r"partitions=\.\.\.\)$"):
        BatchJob(2, 10, "mpi", 1, "proj", "q", "x")


def test_app_and_session_objects_create_take_0_7_positionals(site: Any, hello: Any) -> None:
    from balsam.api import BatchJob
    from balsam._api.models import App, Session

    stored = App.objects.get(id=hello.__app_id__)
    app = App.objects.create(site.id, "Other", stored.serialized_class, stored.source_code)
    assert (App.objects.get(id=app.id).name, App.objects.get(id=app.id).site_id) == ("Other", site.id)
    batch = BatchJob.objects.create(1, 5, "mpi", site.id, "proj", "debug")
    session = Session.objects.create(site.id, batch.id)
    assert (session.site_id, session.batch_job_id) == (site.id, batch.id)
    session.delete()


def test_0x_job_hint_options_translate_as_0x_argparse_read_them(site: Any) -> None:
    """The app hint without --executable, then a job hint with a name that is no identifier, a
    repeated --args (the last counts), a stage-in URL (a note: the line still runs) and a value
    that looks like an option (no value: argparse refused it)."""
    from balsam.api import ApplicationDefinition, Job

    app_hint = balsam("app", "--name", "say-hello")
    assert "class sayhello(ApplicationDefinition):" in app_hint.output, app_hint.output
    assert "command_template = 'my-program {{ args }}'" in app_hint.output, app_hint.output
    job_hint = balsam("job", "--name", "st", "--application", "say-hello", "--args", "a b", "--url-in",
                       "globus://ep/in.dat", "--args", "c", "--yes")
    line = _hint_line(job_hint.output)
    assert line == "balsam job create -w st -a sayhello -p args=c -y", job_hint.output
    assert ("Note: stage-in is `-s SLOT=ALIAS:/path`: the app's transfer slot and an alias of the site's "
            "transfer_locations (docs/transfers.md); the 0.x URL given: globus://ep/in.dat") in job_hint.output
    site_name = site.name

    class sayhello(ApplicationDefinition):  # noqa: N801 (the name the hint writes)
        site = site_name
        command_template = "printf [%s] {{ args }}"

    sayhello.sync()
    created = balsam(*shlex.split(line)[1:], "--site", site.name)
    assert created.exit_code == 0, (line, created.output)
    assert Job.objects.get(workdir__contains="st", site_id=site.id).get_parameters() == {"args": "c"}

    refused = balsam("job", "--name", "n", "--application", "A", "--args", "--yes")
    assert _hint_line(refused.output) == "balsam job create -w n -a A -y", refused.output
    assert ("(no value for --args: 0.x refused this line too, \"expected one argument\"; a value that starts "
            "with - is given as --args=VALUE)") in refused.output
    # An empty --args gave the program no argument: no -p args (which would give it one, '').
    empty = balsam("job", "--name", "e", "--application", "A", "--args", "  ", "--yes")
    assert _hint_line(empty.output) == "balsam job create -w e -a A -y", empty.output
    assert "--args is empty: no -p args; the app's command_template must not contain `{{ args }}`" in empty.output
    shell = balsam("job", "--name", "v", "--application", "A", "--args", "$HOME/in.dat")
    assert "A -p value is passed literally: $VARIABLES, globs and ; | & in it are not expanded" in shell.output


def test_the_0x_readme_lines_get_hints_that_work_together(site: Any) -> None:
    from balsam.api import ApplicationDefinition, Job

    app_hint = balsam("app", "--name", "SayHello", "--executable", "echo hello,")
    assert app_hint.exit_code == 2
    assert "command_template = 'echo hello, {{ args }}'" in app_hint.output, app_hint.output

    job_hint = balsam("job", "--name", "hi", "--workflow", "test", "--application", "SayHello",
                       "--args", "world!", "--yes")
    assert job_hint.exit_code == 2
    line = _hint_line(job_hint.output)
    assert "-p 'args=world!'" in line and "arg1" not in job_hint.output, job_hint.output

    # The app as the first hint writes it, then the second hint's line as printed (plus the site).
    site_name = site.name

    class SayHello(ApplicationDefinition):
        site = site_name
        command_template = "echo hello, {{ args }}"

    SayHello.sync()
    created = balsam(*shlex.split(line)[1:], "--site", site.name)
    assert created.exit_code == 0, created.output
    job = Job.objects.get(workdir__contains="hi", site_id=site.id)
    assert (job.tags, job.get_parameters()) == ({"workflow": "test"}, {"args": "world!"})


def test_0x_args_of_several_words_reach_the_program_as_separate_words(site: Any) -> None:
    """0.x's README loop: ``--args "world $i"`` gave the program two arguments; ``-p args='world 1'``
    gives it one (every -p value is rendered shell-quoted)."""
    from balsam.api import ApplicationDefinition, Job

    app_hint = balsam("app", "--name", "Prog", "--executable", "printf [%s]")
    template = next(ln for ln in app_hint.output.splitlines() if "command_template" in ln).split(" = ", 1)[1]
    job_hint = balsam("job", "--name", "run1", "--application", "Prog", "--args", "world 1", "--yes")
    # The hint names the template the words need, in place of the app hint's {{ args }}.
    words = job_hint.output.split("command_template takes `", 1)[1].split("`", 1)[0]
    followed = ast.literal_eval(template).replace("{{ args }}", words)
    assert followed == "printf [%s] {{ arg1 }} {{ arg2 }}", job_hint.output
    site_name = site.name

    class Prog(ApplicationDefinition):
        site = site_name
        command_template = followed

    Prog.sync()
    created = balsam(*shlex.split(_hint_line(job_hint.output))[1:], "--site", site.name)
    assert created.exit_code == 0, created.output
    cmd = Prog(Job.objects.get(workdir__contains="run1", site_id=site.id)).get_arg_str()
    assert cmd == "printf [%s] world 1"
    run = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=10)
    assert run.stdout == "[world][1]"  # as 0.x ran `printf [%s] world 1`


def test_0x_option_values_with_spaces_print_a_line_that_runs(site: Any) -> None:
    from balsam.api import ApplicationDefinition, Job

    job_hint = balsam("job", "--name", "sp", "--workflow", "my wf", "--application", "Say", "--args", "'hello world'",
                       "--cpu-affinity", "depth 2", "--yes")
    line = _hint_line(job_hint.output)
    site_name = site.name

    class Say(ApplicationDefinition):
        site = site_name
        command_template = "echo {{ args }}"

    Say.sync()
    created = balsam(*shlex.split(line)[1:], "--site", site.name)
    assert created.exit_code == 0, (line, created.output)
    job = Job.objects.get(workdir__contains="sp", site_id=site.id)
    # 0.x's shell read the quoted --args as one word: one parameter, one argument.
    assert (job.tags, job.launch_params, job.get_parameters()) == (
        {"workflow": "my wf"}, {"cpu_bind": "depth 2"}, {"args": "hello world"})
    # The other 0.x lines that carry a value into a KEY=VALUE option.
    assert shlex.split(_hint_line(balsam("ls", "--wf", "my wf").output))[-2:] == ["-t", "workflow=my wf"]
    submit = balsam("submit-launch", "--wf-filter", "a;b", "-n", "1")
    assert shlex.split(_hint_line(submit.output))[3:5] == ["--tag", "workflow=a;b"], submit.output


def test_a_misspelt_site_name_of_a_job_is_named_as_the_unknown_site(site: Any, hello: Any) -> None:
    from balsam.api import Job
    from balsam._api.models import App

    site_name = site.name
    typo = site_name + "x"
    with pytest.raises(App.DoesNotExist, match=rf"^no site named '{typo}' \(site_name= of app 'Hello'; see `balsam site ls`\)$"):
        Job(app_id="Hello", site_name=typo, workdir="w/1", parameters={"name": "a"})
    # A wrong app name at a real site keeps its own message (and its ValueError side).
    with pytest.raises(ValueError, match=rf"^no app named 'Helo' at site '{site_name}': sync\(\) its"):
        Job(app_id="Helo", site_name=site_name, workdir="w/2", parameters={"name": "a"})


def test_bulk_create_takes_a_generator(site: Any, hello: Any) -> None:
    from balsam.api import Job

    site_name = site.name
    created = Job.objects.bulk_create(
        Job(app_id="Hello", site_name=site_name, workdir=f"gen/{i}", parameters={"name": str(i)}) for i in range(3))
    assert [str(j.workdir) for j in created] == ["gen/0", "gen/1", "gen/2"]
    assert Job.objects.filter(site_id=site.id, workdir__contains="gen/").count() == 3


def test_bulk_refresh_takes_a_generator(site: Any, hello: Any) -> None:
    from balsam.api import Job

    site_name = site.name
    created = Job.objects.bulk_create(
        [Job(app_id="Hello", site_name=site_name, workdir=f"ref/{i}", parameters={"name": str(i)}) for i in range(3)])
    Job.objects.filter(id=[j.id for j in created]).update(data={"seen": 1})
    Job.objects.bulk_refresh(j for j in created)
    assert [j.data for j in created] == [{"seen": 1}] * 3


def test_waiting_on_jobs_never_saved_says_so_at_once(site: Any, hello: Any) -> None:
    from balsam.api import Job

    site_name = site.name
    given = [Job(app_id="Hello", site_name=site_name, workdir=f"unsaved/{i}", parameters={"name": "a"}) for i in range(2)]
    created = Job.objects.bulk_create(given)
    message = r"^cannot wait for 2 Job\(s\) never saved \(the first: workdir='unsaved/0'\): .*bulk_create\(\) returns"
    with pytest.raises(AttributeError, match=message):
        Job.objects.wait(given, timeout=0.5)
    with pytest.raises(AttributeError, match=message):
        Job.objects.as_completed(given, timeout=0.5)  # at the call, not at the first next()
    with pytest.raises(AttributeError, match=r"^cannot wait for 1 Job\(s\) never saved"):
        given[0].result(timeout=0.5)
    # The returned jobs are saved: waiting on them is a plain timeout while no launcher runs them.
    waited = Job.objects.wait(created, timeout=0.2, poll_interval=0.1)
    assert [j.id for j in waited.not_done] == [j.id for j in created]
