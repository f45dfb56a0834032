"""Every script in benchmarks/ runs to its figures with tiny sizes (so a broken import or a renamed
argument fails here, not on the next person who measures), and leaves no temporary directory behind.

Each runs as a subprocess the way its docstring says, against the real components it measures
(uvicorn, SQLite, PostgreSQL, the launcher, mpiexec). The PostgreSQL runs get a scratch database of
their own: every one of those benchmarks drops and re-creates the database it is given.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import filelock
import pytest
import sqlalchemy as sa

from balsam.server.db import normalize_database_url

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
PG = "{pg}"  # replaced by the test's scratch PostgreSQL database URL
PG_NAME = "{pg_name}"  # ... and by that database's name
VENV07 = "{venv07}"  # replaced by the Balsam 0.7 venv with its server's packages (made once, kept)


def bench(script: str, args: str, expected: str, *marks: pytest.MarkDecorator, id: str = "") -> object:
    """A table row: ``expected`` is a regular expression the benchmark's output must match."""
    return pytest.param(script, args.split(), expected, marks=marks, id=id or script.removesuffix(".py"))


postgres, mpi = pytest.mark.postgres, pytest.mark.mpi
RUNS = [
    # --wait 10, not 1: a round fails ("answered without the new job") when its write commits after
    # the waiting acquire's deadline; on a loaded 2-core host 2 runs of 5 failed so with 1 s (0 of 5
    # with 10 s). A woken acquire answers at once: the longer wait costs nothing when wake-ups work.
    bench("acquire_wake_latency.py", f"--workers 2 --rounds 2 --wait 10 --database-url {PG}",
          r"2 server processes +2 writes: median +[\d.]+ ms", postgres),
    bench("api_throughput.py", f"--jobs 10 --workers 2 --pg-url {PG}",
          r"(?m)^acquire, Idempotency-Key +[\d,]+ +[\d,]+$", postgres),
    bench("client_api.py", "--jobs 20", r"job\.save\(\) one changed field +median +[\d.]+ ms"),
    bench("dashboard_jobs_page.py", f"--jobs 100 --repeat 1 --pg-url {PG}",
          r"(?s)\[postgresql\] 100 jobs.*sites page \(counts per site and state\) +[\d.]+ms", postgres),
    bench("dashboard_plots.py", f"--jobs 200 --batch-jobs 3 --repeat 1 --pg-url {PG}",
          r"(?s)postgresql:.*plot_data +median +[\d.]+ ms.*same as without the range: True", postgres),
    bench("elastic_backlog.py", f"--jobs 20 --pg-url {PG}",
          r"(?s)postgresql: 10 runnable jobs.*count only \(GET /jobs/\?limit=0\) +[\d.]+ ms", postgres),
    bench("elastic_sim.py", "--hours 2 --nodes 16", r"0\.7 on PBS/Slurm \(no windows\) +\d+"),
    bench("launcher_job_preparation.py", "--jobs 20 --extra-env 0,5 --limit-sec 0.3",
          r"environment variables: +[\d.]+ us per job = [\d.]+ % of that budget"),
    bench("launcher_startup_timeline.py", "--rounds 1 --serial-jobs 4 --mpi-jobs 2 --importtime",
          r"(?s)serial: first RUNNING median.*mpi: first RUNNING median.*imports, an extra round under -X importtime", mpi),
    bench("launcher_throughput.py", "--serial-jobs 4 --mpi-jobs 2 --extra-env 3 --limit-sec 0.3",
          r"(?s)serial +4/4 jobs to JOB_FINISHED.*mpi +2/2 jobs to JOB_FINISHED: +[\d.]+ jobs/s .* of the limit"
          r".*mpi +first RUNNING [\d.]+ s after launcher start; that start-up alone caps 2 jobs at \d+%", mpi),
    bench("launcher_throughput.py", "--serial-jobs 4 --mpi-jobs 2 --end-to-end --postprocess module --limit-sec 0.3",
          r"(?s)serial +4/4 jobs, launcher start -> last JOB_FINISHED [\d.]+ s: +[\d.]+ jobs/s.*mpi +2/2 jobs, launcher start",
          mpi, id="launcher_throughput-end_to_end"),
    bench("python_app_startup.py", "--rounds 1 --runs 1 --baseline .",  # this checkout against itself
          r"(?s)compiling balsam as it loads costs each run\(\) job -?\d+ ms of CPU"
          r".*this checkout against --baseline: CPU \d+ -> \d+ ms"),
    bench("migrations_at_scale.py", f"--jobs 300 --pg-url {PG}",
          r"(?s)sqlite: upgrade to 0018 +[\d.]+ s.*postgresql: upgrade to 0017 +[\d.]+ s \([\d.]+x the fill\)", postgres),
    bench("processing_throughput.py", "--jobs 10 --hook-jobs 3",
          r"postprocess \(user hook, \d+ workers\) +3 jobs in +[\d.]+ s = +\d+ jobs/s"),
    # The acquires it times lease 100 runnable jobs (9 % of the fill), and the large fill follows
    # the small one and its 2,000 appended jobs.
    bench("scale_jobs.py", f"--small 1200 --jobs 3300 --repeat 1 --pg-url {PG}",
          r"(?s)\[postgresql\].*server RSS after the run +\d+ MiB", postgres),
    bench("server_request_mix.py", "--jobs 10 --batches 4,8", r"fitted over these runs: [-\d.]+ ms of server CPU",
          id="server_request_mix-sqlite"),
    bench("server_request_mix.py", "--jobs 10 --batches 4,8 --database postgresql",
          r"(?s)uvicorn \+ postgresql.*fitted over these runs: [-\d.]+ ms of server CPU", postgres,
          id="server_request_mix-postgresql"),
    bench("spool_replay.py", "--updates 2000 --repeat 1",
          r"claimed-elsewhere-many-late +poll +[\d.]+ s \([\d,]+ queued\) +plain file-order replay +[\d.]+ s"),
    bench("transfers_throughput.py", "--items 10", r"large +10 items -> 10 jobs STAGED_IN in +[\d.]+ s"),
    bench("windowed_count.py", f"--jobs 60 --repeat 1 --pg-url {PG}",
          r"(?s)\[postgresql\] 60 jobs.*after VACUUM ANALYZE jobs.*workdir__contains runs/99 \(1%\) +[\d.]+/", postgres),
    bench("soak_idle_records.py", "--polls 20 --repeat 1", r"now: empty ones not kept +0 +0\.00"),
    # 2 s of an idle agent, not 5: the row checks the script runs to its projection, not its figure.
    bench("site_refresh_records.py", "--seconds 2", r"per hour: \d+ at sync_period 1 s"),
    bench("credential_retention.py", "--rows 200 --requests 5", r"sweep deleted 200 rows in [\d.]+ s, 1 left"),
    bench("dag_dependencies.py", "--jobs 50 --batch 10 --depth 5 --repeat 1 --backends sqlite",
          r"chain: walk depth 5 \(5 moves per link\) +[\d.]+ ms/link"),
    bench("compare_balsam07.py", f"--jobs 10 --rounds 1 --sqlite --venv07 {VENV07} --database-prefix {PG_NAME}",
          r"(?s)our client -> our server on SQLite.*our Python-API listing / our raw-HTTP listing: [\d.]+×", postgres),
]
HELPERS = {"bench_server.py": "imported by the others", "balsam07_compare_driver.py": "run by compare_balsam07.py",
           "deephyper_style_search.py": "run by tests/compat/test_deephyper_style_search.py"}


