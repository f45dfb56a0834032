"""A re-run of a job whose parent has not finished, from the Python API and `balsam job modify`:
the server holds it in AWAITING_PARENTS until the parent finishes (it used to run before the
parent), and the CLI says how many of the jobs it set to RESTART_READY wait (it said "Set N job(s)
to RESTART_READY" alone, as if N runs were about to start)."""

from __future__ import annotations

from typing import Any

from click.testing import CliRunner


def balsam(*args: str) -> Any:
    from balsam.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_a_parent_and_child_re_run_together_wait_in_order(site: Any) -> None:
    from balsam.api import ApplicationDefinition, Job

    site_name = site.name

    class Step(ApplicationDefinition):
        site = site_name
        command_template = "echo {{ n }}"

    Step.sync()
    parent = Step.submit(workdir="dag/p", n=1, tags={"dag": "1"})
    child = Step.submit(workdir="dag/c", n=2, tags={"dag": "1"}, parent_ids=[parent.id])
    other = Step.submit(workdir="dag/o", n=3, tags={"dag": "1"})
    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED"):
        Job.objects.filter(id=[parent.id]).update(state=state)
    for state in ("PREPROCESSED", "RUNNING", "RUN_ERROR", "FAILED"):
        Job.objects.filter(id=[child.id, other.id]).update(state=state)
    Job.objects.filter(id=[parent.id]).update(state="FAILED")  # its output was wrong after all

    out = balsam("job", "modify", "-t", "dag=1", "-f", "FAILED", "-s", "RESTART_READY", "-y", "--site", site.name)
    assert out.exit_code == 0, out.output
    assert "Set 3 job(s) to RESTART_READY" in out.output
    assert "1 of them wait for their parents first" in out.output
    states = {j.id: j.state.value for j in Job.objects.filter(id=[parent.id, child.id, other.id])}
    assert states == {parent.id: "RESTART_READY", child.id: "AWAITING_PARENTS", other.id: "RESTART_READY"}
    assert [e.data.get("message") for e in child.history() if e.to_state == "AWAITING_PARENTS" and e.data] == [
        f"Waiting for its parents again before the re-run: {parent.id} (RESTART_READY)"]

    # the Python API's save() of one re-run: the same rule; the parent's finish releases it
    child.refresh_from_db()
    child.state = "FAILED"
    child.save()
    child.state = "RESTART_READY"
    child.save()
    child.refresh_from_db()
    assert child.state.value == "AWAITING_PARENTS"
    for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
        Job.objects.filter(id=[parent.id]).update(state=state)
    child.refresh_from_db()
    assert child.state.value == "STAGED_IN"
    out = balsam("job", "modify", "-i", str(other.id), "-s", "FAILED", "-y", "--site", site.name)
    out = balsam("job", "modify", "-i", str(other.id), "-s", "RESTART_READY", "-y", "--site", site.name)
    assert out.exit_code == 0 and "wait for their parents" not in out.output, out.output
