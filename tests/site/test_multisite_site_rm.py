"""One user, two sites: `balsam site rm` of one says which jobs of the other wait for its jobs.

The real server, two real site directories, the real ``balsam`` command. Deleting a site deletes
its jobs, and a deleted parent is not waited for (docs/api.md): a child at another site whose
parent was an unfinished job of the deleted site is released, to stage in and run without that
parent's results. The confirmation only said "This will wipe out N jobs inside!"; the children
elsewhere were released without a word.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from site_test_utils import finish_jobs

BALSAM = str(Path(sys.executable).parent / "balsam")


def _app(site_id: int, name: str) -> Any:
    from balsam.api import ApplicationDefinition

    app = type(name, (ApplicationDefinition,), {"site": site_id, "command_template": "true"})
    app.sync()
    return app


def _site_rm(cwd: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("BALSAM_SITE_PATH", None)
    return subprocess.run([BALSAM, "site", "rm", *args], env=env, cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=120)


def _warning(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "of other sites" in line]


def test_site_rm_names_the_jobs_of_other_sites_that_wait_for_its_jobs(make_site, client, tmp_path) -> None:
    from balsam.api import Job

    site_a, site_b, site_c = make_site("polaris"), make_site("perlmutter"), make_site("aurora")
    sim, ana, viz = _app(site_a.site_id, "Sim"), _app(site_b.site_id, "Ana"), _app(site_c.site_id, "Viz")
    running, done = Job("sim/running", sim), Job("sim/done", sim)
    running.save()
    done.save()
    finish_jobs(client, site_a.site_id, [done.id])
    waiting = [Job(f"ana/{i}", ana, parent_ids=[running.id]) for i in range(2)]
    waiting.append(Job("viz/0", viz, parent_ids=[running.id, done.id]))
    waiting = Job.objects.bulk_create(waiting)
    # Not counted: a child at the deleted site itself (deleted with it), and one elsewhere whose
    # parent at that site has finished (it waits for its other parent, at its own site).
    Job("sim/child", sim, parent_ids=[running.id]).save()
    other = Job("ana/other", ana)
    other.save()
    Job("ana/after-done", ana, parent_ids=[done.id, other.id]).save()

    expected = ("Warning: 3 jobs of other sites (1 at aurora, 2 at perlmutter) wait for unfinished jobs of polaris: "
                "deleting it releases them as if those parents had finished, to stage in and run without their "
                "results (`balsam job ls --state AWAITING_PARENTS --site all` lists them; `balsam job rm` or fail "
                "them first if they cannot run without)")
    declined = _site_rm(tmp_path, str(site_a.site_path), stdin="n\n")
    assert declined.returncode == 1 and _warning(declined) == [expected], declined.stderr
    assert Path(site_a.site_path).is_dir() and client.get(f"/jobs/{waiting[0].id}")["state"] == "AWAITING_PARENTS"

    deleted = _site_rm(tmp_path, str(site_a.site_path), "-y")
    assert deleted.returncode == 0 and _warning(deleted) == [expected], deleted.stderr
    # What the warning said: released, as a deleted parent is not waited for.
    assert {client.get(f"/jobs/{job.id}")["state"] for job in waiting} == {"STAGED_IN"}

    # A site whose jobs nobody elsewhere waits for: no warning.
    quiet = _site_rm(tmp_path, str(site_c.site_path), "-y")
    assert quiet.returncode == 0 and _warning(quiet) == [], quiet.stderr


def test_site_rm_force_says_which_jobs_elsewhere_it_released(make_site, client, tmp_path) -> None:
    from balsam.api import Job

    site_a, site_b = make_site("theta"), make_site("cori")
    parent = Job("sim/0", _app(site_a.site_id, "Sim"))
    parent.save()
    child = Job("ana/0", _app(site_b.site_id, "Ana"), parent_ids=[parent.id])
    child.save()
    forced = _site_rm(tmp_path, str(site_a.site_path), "--force")
    assert forced.returncode == 0, forced.stderr
    assert _warning(forced) == [
        "Note: 1 job of other sites (1 at cori) waited for its unfinished jobs: they are released as if those "
        "parents had finished, to stage in and run without their results"], forced.stderr
    assert client.get(f"/jobs/{child.id}")["state"] == "STAGED_IN"