@pytest.fixture(scope="session")
def balsam07_server_venv() -> Path:
    """Balsam 0.7 and its server's packages (``SERVER_07_PACKAGES``, what ``compare_balsam07.py
    --setup-07`` installs), in a venv of its own, kept; under its lock.

    Not tests/compat's venv (client only, as the Aurora guide installs it): sharing it, whichever
    test came second in a run threw the other's install away (``--setup-07`` clears the venv), and
    the 0.7 client tests then ran on the server's packages or the other way round, by test order.
    Installed by our pip into the venv (``--python``, no ensurepip) without byte-compiling: ~7 s
    instead of ~30 s of ``--setup-07`` on the CI's 2 cores."""
    venv = Path(os.environ.get("BALSAM07_SERVER_VENV") or REPO / ".cache" / "balsam-0.7-server-venv")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(venv) + ".lock", timeout=900):
        if not (venv / "bin" / "uvicorn").exists():
            packages = re.search(r"(?s)^SERVER_07_PACKAGES = (\[.*?\])$",
                                 (BENCHMARKS / "compare_balsam07.py").read_text(), re.M)
            assert packages, "SERVER_07_PACKAGES not found in benchmarks/compare_balsam07.py"
            subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True, timeout=300)
            subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                            "--no-compile", "--disable-pip-version-check", *ast.literal_eval(packages.group(1))],
                           check=True, timeout=900)
    return venv


