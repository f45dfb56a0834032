"""Idempotency records a real, idle site agent leaves on a real server per hour.

The soak found the agent's scheduler module sending ``PUT /sites/{id}`` (the queue's status and
backfill windows) with an ``Idempotency-Key`` every ``sync_period`` (10 s by default), and the
server keeping the whole answer (the site record) for ``BALSAM_IDEMPOTENCY_TTL_SEC`` (24 h): 8,640
rows a day per agent. This starts a real uvicorn server (SQLite, in a temporary directory), a new
user, a site on the ``local`` scheduler with ``sync_period: 1`` and its real agent (every module
on, ``balsam site start``'s code), lets it run ``--seconds`` with nothing to do, and prints the
rows of ``idempotency_keys`` holding an answer (updates and deletes), their bytes, and the
projection to an hour at 1 s and at the default 10 s. Run it once on the code before a change
(``PYTHONPATH=<old tree>/core``) and once after: the same figures side by side.

    python benchmarks/site_refresh_records.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import yaml


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="balsam-bench-refresh-") as tmp_name:
        tmp = Path(tmp_name)
        db = tmp / "server" / "balsam.db"
        db.parent.mkdir()
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "BALSAM_DATABASE_URL": f"sqlite:///{db}", "BALSAM_AUTH_SECRET_KEY": uuid.uuid4().hex * 2,
               "BALSAM_HOME": str(tmp / "server"), "BALSAM_AUTH_REGISTRATION": "open", "BALSAM_SERVER_CREATE_TABLES": "1"}
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "balsam.server.app:create_app_from_env",
                                   "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        path = None
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/auth/how", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
            login = {"username": "bench", "password": uuid.uuid4().hex}
            httpx.post(f"{url}/auth/password/register", json=login).raise_for_status()
            token = httpx.post(f"{url}/auth/password/login", data=login).raise_for_status().json()
            home = tmp / "home"
            home.mkdir()
            (home / "client.yml").write_text(yaml.safe_dump({
                "api_root": url, "client_class": "balsam.client.RESTClient", "token": token["access_token"],
                "token_expiry": token["expiration"], "username": "bench"}))
            os.environ["BALSAM_HOME"] = str(home)
            os.environ["BALSAM_CLIENT_PATH"] = str(home / "client.yml")
            from balsam.client import load_client
            from balsam.site.site_ops import init_site, start_agent, stop_agent

            path = tmp / "site"
            init_site(path, "refresh-bench", "default", load_client(), scheduler_name="local",
                      settings_overrides={"scheduler": {"sync_period": 1}, "processing": {"num_workers": 1}})
            start_agent(path)
            with sqlite3.connect(db) as conn:
                before = conn.execute("SELECT count(*) FROM idempotency_keys WHERE resource = 'answer'").fetchone()[0]
            time.sleep(args.seconds)
            with sqlite3.connect(db) as conn:
                rows, size = conn.execute("SELECT count(*), coalesce(sum(length(answer)), 0) FROM idempotency_keys "
                                          "WHERE resource = 'answer'").fetchone()
        finally:
            if path is not None:
                stop_agent(path, timeout=30, force=True)
            server.terminate()
            server.wait(30)
    added = rows - before
    per_hour = added * 3600 / args.seconds
    print(f"idle agent, sync_period 1 s, {args.seconds:.0f} s: {added} answer rows kept ({size:,} bytes in all)")
    print(f"per hour: {per_hour:,.0f} at sync_period 1 s, {per_hour / 10:,.0f} at the default 10 s "
          f"(kept {24}h: {per_hour / 10 * 24:,.0f} rows per agent at the default)")


if __name__ == "__main__":
    main()
