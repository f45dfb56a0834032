"""``--json`` on ``job ls``, ``queue ls``, ``app ls`` and ``site ls``: one JSON array of objects with
the fields of ``-v`` (datetimes ISO 8601 with their UTC offset), read in the same bulk requests as
the table; the tables stay as they were. (There was no machine-readable output: scripts parsed the
tables or the YAML of ``-v``.)"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_test_utils import (balsam, fresh_api_state, make_marked_site, record_requests,  # noqa: F401 (fresh_api_state: autouse)
                            sync_hello)


@pytest.fixture
def site(balsam_env: Any, tmp_path: Path) -> Any:
    return make_marked_site(tmp_path, "site-json")


@pytest.fixture
def hello(site: Any) -> Any:
    return sync_hello("site-json", "echo {{ name }}")


@pytest.fixture
def jobs(hello: Any) -> list[Any]:
    from balsam.api import Job

    made = [Job(workdir=f"w/{i}", app_id=hello, tags={"exp": str(i % 2)}, parameters={"name": f"n{i}"})
            for i in range(7)]
    # Parameters that json.dumps refuses as they are: a set, NaN, a Path.
    made.append(Job(workdir="w/odd", app_id=hello, tags={"exp": "odd"},
                    parameters={"name": {3, 1}, "x": float("nan"), "p": Path("/a/b")}))
    return Job.objects.bulk_create(made)


def _json(*args: str) -> Any:
    out = balsam(*args)
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


def _iso(text: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(text)
    assert value.tzinfo is not None, text  # an instant, not a local time without its offset
    return value


def test_job_ls_json_has_the_verbose_fields_and_iso_datetimes(jobs: list[Any]) -> None:
    listed = _json("job", "ls", "--json")
    assert [j["id"] for j in listed] == sorted(j.id for j in jobs)
    verbose = list(yaml.safe_load_all(balsam("job", "ls", "-v").stdout))
    assert [list(j) for j in listed] == [list(v) for v in verbose]  # the same fields, in the same order
    first = listed[0]
    assert first["parameters"] == {"name": "n0"} and first["tags"] == {"exp": "0"} and first["state"] == "STAGED_IN"
    stamp = _iso(first["last_update"])
    assert abs(stamp - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(hours=1)
    odd = listed[-1]
    assert sorted(odd["parameters"]["name"]) == [1, 3]
    assert odd["parameters"]["x"] == "nan" and odd["parameters"]["p"] == "/a/b"


def test_job_ls_json_filters_limits_and_empty(jobs: list[Any]) -> None:
    assert [j["workdir"] for j in _json("job", "ls", "--json", "-t", "exp=1")] == ["w/1", "w/3", "w/5"]
    assert [j["workdir"] for j in _json("job", "ls", "--json", "-n", "2")] == ["w/6", "w/odd"]
    assert _json("job", "ls", "--json", "-s", "FAILED") == []  # not "No matching jobs."
    assert _json("job", "ls", "--json", "--by-state") == [{"state": "STAGED_IN", "count": 8}]
    assert {"state": "FAILED", "count": 0} in _json("job", "ls", "--json", "--by-state", "-v")
    out = balsam("job", "ls", "--json", "--watch")
    assert out.exit_code == 2 and "--watch and --json" in out.output


def test_job_ls_json_reads_pages_not_jobs(jobs: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import balsam.cli.job as job_cli

    monkeypatch.setattr(job_cli, "LIST_PAGE_SIZE", 3)
    sent = record_requests(monkeypatch)
    listed = _json("job", "ls", "--json")
    assert len(listed) == 8
    job_reads = [path for method, path in sent if method == "GET" and path.startswith("/jobs")]
    assert job_reads == ["/jobs/"] * 3  # three pages of 3: no request per job
    assert [path for _, path in sent if not path.startswith("/jobs")] == ["/sites/"]  # the --site selection


def test_queue_app_and_site_ls_json(jobs: list[Any], site: Any) -> None:
    from balsam.api import BatchJob

    BatchJob.objects.create(site_id=site.id, num_nodes=1, wall_time_min=5, job_mode="serial", queue="local",
                            project="local", filter_tags={"exp": "1"})
    queued = _json("queue", "ls", "--json")
    verbose = list(yaml.safe_load_all(balsam("queue", "ls", "-v").stdout))
    assert [list(b) for b in queued] == [list(v) for v in verbose]
    assert queued[0]["state"] == "pending_submission" and queued[0]["filter_tags"] == {"exp": "1"}
    assert _json("queue", "ls", "--json", "--submitted-by", "elastic_queue") == []

    apps = _json("app", "ls", "--json")
    assert [(a["name"], a["site_id"]) for a in apps] == [("Hello", site.id)]
    assert apps[0]["parameters"]["name"]["required"] is True
    assert not apps[0]["serialized_class"].endswith("chars)")  # whole, not cut as in -v

    sites = _json("site", "ls", "--json")
    assert [(s["id"], s["name"]) for s in sites] == [(site.id, "site-json")]
    assert isinstance(sites[0]["active"], bool)
    _iso(sites[0]["last_refresh"]), _iso(sites[0]["creation_date"])


def test_tables_are_unchanged_by_the_option(jobs: list[Any]) -> None:
    table = balsam("job", "ls").stdout.splitlines()
    assert table[0].split() == ["ID", "Site", "App", "Workdir", "State", "Tags"]
    assert len(table) == 9 and not table[1].startswith("[")


def test_job_ls_verbose_lists_a_job_whose_parameters_yaml_cannot_represent(jobs: list[Any]) -> None:
    """Before: a Path among a job's parameters ended `job ls -v` with "Error: ('cannot represent an
    object', PosixPath('/a/b'))", exit status 1, at that job."""
    out = balsam("job", "ls", "-v")
    assert out.exit_code == 0, out.output
    docs = list(yaml.safe_load_all(out.stdout))
    assert len(docs) == 8 and docs[-1]["parameters"]["p"] == "/a/b"