@pytest.fixture
def scratch_pg_url() -> Iterator[str]:
    """A PostgreSQL database name of this test's own on BALSAM_TEST_DATABASE_URL's server (as
    tests/conftest.py reads it); every database whose name starts with it is dropped afterwards."""
    base = sa.engine.make_url(os.environ.get("BALSAM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/balsam_test"))
    url = base.set(database=f"{base.database}_{os.getpid()}_bench")
    yield url.render_as_string(hide_password=False)
    admin = sa.create_engine(sa.engine.make_url(normalize_database_url(str(base))).set(database="postgres"),
                             isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            names = conn.exec_driver_sql("SELECT datname FROM pg_database WHERE starts_with(datname, %(p)s)",
                                         {"p": url.database}).scalars().all()
            for name in names:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def test_every_benchmark_is_in_the_table() -> None:
    listed = {p.values[0] for p in RUNS} | set(HELPERS)
    assert sorted(p.name for p in BENCHMARKS.glob("*.py")) == sorted(listed)


@pytest.fixture
def tmpdir_short() -> Iterator[Path]:
    """An empty directory for the benchmark's TMPDIR, directly in the system's temporary directory
    (removed afterwards): the processing benchmark's forkserver binds a Unix socket in it, whose path
    may have 107 bytes at most, and under pytest-xdist a tmp_path
    (``/tmp/pytest-of-root/pytest-170/popen-gw0/test_benchmark_runs_processing0/tmp``) leaves too few."""
    path = Path(tempfile.mkdtemp(prefix="balsam-bench-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("script, args, expected", RUNS)
def test_benchmark_runs(script: str, args: list[str], expected: str, tmpdir_short: Path,
                        request: pytest.FixtureRequest) -> None:
    tmpdir = tmpdir_short
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
    env.update(TMPDIR=str(tmpdir), PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    if request.node.get_closest_marker("postgres"):
        pg = request.getfixturevalue("scratch_pg_url")
        args = [a.replace(PG, pg).replace(PG_NAME, pg.rsplit("/", 1)[1]) for a in args]
        env["BALSAM_BENCH_DATABASE_URL"] = pg  # server_request_mix.py reads only this
        env["BALSAM_TEST_DATABASE_URL"] = pg  # compare_balsam07.py: the server its databases go on
    if VENV07 in args:
        args = [a.replace(VENV07, str(request.getfixturevalue("balsam07_server_venv"))) for a in args]
    # A session of its own: on a timeout the benchmark's servers and launchers go with it.
    proc = subprocess.Popen([sys.executable, str(BENCHMARKS / script), *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{script} {' '.join(args)} ran over 120 s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{script} {' '.join(args)} exited {proc.returncode}:\n{output[-4000:]}"
    assert re.search(expected, output), f"{script}: no match for {expected!r} in:\n{output[-4000:]}"
    assert not list(tmpdir.iterdir()), f"{script} left {[p.name for p in tmpdir.iterdir()]} in its TMPDIR"
