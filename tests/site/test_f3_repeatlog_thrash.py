"""An unexpected error (a driver bug) whose message names its BatchJob (a script's path, an id),
striking more pending BatchJobs than the repeat log remembers (_RepeatLog.MAX_KEPT, 64).

Before: errors were remembered by type and message, so each BatchJob's was a distinct error and
the 64 most recent were kept: with 70 BatchJobs each was forgotten before it came round again,
and every cycle logged a full traceback per BatchJob (350 in 5 cycles). Now an error is
remembered by its type and where it was raised: one traceback, then a summary naming the
BatchJobs it struck."""

from __future__ import annotations

import logging

from balsam.site.modules.scheduler import OUTAGE_LOG_EVERY_S
from site_test_utils import batch_job, create_batch_job
from test_h8_plugin_hook_and_credentials import setup  # noqa: F401 (fixture)


def test_a_bug_striking_many_batch_jobs_is_one_traceback_then_summed_up(setup, client, caplog, monkeypatch) -> None:
    site, fake, module, clock = setup
    ids = [create_batch_job(client, site.site_id)["id"] for _ in range(70)]

    def driver_bug(batch_job, *args, **kwargs):
        path = f"{site.site_path}/qsubmit/qlaunch{batch_job['id']:05d}.sh"
        raise FileNotFoundError(f"[Errno 2] No such file or directory: '{path}'")

    monkeypatch.setattr(module, "_submit", driver_bug)
    caplog.set_level(logging.INFO, logger="balsam.site.modules.scheduler")
    for _ in range(5):  # five cycles within one summary period
        module.run_cycle()
        clock.now += 10
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1, f"{len(tracebacks)} full tracebacks in 5 cycles"
    assert "FileNotFoundError raised at test_f3_repeatlog_thrash.py:" in tracebacks[0].getMessage()
    # Each BatchJob still says its own error where `balsam queue ls -v` shows it.
    record = batch_job(client, ids[-1])
    assert "qlaunch%05d.sh" % ids[-1] in record["status_info"]["error"]
    # After a summary period: one line naming how many times and which BatchJobs.
    caplog.clear()
    clock.now += OUTAGE_LOG_EVERY_S
    module.run_cycle()
    assert not [r for r in caplog.records if r.exc_info]
    [summary] = [r.getMessage() for r in caplog.records if "unexpected error again" in r.getMessage()]
    assert "FileNotFoundError raised at test_f3_repeatlog_thrash.py:" in summary, summary
    # 5 cycles of 70, less the first (in full), and the one of this cycle that brought the summary
    assert f"repeated {5 * 70} times" in summary and f"BatchJobs {ids[0]}, " in summary, summary
    assert "and 60 more" in summary, summary


def test_two_bugs_raised_in_different_places_each_get_their_traceback(setup, client, caplog, monkeypatch) -> None:
    site, fake, module, clock = setup
    ids = [create_batch_job(client, site.site_id)["id"] for _ in range(4)]

    def driver_bug(batch_job, *args, **kwargs):
        if batch_job["id"] % 2:
            raise KeyError(f"queue of {batch_job['id']}")
        raise KeyError(f"project of {batch_job['id']}")

    monkeypatch.setattr(module, "_submit", driver_bug)
    caplog.set_level(logging.INFO, logger="balsam.site.modules.scheduler")
    for _ in range(3):
        module.run_cycle()
        clock.now += 10
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 2 and len(ids) == 4
    assert {str(r.exc_info[1]).split(" of ")[0] for r in tracebacks} == {"'queue", "'project"}
