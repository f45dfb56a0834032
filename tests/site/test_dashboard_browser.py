"""The web dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright for Python;
no browser is downloaded) while a real campaign runs: a real uvicorn server, the site agent daemon, a
launcher started by the local scheduler.

Log in through the form, watch the job counts change live, open the failed job and read its error,
load the plots with no console error, and check that another user sees none of it. A screenshot of
each page is saved (``BALSAM_SCREENSHOT_DIR``, default ``test-artifacts/dashboard`` in the repository;
docs/dashboard.md shows them: regenerate with ``BALSAM_SCREENSHOT_DIR=docs/img/dashboard``).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from site_test_utils import all_done, create_batch_job, wait_for

pytestmark = [pytest.mark.slow]

CHROMIUM = os.environ.get("BALSAM_TEST_CHROMIUM", "/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
LIVE_TIMEOUT_MS = 90_000


def _screenshot_dir() -> Path:
    path = Path(os.environ.get("BALSAM_SCREENSHOT_DIR") or REPO / "test-artifacts" / "dashboard")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail(f"headless Chromium not found at {CHROMIUM}: `apt-get install chromium` (scripts/test.sh does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


class Tab:
    """A browser page that records console errors and failed requests."""

    def __init__(self, browser: Any, base_url: str) -> None:
        self.context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda msg: self.errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        # (a request the browser itself cancels when the page navigates away reads net::ERR_ABORTED)
        self.page.on("requestfailed", lambda req: self.errors.append(f"request failed: {req.url} {req.failure}")
                     if "ERR_ABORTED" not in str(req.failure) else None)
        self.page.on("response", lambda resp: self.errors.append(f"HTTP {resp.status}: {resp.url}") if resp.status >= 400 else None)

    def login(self, username: str, password: str) -> None:
        self.page.goto("/dashboard/jobs")
        assert "/dashboard/login" in self.page.url  # sent to the login form first
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", password)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(re.compile(r".*/dashboard/jobs$"))

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(_screenshot_dir() / f"{name}.png"), full_page=True)

    def count(self, state: str) -> int:
        cell = self.page.locator(f"#state-counts td[data-state={state}]")
        return int(cell.inner_text().replace(",", "")) if cell.count() else 0


def test_dashboard_during_a_campaign(browser: Any, make_site: Any, agent_daemon: Any, client: Any,
                                     balsam_env: Any, register: Any) -> None:
    from balsam.api import ApplicationDefinition, Job

    # A launcher that waits for work a little longer than the fast default: a slow start on a busy
    # machine must not end it before the jobs arrive (the test watches the jobs, not the launcher).
    site = make_site(name="browser-site", overrides={"launcher": {"idle_ttl_sec": 20}})
    site_id = site.site_id
    agent_daemon(site)

    class Mesh(ApplicationDefinition):
        site = site_id
        command_template = "echo meshing {{ n }}; sleep 0.5"

    class BadMesh(ApplicationDefinition):
        site = site_id
        command_template = "echo reading input; echo 'ValueError: bad mesh 42' >&2; exit 3"

    jobs = [Job(f"mesh/{n}", Mesh, parameters={"n": n}, tags={"campaign": "browser"}, node_packing_count=4)
            for n in range(10)]
    jobs.append(Job("mesh/bad", BadMesh, tags={"campaign": "browser"}))
    Job.objects.bulk_create(jobs)

    alice = Tab(browser, balsam_env.url)
    alice.login(balsam_env.username, balsam_env.password)
    alice.page.goto("/dashboard/jobs?tags=campaign:browser")
    assert alice.count("STAGED_IN") + alice.count("PREPROCESSED") == 11 and alice.count("JOB_FINISHED") == 0
    alice.shot("jobs-before")

    create_batch_job(client, site_id, "serial")
    # the page refreshes itself: no reload, the counts change as the launcher works
    alice.page.wait_for_function(
        "() => { const c = s => { const el = document.querySelector(`#state-counts td[data-state=${s}]`);"
        " return el ? parseInt(el.textContent.replace(/,/g, '')) : 0; };"
        " return c('JOB_FINISHED') === 10 && c('FAILED') === 1; }",
        timeout=LIVE_TIMEOUT_MS,
    )
    wait_for(lambda: all_done(client, 11, site_id=site_id), timeout=30, what="the API to agree")
    assert alice.count("JOB_FINISHED") == 10 and alice.count("FAILED") == 1
    alice.shot("jobs")

    # the failed job: its error, its history, where its output is
    alice.page.goto("/dashboard/jobs?state=FAILED&tags=campaign:browser")
    alice.page.click("#jobs-table a")
    alice.page.wait_for_selector("#error-tail")
    assert "ValueError: bad mesh 42" in alice.page.inner_text("#error-tail")
    assert "RUN_ERROR" in alice.page.inner_text("#events")
    assert alice.page.inner_text("#job-out").endswith("/data/mesh/bad/job.out")
    failed_url = alice.page.url
    alice.shot("job-failed")

    # plots: the charts draw from the analytics data, with no console error
    alice.page.goto(f"/dashboard/plots?site_id={site_id}")
    alice.page.wait_for_selector("#chart-throughput canvas", timeout=30_000)
    alice.page.wait_for_selector("#chart-utilization canvas", timeout=30_000)
    alice.page.wait_for_function("() => /10 jobs finished/.test(document.getElementById('plot-status').textContent)",
                                 timeout=30_000)
    assert alice.page.inner_text("#summary-finished") == "10"
    alice.shot("plots")

    alice.page.goto("/dashboard/")
    assert "browser-site" in alice.page.inner_text("main")
    alice.shot("sites")
    alice.page.goto("/dashboard/batch-jobs")
    assert "serial" in alice.page.inner_text("#batch-jobs")
    alice.shot("batch-jobs")
    assert alice.errors == [], alice.errors

    # another user: none of it
    username, password, *_ = register(balsam_env.url)
    bob = Tab(browser, balsam_env.url)
    bob.login(username, password)
    assert "0 matching jobs" in bob.page.inner_text("main")
    assert "browser-site" not in bob.page.inner_text("main")
    answer = bob.page.goto(failed_url)
    assert answer.status == 404 and "not found" in bob.page.inner_text("main").lower()
    bob.page.goto(f"/dashboard/plots?site_id={site_id}")
    bob.page.wait_for_function("() => /0 jobs finished/.test(document.getElementById('plot-status').textContent)",
                               timeout=30_000)
    bob.shot("other-user")
    # the only console error allowed is the browser's own note about the 404 just above
    assert [e for e in bob.errors if "status of 404" not in e and not e.endswith(failed_url)] == [], bob.errors

    # logging out ends the session
    alice.page.goto("/dashboard/")
    alice.page.click("form.logout button")
    alice.page.wait_for_url(re.compile(r".*/dashboard/login$"))
    alice.page.goto("/dashboard/jobs")
    assert "/dashboard/login" in alice.page.url
