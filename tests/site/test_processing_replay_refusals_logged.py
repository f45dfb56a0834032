"""After a ``kill -9`` of the agent and a prompt restart, the next agent's replay of the dead agent's
hook results logs no ERROR for the results that dead agent had sent already.

A results file is deleted once its whole chunk's results are sent, so a folder left by a killed
agent holds, besides the results it had not sent, those it had sent from the chunks still running
at its death. The replay sends them all under the dead session; the server refuses the ones
applied before (409: the session no longer holds the job), as designed, and the updater logged
"server refused updates: 36 of the 39 of one call" at ERROR (scale audit: 2,000 jobs, agent killed
mid-postprocess and restarted at once; every result was applied exactly once). They are one INFO
line now; other refusals keep their ERROR.

Real server; the dead agent's folder is written as a killed agent leaves it.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
from pathlib import Path

import attrs

from site_test_utils import job_rows

HOOK_RESULTS_DIR = "hook-results"  # processing.HOOK_RESULTS_DIR


def test_results_a_dead_agent_had_sent_are_not_an_error(make_site, client, caplog) -> None:
    from balsam.site.modules.processing import ProcessingModule

    site = make_site()
    app = client.post("/apps/", json={"site_id": site.site_id, "name": "A", "serialized_class": "x",
                                      "source_code": "x"})
    ids = [j["id"] for j in client.post("/jobs/", json=[{"workdir": f"r/{i}", "app_id": app["id"]} for i in range(3)])]
    # The dead agent's processing session held the jobs for their preprocess hooks ...
    session = client.post("/sessions/", json={"site_id": site.site_id})["id"]
    got = client.post(f"/sessions/{session}", json={"max_num_jobs": 3, "filter_tags": {}, "states": ["STAGED_IN"]})
    assert sorted(j["id"] for j in got) == sorted(ids)
    results = [{"id": i, "state": "PREPROCESSED", "state_timestamp": "2026-12-05T00:00:00+00:00"} for i in ids]
    # ... and had sent the first two results (applied), not the third, when it was killed.
    client.patch("/jobs/", json=[{**r, "session_id": session} for r in results[:2]])
    assert [r["state"] for r in job_rows(client, id=ids[:2])] == ["PREPROCESSED", "PREPROCESSED"]

    pid = subprocess.Popen(["true"])  # the dead agent's pid: no longer running
    pid.wait()
    parent = Path(site.spool_path) / HOOK_RESULTS_DIR
    folder = parent / f"{socket.gethostname()}-{pid.pid}-{time.time_ns() - 10**9}"
    folder.mkdir(parents=True)
    (parent / f"{folder.name}.lock").write_text("")
    lines = [{"start": ids[0], "pid": pid.pid}, results[0], {"start": ids[1], "pid": pid.pid}, results[1],
             {"start": ids[2], "pid": pid.pid}, results[2]]
    (folder / f"0-s{session}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    config = attrs.evolve(site.settings.processing, num_workers=1)
    module = ProcessingModule(site, config, client)
    caplog.set_level(logging.INFO)
    try:
        module.run_cycle()
        deadline = time.monotonic() + 60
        while module.replay_updater is not None and module.replay_updater.pending and time.monotonic() < deadline:
            time.sleep(0.1)
        assert module.replay_updater is None or module.replay_updater.flush(30)
    finally:
        module.close()
    assert {r["id"]: r["state"] for r in job_rows(client, id=ids)} == {i: "PREPROCESSED" for i in ids}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], errors
    infos = [r.getMessage() for r in caplog.records if "results of a stopped agent not applied" in r.getMessage()]
    assert len(infos) == 1 and "2 of the 3 results" in infos[0] and f"jobs {ids[0]}, {ids[1]}" in infos[0], infos
    assert not folder.exists(), "the folder is deleted once sent"


class _Refused(Exception):
    """A refusal as the client raises it: its HTTP status, the server's reason, the ids it names."""

    def __init__(self, status: int, message: str, refused_ids: "frozenset[int] | None" = None) -> None:
        super().__init__(message)
        self.status_code = status
        self.refused_ids = refused_ids


def test_only_refusals_whose_reason_says_the_job_moved_on_are_info(caplog) -> None:
    """Before: every 404 and 409 of the replay was one INFO line ("no longer held by its session"),
    the server's reason dropped: a 409 for a move the server does not allow (a version skew: the
    result would never apply) and a reverse proxy's 404 ("no route") read as the expected refusals
    of a restart. Now INFO only where the reason says the session no longer holds the job, or the
    job is gone, the reason given; the others keep their ERROR, with the reason."""
    from balsam.site.modules.processing import _ReplayUpdater

    updater = _ReplayUpdater(None, max_wait_sec=0.05, close_timeout=1.0, name="processing-replay")
    caplog.set_level(logging.INFO)
    try:
        def logged(refused: list, total: int) -> tuple[list[str], list[str]]:
            caplog.clear()
            updater._log_refused(refused, total)
            return ([r.getMessage() for r in caplog.records if r.levelno == logging.INFO],
                    [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR])

        skew = _Refused(409, "Invalid state change, nothing was updated: job 5: RUN_DONE -> PREPROCESSED is not allowed",
                        frozenset({5}))
        infos, errors = logged([({"id": 5, "session_id": 9}, skew)], 1)
        assert infos == [] and len(errors) == 1 and "RUN_DONE -> PREPROCESSED is not allowed" in errors[0], (infos, errors)

        proxy = _Refused(404, "Not found: no route PATCH /jobs/")
        infos, errors = logged([({"id": 6, "session_id": 9}, proxy)], 1)
        assert infos == [] and len(errors) == 1 and "no route PATCH /jobs/" in errors[0], (infos, errors)

        # the expected ones: INFO, with the server's reason
        held = _Refused(409, "Invalid state change, nothing was updated: job 7 is no longer held by session 9 "
                             "(now: no session); job 8 is no longer held by session 9 (now: session 12); "
                             "job 11: RUN_DONE -> PREPROCESSED is not allowed", frozenset({7, 8, 11}))
        gone = _Refused(404, "Job not found: 9, 10", frozenset({9, 10}))
        refused = [({"id": i, "session_id": 9}, held) for i in (7, 8, 11)] + [({"id": i, "session_id": 9}, gone)
                                                                             for i in (9, 10)]
        infos, errors = logged(refused, 6)
        assert len(infos) == 1 and "4 of the 6 results" in infos[0] and "jobs 7, 8, 9, 10" in infos[0], infos
        assert "job 7 is no longer held by session 9" in infos[0] and "Job not found: 9, 10" in infos[0], infos
        assert len(errors) == 1 and "{'id': 11" in errors[0] and "RUN_DONE -> PREPROCESSED" in errors[0], errors

        # a refusal of many jobs names the first few: the others named beside it (refused_ids) are
        # taken as the ones it names, when every job it names is no longer held
        many = _Refused(409, "Invalid state change, nothing was updated: job 20 is no longer held by session 9 "
                             "(now: no session); (+2 more)", frozenset({20, 21, 22}))
        infos, errors = logged([({"id": i, "session_id": 9}, many) for i in (20, 21, 22)], 3)
        assert errors == [] and len(infos) == 1 and "jobs 20, 21, 22" in infos[0], (infos, errors)
    finally:
        updater.close()
