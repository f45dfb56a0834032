"""file_cleaner: what it may delete (audit against a real server and site directory).

- A workdir that is itself a symlink (``data/a -> data/b``), or lies below one, names another
  directory: the cleaner resolved it and cleaned whatever the link reached, e.g. the files of the
  job working in ``data/b`` (still running). Such a workdir is not cleaned now (one WARNING).
- A finished parent whose children have not finished yet: its ``cleanup_files`` were deleted while
  its children still had to read them (``input.h5`` links, ``parent.workdir``). It keeps its files
  (and its flag) until every child is JOB_FINISHED or FAILED; a batch full of such parents does not
  hold back the other jobs.
- An absolute pattern in an app's ``cleanup_files`` raised NotImplementedError out of every cycle
  (no job of the site was cleaned again); it is reported once and skipped now, as ``..`` patterns
  are. Symlinks inside the workdir pointing out of it never delete anything outside it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from balsam.site.modules.file_cleaner import FileCleanerModule, FileCleanerSettings
from site_test_utils import finish_jobs, job_rows


def _app(site, patterns):
    from balsam.api import ApplicationDefinition

    sid = site.site_id

    class Scratch(ApplicationDefinition):
        site = sid
        command_template = "echo s"
        cleanup_files = patterns

    return Scratch


def _cleaner(site, client, batch=10):
    return FileCleanerModule(site, FileCleanerSettings(cleanup_batch_size=batch, service_period=1), client)


def _pending(client, site) -> dict[int, bool]:
    return {row["id"]: row["pending_file_cleanup"] for row in job_rows(client, site_id=site.site_id)}


def test_a_workdir_that_is_a_symlink_to_another_jobs_workdir_is_not_cleaned(make_site, client, caplog) -> None:
    from balsam.api import Job

    site = make_site()
    app = _app(site, ["*.tmp"])
    data = Path(site.data_path)
    linked, below, running = Job.objects.bulk_create([Job("a", app), Job("link/c", app), Job("b", app)])
    (data / "b").mkdir()
    (data / "b" / "state.tmp").write_text("the running job's checkpoint")
    os.symlink(data / "b", data / "a")  # job a's workdir is a link to job b's
    (data / "other" / "c").mkdir(parents=True)
    (data / "other" / "c" / "x.tmp").write_text("another directory's file")
    os.symlink(data / "other", data / "link")  # job link/c's workdir lies below a link
    finish_jobs(client, site.site_id, [linked.id, below.id])
    with caplog.at_level(logging.WARNING, logger="balsam.site.modules.file_cleaner"):
        _cleaner(site, client).run_cycle()
    assert (data / "b" / "state.tmp").exists(), "job b's file was deleted through job a's linked workdir"
    assert (data / "other" / "c" / "x.tmp").exists(), "a file was deleted through a linked parent directory"
    pending = _pending(client, site)
    assert pending[linked.id] is False and pending[below.id] is False  # not retried for ever
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"job {linked.id}: workdir a not cleaned" in w and "symlink" in w for w in warnings), warnings


def test_a_parent_keeps_its_files_until_its_children_are_done(make_site, client) -> None:
    from balsam.api import Job

    site = make_site()
    app = _app(site, ["*.h5"])
    data = Path(site.data_path)
    parent = Job.objects.create(workdir="dag/parent", app_id=app)
    child = Job.objects.create(workdir="dag/child", app_id=parent.app_id, parent_ids={parent.id})
    (data / "dag" / "parent").mkdir(parents=True)
    (data / "dag" / "parent" / "out.h5").write_text("the child's input")
    finish_jobs(client, site.site_id, [parent.id])
    assert job_rows(client, id=child.id)[0]["state"] not in ("JOB_FINISHED", "FAILED")
    cleaner = _cleaner(site, client)
    cleaner.run_cycle()
    assert (data / "dag" / "parent" / "out.h5").exists(), "the parent's output was deleted before its child ran"
    assert _pending(client, site)[parent.id] is True
    # The child runs and finishes: now the parent's files go.
    finish_jobs(client, site.site_id, [child.id])
    cleaner.run_cycle()
    cleaner.run_cycle()
    assert not (data / "dag" / "parent" / "out.h5").exists()
    assert _pending(client, site) == {parent.id: False, child.id: False}


def test_parents_kept_back_do_not_hold_back_the_other_jobs(make_site, client) -> None:
    from balsam.api import Job

    site = make_site()
    app = _app(site, ["*.tmp"])
    data = Path(site.data_path)
    parent = Job.objects.create(workdir="p", app_id=app)
    Job.objects.create(workdir="p-child", app_id=parent.app_id, parent_ids={parent.id})
    other = Job.objects.create(workdir="o", app_id=parent.app_id)
    for job in (parent, other):
        (data / job.workdir).mkdir()
        (data / job.workdir / "a.tmp").write_text("x")
    finish_jobs(client, site.site_id, [parent.id, other.id])
    cleaner = _cleaner(site, client, batch=1)  # the parent (lower id) fills every batch
    for _ in range(3):
        cleaner.run_cycle()
    assert (data / "p" / "a.tmp").exists()
    assert not (data / "o" / "a.tmp").exists(), "the other job was never cleaned"
    assert _pending(client, site)[other.id] is False


def test_patterns_and_links_never_reach_outside_the_workdir(make_site, client, tmp_path, caplog) -> None:
    from balsam.api import Job

    site = make_site()
    data = Path(site.data_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.tmp").write_text("not the site's")
    neighbour = data / "n"
    neighbour.mkdir()
    (neighbour / "keep.tmp").write_text("the neighbour's")
    app = _app(site, ["../n/*.tmp", f"{outside}/*.tmp", "*/*.tmp", "ln.tmp", "**/*.tmp"])
    job = Job.objects.create(workdir="w", app_id=app)
    work = data / "w"
    work.mkdir()
    (work / "mine.tmp").write_text("x")
    os.symlink(outside, work / "out-dir")
    os.symlink(neighbour, work / "n-dir")
    os.symlink(outside / "keep.tmp", work / "ln.tmp")
    finish_jobs(client, site.site_id, [job.id])
    # An absolute pattern made Path.glob raise NotImplementedError: every cycle ended there, and
    # no job of the site was cleaned again. It is reported once and skipped now.
    with caplog.at_level(logging.ERROR, logger="balsam.site.modules.file_cleaner"):
        _cleaner(site, client).run_cycle()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("absolute" in e for e in errors) and any("'..'" in e for e in errors), errors
    assert _pending(client, site)[job.id] is False
    assert (outside / "keep.tmp").exists() and (neighbour / "keep.tmp").exists()
    assert not (work / "mine.tmp").exists() and not os.path.lexists(work / "ln.tmp")  # the link, not its target
    assert (work / "out-dir").is_symlink() and (work / "n-dir").is_symlink()


class _StopAfterFirstWait:
    """The agent's stop_event, for driving Agent._module_loop: it records each wait and stops the
    loop at the first wait (or after ``max_cycles`` cycles that never waited: a busy loop)."""

    def __init__(self, agent, max_cycles: int) -> None:
        self.agent, self.max_cycles, self.waits = agent, max_cycles, []

    def is_set(self) -> bool:
        return bool(self.waits) or sum(self.agent.cycles.values()) >= self.max_cycles

    def wait(self, delay: float) -> bool:
        self.waits.append(delay)
        return True


def _cycles_until_the_agent_waits(site, client, module, max_cycles: int = 20) -> tuple[int, list[float]]:
    """Run the module through the agent's own loop (``None`` -> wait the period, ``0`` -> at once
    again) until it first waits: (cycles run, waits)."""
    from balsam.site.agent import Agent

    agent = Agent(site, client=client, modules=[module])
    agent.stop_event = _StopAfterFirstWait(agent, max_cycles)
    agent._module_loop(module)
    return agent.cycles.get(module.name, 0), agent.stop_event.waits


def test_parents_kept_back_a_full_batch_at_a_time_let_the_agent_wait(make_site, client) -> None:
    """Every pending job a parent kept back for its children, their number a multiple of
    cleanup_batch_size: each cycle returned 0.0 (a full batch read on past it, then "past the end:
    from the start again"), and the agent cycled without ever waiting (tens of thousands of
    requests a second). It reads on past the kept batches once, then waits its period."""
    from balsam.api import Job

    site = make_site()
    app = _app(site, ["*.tmp"])
    parents = [Job.objects.create(workdir=f"p{i}", app_id=app) for i in range(2)]
    for parent in parents:
        Job.objects.create(workdir=f"{parent.workdir}-child", app_id=parent.app_id, parent_ids={parent.id})
        (Path(site.data_path) / parent.workdir).mkdir()
        (Path(site.data_path) / parent.workdir / "a.tmp").write_text("the child's input")
    finish_jobs(client, site.site_id, [p.id for p in parents])
    for batch in (1, 2):
        cleaner = _cleaner(site, client, batch=batch)
        cycles, waits = _cycles_until_the_agent_waits(site, client, cleaner)
        assert waits == [cleaner.period], f"batch {batch}: {cycles} cycles and the agent never waited"
        assert cycles <= len(parents) + 1, f"batch {batch}: {cycles} cycles before the first wait"
        # And again from the start: the next round waits as soon.
        cycles, waits = _cycles_until_the_agent_waits(site, client, cleaner)
        assert waits == [cleaner.period] and cycles <= len(parents) + 1, (batch, cycles, waits)
    assert all((Path(site.data_path) / p.workdir / "a.tmp").exists() for p in parents)


def test_a_full_batch_cleaned_runs_again_at_once_until_none_is_left(make_site, client) -> None:
    from balsam.api import Job

    site = make_site()
    app = _app(site, ["*.tmp"])
    jobs = Job.objects.bulk_create([Job(f"j{i}", app) for i in range(3)])
    finish_jobs(client, site.site_id, [j.id for j in jobs])
    cleaner = _cleaner(site, client, batch=2)
    cycles, waits = _cycles_until_the_agent_waits(site, client, cleaner)
    assert waits == [cleaner.period] and cycles == 2, (cycles, waits)  # 2 at once, then 1 and the wait
    assert set(_pending(client, site).values()) == {False}


class _CountingClient:
    def __init__(self, client) -> None:
        self.client, self.rows_read, self.children_gets = client, 0, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def get(self, path, params=None, **kwargs):
        payload = self.client.get(path, params=params, **kwargs)
        rows = payload.get("results", []) if isinstance(payload, dict) else payload
        self.rows_read += len(rows)
        if params and "parent_id" in params:
            self.children_gets += 1
        return payload


def test_the_children_check_reads_a_page_per_busy_parent_not_every_child(make_site, client) -> None:
    """The children check paged through every busy child of the batch's parents, every cycle (a
    finished parent with 10^5 running children: 50,002 job rows read each cycle). It only needs to
    know which parents have one: a small page per request, the parents it names are left out of
    the next one."""
    from balsam.api import Job

    site = make_site()
    app = _app(site, ["*.tmp"])
    fanout, calm = Job.objects.create(workdir="fan", app_id=app), Job.objects.create(workdir="calm", app_id=app)
    other = Job.objects.create(workdir="other", app_id=fanout.app_id)
    page = 50  # FileCleanerModule.children_page, made small here (the rule is the same at 1,000)
    n_children = 3 * page + 10
    Job.objects.bulk_create([Job(f"fan-c{i}", app, parent_ids={fanout.id}) for i in range(n_children)])
    Job.objects.bulk_create([Job(f"other-c{i}", app, parent_ids={other.id}) for i in range(3)])
    finish_jobs(client, site.site_id, [fanout.id, calm.id, other.id])
    counting = _CountingClient(client)
    cleaner = _cleaner(site, counting)
    cleaner.children_page = page
    cleaner.run_cycle()
    pending = _pending(client, site)
    assert pending[fanout.id] is True and pending[other.id] is True and pending[calm.id] is False
    # Two busy parents: at most one request each, and one that finds no more.
    assert counting.children_gets <= 3, counting.children_gets
    # The listing and the re-check read the 3 parents; the children check a page or two.
    assert counting.rows_read <= 6 + 2 * page, counting.rows_read
    assert counting.rows_read < n_children
