"""Balsam 0.7 side by side with balsam, like with like: same machine, same PostgreSQL server,
interleaved rounds, the same client code on both sides.

- **Python API** (``balsam07_compare_driver.py``, one file run by each package's Python):
  ``Job.objects.bulk_create`` of N jobs, ``list(Job.objects.filter(tags=...))`` of them, the same
  listing reading six fields of every job (what a client that parses lazily then pays),
  ``Job.objects.filter(tags=...).delete()``. Rows: 0.7 client -> 0.7 server, our client -> our
  server, and the unmodified 0.7 client -> our server; with ``--sqlite``, also our client -> our
  server on SQLite (the embedded default; Balsam 0.7 has no SQLite server, so its PostgreSQL row
  is the peer).
- **Raw HTTP** (httpx from this process, the same requests to both servers): ``POST /jobs/`` in
  chunks of 5,000, ``GET /jobs/?tags=...`` in pages of 5,000; with ``--sqlite``, the same against
  our SQLite server too. Two client variants, each run against every server with the same code:
  *stdlib* (httpx's ``json=``, i.e. ``json.dumps``, and ``response.json()``, i.e. ``json.loads``;
  what Balsam 0.7's requests-based client does) and *orjson* (bodies encoded with ``orjson.dumps``
  and answers parsed with ``orjson.loads``, as our client, ``balsam/client/rest.py``, does). The
  client's JSON work is inside the timed figures, so each variant compares the servers under that
  client.

Balsam 0.7 runs from a venv of its own (``pip install balsam==0.7.0a24`` plus its server's
dependencies, pinned to what that release ran with; ``--setup-07`` makes it). Its wheel ships no
alembic versions, so its schema is created from its SQLAlchemy tables (the GIN index on tags as its
migration writes it).

    .venv/bin/python benchmarks/compare_balsam07.py --setup-07          # once (~2 min)
    .venv/bin/python benchmarks/compare_balsam07.py --jobs 10000 --rounds 3

PostgreSQL: ``$BALSAM_TEST_DATABASE_URL``'s server (default postgresql://postgres@127.0.0.1:5432);
the databases ``balsam_bench_ours`` and ``balsam_bench_07`` are dropped and created (``--database-prefix``
changes the ``balsam_bench`` part).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import orjson
import sqlalchemy as sa
import yaml

from balsam.server.db import normalize_database_url
from bench_server import free_port, prepare_pg, start_server

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DRIVER = HERE / "balsam07_compare_driver.py"
DEFAULT_VENV = REPO / ".cache" / "balsam-0.7-venv"
#: What Balsam 0.7.0a24's server ran with (newer FastAPI refuses its 204 routes; pydantic 1; passlib needs bcrypt < 4.1; its int token subject needs PyJWT < 2.10).
SERVER_07_PACKAGES = ["balsam==0.7.0a24", "fastapi==0.70.1", "sqlalchemy<2", "psycopg2-binary", "uvicorn<0.30",
                      "python-jose[cryptography]", "passlib", "python-multipart", "redis", "aredis", "orjson", "pyjwt<2.10",
                      "alembic<1.14", "bcrypt==4.0.1"]
PASSWORD = "bench-password-0123"

CREATE_07_SCHEMA = """
import sys
import sqlalchemy as sa
from balsam.server.models.tables import Base
engine = sa.create_engine(sys.argv[1])
jobs = Base.metadata.tables["jobs"]
# Its migration's GIN index, which SQLAlchemy 1.4 renders as invalid SQL from the table definition.
jobs.indexes = {i for i in jobs.indexes if i.name != "ix_jobs_tags"}
Base.metadata.create_all(engine)
with engine.begin() as conn:
    conn.execute(sa.text("CREATE INDEX ix_jobs_tags ON jobs USING gin (tags jsonb_path_ops)"))
