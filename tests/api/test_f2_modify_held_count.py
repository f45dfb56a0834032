"""``balsam job modify ... -s RESTART_READY`` says how many of the jobs it set the server held back
(AWAITING_PARENTS: a parent has not finished). It counted every waiting job of the ids / tags
selection, those --from-state left out and never changed too ("Set 1 job(s)", then "3 of them
wait"); and of a FAILED parent it said "they run once those finish", which never happens by
itself. Real server, real API client, the CLI in process."""

from __future__ import annotations

from typing import Any

from click.testing import CliRunner


def balsam(*args: str) -> Any:
    from balsam.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _step(site: Any) -> Any:
    from balsam.api import ApplicationDefinition

    site_name = site.name

    class Step(ApplicationDefinition):
        site = site_name
        command_template = "echo {{ n }}"

    Step.sync()
    return Step


def _move(job_ids: list[int], *states: str) -> None:
    from balsam.api import Job

    for state in states:
        Job.objects.filter(id=job_ids).update(state=state)


def test_jobs_left_out_by_from_state_are_not_counted_as_held(site: Any) -> None:
    from balsam.api import Job

    Step = _step(site)
    parent = Step.submit(workdir="f2/p", n=1, tags={"f2": "held"})
    untouched = [Step.submit(workdir=f"f2/c{i}", n=2, tags={"f2": "held"}, parent_ids=[parent.id]) for i in range(3)]
    other = Step.submit(workdir="f2/o", n=3, tags={"f2": "held"})
    _move([other.id], "PREPROCESSED", "RUNNING", "RUN_ERROR", "FAILED")

    out = balsam("job", "modify", "-t", "f2=held", "-f", "FAILED", "-s", "RESTART_READY", "-y", "--site", site.name)
    assert out.exit_code == 0, out.output
    assert "Set 1 job(s) to RESTART_READY" in out.output
    assert Job.objects.get(id=other.id).state.value == "RESTART_READY"
    assert {j.state.value for j in Job.objects.filter(id=[j.id for j in untouched])} == {"AWAITING_PARENTS"}
    assert "wait for their parents" not in out.output, out.output


def test_a_rerun_held_by_a_failed_parent_says_to_rerun_the_parent(site: Any) -> None:
    Step = _step(site)
    parent = Step.submit(workdir="f2/fp", n=1, tags={"f2": "fp"})
    running = Step.submit(workdir="f2/rp", n=1, tags={"f2": "rp"})
    blocked = Step.submit(workdir="f2/fc", n=2, tags={"f2": "c"}, parent_ids=[parent.id])
    waiting = Step.submit(workdir="f2/rc", n=2, tags={"f2": "c"}, parent_ids=[running.id])
    _move([parent.id, running.id], "PREPROCESSED", "RUNNING")
    _move([parent.id], "RUN_ERROR", "FAILED")
    _move([blocked.id, waiting.id], "FAILED")  # e.g. their stage-in failed while they waited

    out = balsam("job", "modify", "-t", "f2=c", "-f", "FAILED", "-s", "RESTART_READY", "-y", "--site", site.name)
    assert out.exit_code == 0, out.output
    assert "Set 2 job(s) to RESTART_READY" in out.output
    (line,) = [line for line in out.output.splitlines() if "wait for their parents first" in line]
    assert line.startswith("2 of them wait for their parents first"), line
    assert "1 wait for a FAILED parent, which must be re-run first" in line
    assert f"`balsam job modify -i {parent.id} -s RESTART_READY`" in line
    assert "the other 1 run once their parents finish" in line
    assert "they run once those finish" not in line
