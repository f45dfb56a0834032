"""ApplicationDefinition: templates, run() apps, serialization, loading, hooks, futures API."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import pickle
import shlex
import subprocess
import sys
import textwrap

import pytest


def _job_stub(params, **fields):
    """A Job record as the launcher would see it (not saved), for rendering tests."""
    from balsam.api import Job

    job = Job._from_api({"id": 7, "workdir": "w", "app_id": 1, "serialized_parameters": "", **fields})
    job._record.serialized_parameters = __import__("balsam._api.codec", fromlist=["x"]).serialize(params)
    return job


# ----------------------------------------------------------------------------------------- class checks
def test_class_validation_messages():
    from balsam.api import ApplicationDefinition

    with pytest.raises(AttributeError, match="must set `site`"):
        type("NoSite", (ApplicationDefinition,), {"command_template": "echo"})
    with pytest.raises(AttributeError, match="must not define both"):
        type("Both", (ApplicationDefinition,), {"site": 1, "command_template": "echo", "run": lambda self: 1})
    with pytest.raises(AttributeError, match="must define a `command_template` or a `run"):
        type("Neither", (ApplicationDefinition,), {"site": 1})
    with pytest.raises(AttributeError, match=r"do not appear in command_template"):
        type("Extra", (ApplicationDefinition,), {"site": 1, "command_template": "echo {{a}}",
                                                 "parameters": {"b": {"required": True}}})
    with pytest.raises(AttributeError, match="must set 'required'"):
        type("NoReq", (ApplicationDefinition,), {"site": 1, "command_template": "echo {{a}}", "parameters": {"a": {}}})
    with pytest.raises(AttributeError, match="needs a 'default'"):
        type("NoDefault", (ApplicationDefinition,), {"site": 1, "command_template": "echo {{a}}",
                                                     "parameters": {"a": {"required": False}}})
    with pytest.raises(AttributeError, match="Python identifier"):
        type("BadVar", (ApplicationDefinition,), {"site": 1, "command_template": "echo {{ a-b }}"})
    with pytest.raises(TypeError, match="must take `self`"):
        type("NoSelf", (ApplicationDefinition,), {"site": 1, "run": staticmethod(lambda x: x).__func__})


def test_template_rendering_defaults_quoting_and_environment(monkeypatch):
    from balsam.api import ApplicationDefinition

    class Sim(ApplicationDefinition):
        """Runs the simulator."""

        site = 1
        command_template = "sim --input {{ inp }} --steps {{ steps }} {{ flag }}"
        parameters = {"steps": {"required": False, "default": "10", "help": "number of steps"},
                      "flag": {"required": False, "default": "", "help": "extra flag"}}
        environment_variables = {"SIM_MODE": "fast"}
        cleanup_files = ["*.tmp"]
        python_exe = "/usr/bin/python3"

    assert Sim.parameters["inp"] == {"required": True, "default": None, "help": ""}
    job = _job_stub({"inp": "my file; rm -rf /"}, threads_per_rank=4)
    app = Sim(job)
    cmd = app.get_arg_str()
    assert cmd == "sim --input 'my file; rm -rf /' --steps 10 ''"
    assert shlex.split(cmd)[2] == "my file; rm -rf /"
    env = app.get_environ_vars()
    assert env["SIM_MODE"] == "fast" and env["BALSAM_JOB_ID"] == "7" and env["OMP_NUM_THREADS"] == "4"
    assert env["PATH"] == os.environ["PATH"]
    # The launcher's environment as os.environ has it, undecodable bytes (surrogates) and changes included.
    monkeypatch.setenv("BALSAM_TEST_\udcff", "v\udcfe")
    monkeypatch.delenv("PATH")
    env = app.get_environ_vars()
    assert env["BALSAM_TEST_\udcff"] == "v\udcfe" and "PATH" not in env
    assert {k: v for k, v in env.items() if k not in ("SIM_MODE", "BALSAM_JOB_ID", "OMP_NUM_THREADS")} == {
        k: v for k, v in os.environ.items() if k not in ("SIM_MODE", "BALSAM_JOB_ID", "OMP_NUM_THREADS")}
    monkeypatch.undo()
    # Always exported, as in Balsam 0.7: 1 for a one-thread job, even if the launcher inherited another value.
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    assert Sim(_job_stub({"inp": "x"}, threads_per_rank=1)).get_environ_vars()["OMP_NUM_THREADS"] == "1"
    monkeypatch.setattr(Sim, "environment_variables", {"OMP_NUM_THREADS": "2"})  # the app's own value wins
    assert Sim(_job_stub({"inp": "x"}, threads_per_rank=4)).get_environ_vars()["OMP_NUM_THREADS"] == "2"
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"missing required parameters \['inp'\]"):
        Sim(_job_stub({})).get_arg_str()
    assert Sim.cleanup_files == ["*.tmp"] and Sim.python_exe == "/usr/bin/python3"

    class FastSim(Sim):  # a subclass keeps the declared defaults and attributes
        pass

    assert FastSim(job).get_arg_str() == "sim --input 'my file; rm -rf /' --steps 10 ''"
    assert FastSim.environment_variables == {"SIM_MODE": "fast"}
    assert "class Sim" in Sim.source_code


def test_default_hooks():
    from balsam.api import ApplicationDefinition, JobState

    class Hooked(ApplicationDefinition):
        site = 1
        command_template = "true"

    job = _job_stub({})
    app = Hooked(job)
    for hook, state in [("preprocess", JobState.preprocessed), ("postprocess", JobState.postprocessed),
                        ("handle_timeout", JobState.restart_ready), ("handle_error", JobState.failed)]:
        getattr(app, hook)()
        assert job.state == state
    assert app.shell_preamble() == []


def test_run_app_parameters_from_signature():
    from balsam.api import ApplicationDefinition

    class Fit(ApplicationDefinition):
        site = 1

        def run(self, x: float, degree: int = 2, *args, **kwargs):
            return x

    assert Fit.parameters == {"x": {"required": True, "default": None, "help": "float"},
                              "degree": {"required": False, "default": 2, "help": "int"}}
    assert Fit._accepts_any_params  # run(**kwargs) takes any parameter in submit()


# ----------------------------------------------------------------------------------------- sync / load
def test_sync_update_rename_and_loaders(site):
    from balsam.api import App, ApplicationDefinition

    site_name, site_id = site.name, site.id

    class Echo(ApplicationDefinition):
        site = site_name
        command_template = "echo {{ msg }}"

    Echo.sync()
    first_id = Echo.__app_id__
    assert App.objects.get(id=first_id).description == ""
    Echo.command_template = "echo changed {{ msg }}"
    Echo.sync()  # same (site, name): updated in place
    assert Echo.__app_id__ == first_id and App.objects.count() == 1

    class Echo2(ApplicationDefinition):
        """Renamed echo."""

        site = site_id
        command_template = "echo {{ msg }} twice"

    Echo2.sync(rename_from="Echo")
    assert Echo2.__app_id__ == first_id
    assert App.objects.get(id=first_id).name == "Echo2" and App.objects.get(id=first_id).description == "Renamed echo."

    ApplicationDefinition.clear_cache()
    by_site = ApplicationDefinition.load_by_site(site.name)
    assert list(by_site) == ["Echo2"]
    loaded = by_site["Echo2"]
    assert loaded is not Echo2 and issubclass(loaded, ApplicationDefinition)
    assert loaded.__app_id__ == first_id and loaded.command_template == "echo {{ msg }} twice"
    assert ApplicationDefinition.load_by_site(site.id).keys() == {"Echo2"}
    assert ApplicationDefinition.load_by_site(site)["Echo2"].__app_id__ == first_id
    assert ApplicationDefinition.load_by_name("Echo2", site.name).__app_id__ == first_id
    assert ApplicationDefinition.load_by_id(first_id).__app_id__ == first_id
    record = App.objects.get(id=first_id)
    from_dict = ApplicationDefinition.from_serialized(record.display_dict())
    assert from_dict.__app_id__ == first_id
    with pytest.raises(ValueError, match="no site named"):
        type("Lost", (ApplicationDefinition,), {"site": "no-such-site", "command_template": "true"}).sync()
    from balsam.api import Site

    with pytest.raises(Site.DoesNotExist, match="no site named"):  # what Balsam 0.7 let through
        type("Lost2", (ApplicationDefinition,), {"site": "no-such-site", "command_template": "true"}).sync()


def test_balsam_07_app_classes_and_submits_still_work(site, caplog):
    """Balsam 0.7 took parameter keys beyond required/default/help (its server dropped them) and
    stored a shell app's unknown submit() parameters with the job (libEnsemble passes a whole
    app_args dict): both work here, each said once in the log; a run() app still refuses a
    parameter run() does not take (it would fail on the compute node)."""
    from balsam.api import ApplicationDefinition

    site_name = site.name

    class Sim(ApplicationDefinition):
        site = site_name
        command_template = "sim --n {{ n }}"
        parameters = {"n": {"required": True, "help": "steps", "type": "int", "choices": [1, 2]}}

    assert "keys ['choices', 'type'] are not used" in caplog.text
    assert Sim.parameters == {"n": {"required": True, "default": None, "help": "steps"}}
    caplog.clear()
    jobs = [Sim.submit(workdir=f"sim/{i}", n=i, extra="x", save=False) for i in range(3)]
    assert [j.get_parameters() for j in jobs] == [{"n": i, "extra": "x"} for i in range(3)]
    assert caplog.text.count("parameters ['extra'] are not in its command template") == 1
    assert Sim(jobs[1]).get_arg_str() == "sim --n 1"

    class Py(ApplicationDefinition):
        site = site_name

        def run(self, n):
            return n

    with pytest.raises(TypeError, match=r"unknown app parameters \['extra'\]"):
        Py.submit(workdir="py/1", n=1, extra="x", save=False)


def test_python_version_mismatch_fails_clearly(site):
    from balsam._api import codec
    from balsam.api import App, ApplicationDefinition

    site_name = site.name

    class Versioned(ApplicationDefinition):
        site = site_name
        command_template = "true"

    Versioned.sync()
    app = App.objects.get(id=Versioned.__app_id__)
    envelope = pickle.loads(base64.b64decode(app.serialized_class))
    assert envelope["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    envelope["python"] = "3.8"
    app.serialized_class = base64.b64encode(pickle.dumps(envelope)).decode()
    app.save()
    ApplicationDefinition.clear_cache()
    with pytest.raises(codec.DeserializeError, match=r"serialized with Python 3.8 but this is Python 3\.\d+"):
        ApplicationDefinition.load_by_id(app.id)


def test_prefetched_app_records_load_by_id_without_a_request(site, monkeypatch):
    from balsam._api import codec
    from balsam.api import App, ApplicationDefinition

    site_name = site.name

    class First(ApplicationDefinition):
        site = site_name
        command_template = "echo first"

    class Second(ApplicationDefinition):
        site = site_name
        command_template = "echo second"

    class Broken(ApplicationDefinition):
        site = site_name
        command_template = "true"

    First.sync()
    Second.sync()
    Broken.sync()
    broken = App.objects.get(id=Broken.__app_id__)
    broken.serialized_class = base64.b64encode(b"not a pickle").decode()
    broken.save()
    ApplicationDefinition.clear_cache()

    # One request for the site's apps; a record that cannot be deserialized does not fail it.
    assert ApplicationDefinition.prefetch_site(site.id) == 3
    gets = []
    real_get = App.objects.get
    monkeypatch.setattr(App.objects, "get", lambda **kw: gets.append(kw) or real_get(**kw))
    assert ApplicationDefinition.load_by_id(First.__app_id__).command_template == "echo first"
    assert ApplicationDefinition.load_by_id(Second.__app_id__).command_template == "echo second"
    # ...it fails when loaded, as it would have without the prefetch.
    with pytest.raises(codec.DeserializeError):
        ApplicationDefinition.load_by_id(Broken.__app_id__)
    assert gets == []

    # Beyond the limit, apps are fetched by id as before.
    ApplicationDefinition.clear_cache()
    assert ApplicationDefinition.prefetch_site(site.id, limit=1) == 1
    for app_cls in (First, Second):
        ApplicationDefinition.load_by_id(app_cls.__app_id__)
    assert len(gets) == 1


def test_apps_serialized_by_balsam_07_clients_load(site, tmp_path):
    """A 0.7 client stored base64(dill.dumps(cls, recurse=True)) of a class defined in a user script."""
    from balsam.api import App, ApplicationDefinition

    script = tmp_path / "old_client.py"
    script.write_text(textwrap.dedent(f"""
        import base64, sys, dill
        from balsam._api.app import ApplicationDefinition, AppType

        class Legacy(ApplicationDefinition):
            site = {site.id}
            def run(self, a, b=3):
                return a * b

        Legacy._app_type = AppType.PY_FUNC  # a 0.7 class carries these in its __dict__
        Legacy._default_params = {{"b": 3}}
        sys.stdout.write(base64.b64encode(dill.dumps(Legacy, recurse=True)).decode())
    """))
    payload = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    app = App.objects.create(site_id=site.id, name="Legacy", serialized_class=payload, source_code="",
                             parameters={"a": {"required": True}, "b": {"required": False, "default": "3"}})
    Legacy = ApplicationDefinition.load_by_id(app.id)
    assert Legacy.__name__ == "Legacy" and Legacy.parameters["b"]["default"] == 3
    assert Legacy(None).run(a=2) == 6  # type: ignore[arg-type]
    broken = App.objects.create(site_id=site.id, name="Broken", serialized_class=base64.b64encode(b"garbage").decode(),
                                source_code="")
    with pytest.raises(ValueError, match="serialized by a Balsam 0.7 client"):
        ApplicationDefinition.load_by_id(broken.id)


# ----------------------------------------------------------------------------------------- futures
def test_run_app_results_through_python_runner(site, run_jobs):
    """run() apps execute via ``python -m balsam._api.python_runner``; results come back as futures."""
    from balsam.api import ApplicationDefinition, Job

    site_name = site.name

    class Adder(ApplicationDefinition):
        site = site_name

        def run(self, x, y=1):
            print("adding", x, y)
            if y == "boom":
                raise ZeroDivisionError(f"cannot add {x!r} and {y!r}")
            return x + y

    Adder.sync()
    good = Adder.submit(workdir="add/1", x=2, y=40)
    default = Adder.submit(workdir="add/2", x=1)
    bad = Adder.submit(workdir="add/3", x=1, y="boom")
    with pytest.raises(TypeError, match="unknown app parameters"):
        Adder.submit(workdir="add/4", x=1, z=2)
    assert not good.done()
    with pytest.raises(Job.NoResult):
        good.result_nowait()
    with pytest.raises(concurrent.futures.TimeoutError):
        good.result(timeout=0.2)
    cmd = ApplicationDefinition.load_by_id(Adder.__app_id__)(good).get_arg_str()
    assert " -m balsam._api.python_runner " in cmd

    run_jobs(site, [good, default, bad], execute=True)
    assert good.result() == 42 and default.result(timeout=5) == 2
    assert good.done() and bad.done() and bad.state.value == "FAILED"
    with pytest.raises(ZeroDivisionError, match="cannot add 1 and 'boom'") as info:
        bad.result_nowait()
    assert "run" in "".join(__import__("traceback").format_tb(info.value.__traceback__))
    waited = Job.objects.wait([good, default, bad], timeout=5, poll_interval=0.1)
    assert len(waited.done) == 3 and waited.not_done == []
    assert {j.id for j in Job.objects.as_completed([good, default], timeout=5, poll_interval=0.1)} == {good.id, default.id}


def test_wait_and_as_completed_timeouts(site):
    from balsam.api import ApplicationDefinition, Job

    site_name = site.name

    class Sleeper(ApplicationDefinition):
        site = site_name
        command_template = "sleep 1"

    jobs = Job.objects.bulk_create([Sleeper.submit(workdir=f"z/{i}", save=False) for i in range(3)])
    jobs[0].state = "FAILED"
    jobs[0].save()
    first = Job.objects.wait(jobs, timeout=2, poll_interval=0.1, return_when="FIRST_COMPLETED")
    assert [j.id for j in first.done] == [jobs[0].id] and len(first.not_done) == 2
    done = Job.objects.wait(jobs, timeout=0.3, poll_interval=0.1)
    assert len(done.done) == 1 and len(done.not_done) == 2
    seen = []
    with pytest.raises(concurrent.futures.TimeoutError, match="2 of 3 jobs"):
        for job in Job.objects.as_completed(jobs, timeout=0.3, poll_interval=0.1):
            seen.append(job.id)
    assert seen == [jobs[0].id]


def test_parse_run_markers():
    from balsam._api.app import parse_run_markers

    text = "hello\nBALSAM-RETURN-VALUE abc=\nmore output\n"
    assert parse_run_markers(text) == ("abc=", None)
    assert parse_run_markers("x\nBALSAM-EXCEPTION zz==\n") == (None, "zz==")
    assert parse_run_markers("nothing here") == (None, None)
    assert parse_run_markers("BALSAM-RETURN-VALUE a\nBALSAM-EXCEPTION b\n") == (None, "b")


def test_python_runner_prints_markers_on_rank_zero_only(tmp_path):
    from balsam._api import codec
    from balsam._api.app import parse_run_markers, python_runner_command
    from balsam.api import ApplicationDefinition

    class Square(ApplicationDefinition):
        site = 1

        def run(self, n):
            return n * n

    Square.__app_id__ = 99
    job = _job_stub({"n": 9})
    cmd = python_runner_command(Square, job)
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    value, exc = parse_run_markers(out.stdout)
    assert codec.deserialize(value) == 81 and exc is None
    rank1 = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60, env={**os.environ, "PMI_RANK": "1"})
    assert parse_run_markers(rank1.stdout) == (None, None)