"""


def pg_url(database: str) -> str:
    base = sa.engine.make_url(os.environ.get("BALSAM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/balsam_test"))
    return base.set(database=database).render_as_string(hide_password=False)


def setup_07(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *SERVER_07_PACKAGES], check=True)
    (venv / ".balsam-version").write_text("0.7.0a24\n")  # the compat test reuses this venv


def recreate_database(url: str) -> None:
    parsed = sa.engine.make_url(normalize_database_url(url))
    admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{parsed.database}"')
    admin.dispose()


def start_07_server(venv: Path, url: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    recreate_database(url)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-c", CREATE_07_SCHEMA, url], check=True, env=env_07(venv, url), timeout=120)
    port = free_port()
    log = open(workdir / "server07.log", "ab")
    proc = subprocess.Popen([python, "-m", "uvicorn", "balsam.server.main:app", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning", "--no-access-log"],
                            env={**env_07(venv, url), "BALSAM_LOG_DIR": str(workdir)}, stdout=log, stderr=subprocess.STDOUT,
                            cwd=workdir)
    log.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the Balsam 0.7 server exited ({proc.returncode}); see {workdir / 'server07.log'}")
        try:
            httpx.get(f"{base}/auth/how", timeout=2)
            return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the Balsam 0.7 server did not answer within 60 s")


def env_07(venv: Path, url: str) -> dict[str, str]:
    # Without PYTHONPATH too: a run of another checkout of ours (PYTHONPATH first) must not put
    # its balsam in front of 0.7's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_") and k != "PYTHONPATH"}
    env.update(BALSAM_DATABASE_URL=url, PYTHONNOUSERSITE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return env


def login(base: str, username: str, client_path: Path) -> str:
    """Register, log in (the 0.7 password routes, which both servers have), write a client.yml."""
    reg = httpx.post(f"{base}/auth/password/register", json={"username": username, "password": PASSWORD}, timeout=30)
    reg.raise_for_status()
    resp = httpx.post(f"{base}/auth/password/login", data={"username": username, "password": PASSWORD}, timeout=30)
    resp.raise_for_status()
    token = resp.json()["access_token"]
    client_path.write_text(yaml.safe_dump({"api_root": base, "client_class": "balsam.client.BasicAuthRequestsClient",
                                           "token": token}))
    return token


def run_driver(python: str, env: dict[str, str], n_jobs: int, workdir: Path) -> dict[str, float]:
    name = f"cmp-{uuid.uuid4().hex[:8]}"
    out = subprocess.run([python, str(DRIVER), str(n_jobs), name, str(workdir / name)], env=env, capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"driver failed ({python}):\n{out.stdout[-2000:]}{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


#: The raw round's client variants: how a create chunk becomes a body and how an answer is parsed.
#: The keys a round reports get the variant's suffix ("" for stdlib: the rows reported before).
RAW_VARIANTS = {
    # httpx's json= (json.dumps, compact) and Response.json() (json.loads of the decoded text).
    "stdlib": ("", lambda http, chunk: http.post("/jobs/", json=chunk), lambda resp: resp.json()),
    # What our client does (balsam/client/rest.py): orjson both ways, on bytes.
    "orjson": ("_orjson",
               lambda http, chunk: http.post("/jobs/", content=orjson.dumps(chunk),
                                             headers={"Content-Type": "application/json"}),
               lambda resp: orjson.loads(resp.content)),
}


def raw_round(base: str, token: str, app_id: int, n_jobs: int, variant: str = "stdlib") -> dict[str, float]:
    suffix, post_chunk, parse = RAW_VARIANTS[variant]
    headers = {"Authorization": f"Bearer {token}"}
    tag = uuid.uuid4().hex[:8]
    rows = [{"workdir": f"raw/{tag}/{i}", "app_id": app_id, "tags": {"raw": tag}, "serialized_parameters": "",
             "data": {}, "parent_ids": [], "transfers": {}} for i in range(n_jobs)]
    times = {}
    with httpx.Client(base_url=base, headers=headers, timeout=600) as http:
        start = time.perf_counter()
        for i in range(0, n_jobs, 5000):
            post_chunk(http, rows[i : i + 5000]).raise_for_status()
        times[f"raw_create{suffix}"] = time.perf_counter() - start
        start = time.perf_counter()
        got, offset = 0, 0
        while True:
            page = http.get("/jobs/", params={"tags": f"raw:{tag}", "limit": 5000, "offset": offset})
            page.raise_for_status()
            results = parse(page)["results"]
            got += len(results)
            offset += len(results)
            if len(results) < 5000:
                break
        times[f"raw_list{suffix}"] = time.perf_counter() - start
        assert got == n_jobs, got
        http.request("DELETE", "/jobs/", params={"tags": f"raw:{tag}"}).raise_for_status()
    return times


def raw_rounds(base: str, token: str, app_id: int, n_jobs: int, r: int) -> dict[str, float]:
    """Both client variants against one server, their order alternating with the round."""
    variants = list(RAW_VARIANTS) if r % 2 == 0 else list(reversed(RAW_VARIANTS))
    times: dict[str, float] = {}
    for variant in variants:
        times.update(raw_round(base, token, app_id, n_jobs, variant))
    return times


def make_app(base: str, token: str, workdir: Path) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    name = f"raw-{uuid.uuid4().hex[:6]}"
    site = httpx.post(f"{base}/sites/", headers=headers, timeout=30,
                      json={"name": name, "path": str(workdir / name)})
    site.raise_for_status()
    app = httpx.post(f"{base}/apps/", headers=headers, timeout=30,
                     json={"site_id": site.json()["id"], "name": "Raw", "serialized_class": "",
                           "source_code": "", "parameters": {}, "transfers": {}, "description": ""})
    app.raise_for_status()
    return app.json()["id"]


def fork_exec_note() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--venv07", type=Path, default=Path(os.environ.get("BALSAM07_VENV") or DEFAULT_VENV))
    parser.add_argument("--setup-07", action="store_true", help="create the Balsam 0.7 venv (client + server) and exit")
    parser.add_argument("--sqlite", action="store_true", help="also run our client against our server on SQLite")
    parser.add_argument("--database-prefix", default="balsam_bench",
                        help="the two PostgreSQL databases it drops and creates are PREFIX_ours and PREFIX_07")
    args = parser.parse_args()
    if args.setup_07:
        setup_07(args.venv07)
        return
    if not (args.venv07 / "bin" / "python").exists():
        raise SystemExit(f"no Balsam 0.7 venv at {args.venv07}: run with --setup-07 first")

    # SIGTERM/SIGINT unwind through the finally below: both servers stopped, the temp dir removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ours_url, url07 = pg_url(f"{args.database_prefix}_ours"), pg_url(f"{args.database_prefix}_07")
    workdir = Path(tempfile.mkdtemp(prefix="balsam-cmp07-"))
    procs: list[subprocess.Popen] = []
    try:
        prepare_pg(ours_url)
        ours, ours_base = start_server(workdir, ours_url, home=workdir / "home", create_tables=False)
        procs.append(ours)
        p07, base07 = start_07_server(args.venv07, url07, workdir)
        procs.append(p07)
        token_ours = login(ours_base, "bench-ours", workdir / "client-ours.yml")
        token07 = login(base07, "bench-07", workdir / "client-07.yml")
        login(ours_base, "bench-07client", workdir / "client-07-on-ours.yml")
        if args.sqlite:
            (workdir / "sqlite").mkdir()
            lite, lite_base = start_server(workdir / "sqlite", f"sqlite:///{workdir / 'sqlite' / 'balsam.db'}",
                                           home=workdir / "sqlite" / "home")
            procs.append(lite)
            token_lite = login(lite_base, "bench-sqlite", workdir / "client-sqlite.yml")
        env_ours = {**os.environ, "BALSAM_CLIENT_PATH": str(workdir / "client-ours.yml")}
        env_07_client = {**env_07(args.venv07, url07), "BALSAM_CLIENT_PATH": str(workdir / "client-07.yml"),
                         "HOME": str(workdir)}
        env_07_on_ours = {**env_07_client, "BALSAM_CLIENT_PATH": str(workdir / "client-07-on-ours.yml")}
        python07 = str(args.venv07 / "bin" / "python")
        sides = {
            "0.7 client -> 0.7 server": (python07, env_07_client),
            "balsam client -> balsam server": (sys.executable, env_ours),
            "0.7 client -> balsam server": (python07, env_07_on_ours),
        }
        if args.sqlite:
            sides["balsam client -> balsam server (SQLite)"] = (
                sys.executable, {**os.environ, "BALSAM_CLIENT_PATH": str(workdir / "client-sqlite.yml")})
        app07, app_ours = make_app(base07, token07, workdir), make_app(ours_base, token_ours, workdir)
        raw = [("raw 0.7", base07, token07, app07), ("raw balsam", ours_base, token_ours, app_ours)]
        if args.sqlite:
            raw.append(("raw balsam (SQLite)", lite_base, token_lite, make_app(lite_base, token_lite, workdir)))
        results: dict[str, list[dict[str, float]]] = {k: [] for k in [*sides, *(r[0] for r in raw)]}
        print(f"{args.jobs} jobs, {args.rounds} interleaved rounds, PostgreSQL; {fork_exec_note()}")
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for label in order:
                python, env = sides[label]
                results[label].append(run_driver(python, env, args.jobs, workdir))
            for label, base, token, app_id in (raw if r % 2 == 0 else list(reversed(raw))):
                results[label].append(raw_rounds(base, token, app_id, args.jobs, r))
            print(f"round {r + 1}/{args.rounds} done ({fork_exec_note()})", flush=True)
        report(results, args.jobs)
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def report(results: dict[str, list[dict[str, float]]], n_jobs: int) -> None:
    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in results[label])

    print("\nmedian of the rounds; jobs/s (seconds); ratio = balsam / 0.7 in this run\n")
    print("| figure | 0.7 client -> 0.7 server | balsam client -> balsam server | ratio | 0.7 client -> balsam server |")
    print("|---|---|---|---|---|")
    for key, what in (("bulk_create", "`Job.objects.bulk_create`"), ("list", "`list(Job.objects.filter(tags=...))`"),
                      ("list_read", "the same listing, reading each job's id, state, workdir, tags, data, get_parameters()"),
                      ("delete", "`Job.objects.filter(tags=...).delete()`")):
        a, b, c = med("0.7 client -> 0.7 server", key), med("balsam client -> balsam server", key), med("0.7 client -> balsam server", key)
        print(f"| {what} {n_jobs:,} | {n_jobs / a:,.0f}/s ({a:.2f} s) | {n_jobs / b:,.0f}/s ({b:.2f} s) | {a / b:.1f}× "
              f"| {n_jobs / c:,.0f}/s ({c:.2f} s) |")
    for key, what in RAW_ROWS:
        a, b = med("raw 0.7", key), med("raw balsam", key)
        print(f"| {what} {n_jobs:,} | {n_jobs / a:,.0f}/s ({a:.2f} s) | {n_jobs / b:,.0f}/s ({b:.2f} s) | {a / b:.1f}× | |")
    lite = "balsam client -> balsam server (SQLite)"
    if results.get(lite):
        print("\nour client -> our server on SQLite (peer: 0.7 on PostgreSQL above, same run):")
        for key, what in (("bulk_create", "`Job.objects.bulk_create`"), ("list", "`list(Job.objects.filter(tags=...))`"),
                      ("list_read", "the same listing, reading each job's id, state, workdir, tags, data, get_parameters()"),
                          ("delete", "`Job.objects.filter(tags=...).delete()`")):
            a, b = med("0.7 client -> 0.7 server", key), med(lite, key)
            print(f"| {what} {n_jobs:,} | {n_jobs / a:,.0f}/s ({a:.2f} s) | {n_jobs / b:,.0f}/s ({b:.2f} s) | {a / b:.1f}× |")
        for key, what in RAW_ROWS:
            a, b = med("raw 0.7", key), med("raw balsam (SQLite)", key)
            print(f"| {what} {n_jobs:,} | {n_jobs / a:,.0f}/s ({a:.2f} s) | {n_jobs / b:,.0f}/s ({b:.2f} s) | {a / b:.1f}× |")
    api_list, raw_list = med("balsam client -> balsam server", "list"), med("raw balsam", "raw_list")
    print(f"\nour Python-API listing / our raw-HTTP listing: {api_list / raw_list:.2f}× (target ≤ 1.5×; "
          f"{api_list / med('raw balsam', 'raw_list_orjson'):.2f}× the orjson raw client's)")


#: The raw rows, each variant's (the stdlib rows first, as before the orjson variant was added).
RAW_ROWS = (("raw_create", "raw HTTP create, stdlib json client"), ("raw_list", "raw HTTP list, stdlib json client"),
            ("raw_create_orjson", "raw HTTP create, orjson client"), ("raw_list_orjson", "raw HTTP list, orjson client"))


if __name__ == "__main__":
    main()