def test_numpy_parameters_are_listed_as_numbers_and_arrays(hello: Any) -> None:
    """Before: an array among a job's parameters ended `job ls -v` with "TypeError: only integer
    scalar arrays can be converted to a scalar index" (jsonable called its __index__), `--json` gave
    ``parameters: null`` and a parameters_error for parameters that had decoded, and np.float32(0.5)
    / np.bool_(True) were the strings "0.5" / "True"."""
    np = pytest.importorskip("numpy")
    from balsam.api import Job

    params = {"arr": np.arange(3), "grid": np.array([[1.5, 2.0], [3.0, 4.0]]), "f": np.float32(0.5),
              "b": np.bool_(True), "i": np.int64(7), "name": "x"}
    Job.objects.bulk_create([Job(workdir="w/np", app_id=hello, parameters=params)])
    want = {"arr": [0, 1, 2], "grid": [[1.5, 2.0], [3.0, 4.0]], "f": 0.5, "b": True, "i": 7, "name": "x"}
    [listed] = _json("job", "ls", "--json")
    assert listed["parameters"] == want and "parameters_error" not in listed
    out = balsam("job", "ls", "-v")
    assert out.exit_code == 0, out.output
    assert yaml.safe_load(out.stdout)["parameters"] == want


def test_one_value_that_cannot_be_written_keeps_the_others() -> None:
    """Without numpy: objects with tolist() and __index__ as numpy's behave (an array's __index__
    raises), and ones whose every conversion fails, are each written as they can be."""
    from balsam.cli._site_selector import jsonable

    class Array:
        def tolist(self) -> list:
            return [1, 2]

        def __index__(self) -> int:
            raise TypeError("only integer scalar arrays can be converted to a scalar index")

    class Broken:
        def tolist(self) -> list:
            raise RuntimeError("no")

        def __index__(self) -> int:
            raise TypeError("no")

        def __str__(self) -> str:
            raise ValueError("no")

    class Index:
        def __index__(self) -> int:
            return 4

    out = jsonable({"a": Array(), "b": Broken(), "i": Index(), "n": 1})
    assert out["a"] == [1, 2] and out["i"] == 4 and out["n"] == 1
    assert out["b"].startswith("<") and "Broken object at" in out["b"]


def test_keys_of_the_same_text_are_both_kept(hello: Any) -> None:
    """Before: {1: "a", "1": "b"} became {"1": "b"} in --json, the int key's value lost in silence."""
    from balsam.api import Job
    from balsam.cli._site_selector import jsonable

    Job.objects.bulk_create([Job(workdir="w/keys", app_id=hello, parameters={1: "a", "1": "b", 2: "c"})])
    [listed] = _json("job", "ls", "--json")
    assert listed["parameters"] == {"1 (int)": "a", "1": "b", "2": "c"}
    assert jsonable({"1": "s", 1: "i", Path("1"): "p", "1 (int)": "t"}) == {
        "1": "s", "1 (int 2)": "i", "1 (PosixPath)": "p", "1 (int)": "t"}


def test_a_listing_stopped_half_way_leaves_an_unclosed_array_and_a_nonzero_status(
        jobs: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """What docs/cli.md says a script must check: the status, before reading the array."""
    from balsam.api import Job
    from balsam.cli import job as job_cli

    def one_page_then_ctrl_c(filters: dict) -> Any:
        yield list(Job.objects.all()[:2]), True
        raise KeyboardInterrupt

    monkeypatch.setattr(job_cli, "_job_pages", one_page_then_ctrl_c)
    out = balsam("job", "ls", "--json")
    assert out.exit_code == 130
    lines = out.stdout.splitlines()
    assert lines[0] == "[" and len(lines) == 3 and lines[-1] != "]"  # two jobs written, no closing bracket
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.stdout)
