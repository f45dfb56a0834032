"""One slow file no longer fails the files batched with it (rsync backend and transfers module).

An audit staged in 4 files through rsync (``timeout_sec: 1``, a wrapper rsync sleeping on one of
them): after ``slow`` timed out, the rest of its task failed ``not tried: ...`` and each was charged
a try; with the same backoff they were batched with ``slow`` again and failed with it, never tried
(``a`` STAGED_IN; ``slow``, ``b`` and ``c`` FAILED). In local mode (``rsync:///``) too, with no host
to be down.

Now the files not tried after a first rsync that got no answer go back to pending without using a
try (``TaskStatus.info["not_tried"]``), and the backend runs the file that timed out last in its next
task. A host that gets no answer twice in a row (no rsync to it answering in between) still costs
one timeout per task: the files not tried then fail a try.

The wrapper sleeps until it is killed (the backend's timeout kills its process group); nothing
here measures time: each check is what happened, waits have generous bounds only.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

from balsam.builtin import rsync_transfer
from balsam.builtin.rsync_transfer import RsyncTransfer
from balsam.site.modules.transfers import TransfersModule, TransfersOptions
from balsam.states import TransferDirection
from balsam.testing import wait_for_tasks
from balsam.transfer import TaskState, TaskStatus, TransferFile, TransferLocation, build_backend
from transfer_test_utils import FakeAPI

BOUND_SEC = 60.0


def sleepy_rsync(tmp_path: Path, pattern: str) -> tuple[Path, Path]:
    """An ``rsync`` that logs its arguments and sleeps (until killed) when one matches ``pattern``
    (a shell case pattern), else runs the real rsync: (script, log)."""
    log = tmp_path / "rsync-runs.log"
    script = tmp_path / "rsync-sleepy"
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\nfor a in "$@"; do case "$a" in {pattern}) exec sleep 300;; esac; done\n'
                      f'exec {shutil.which("rsync")} "$@"\n')
    script.chmod(0o755)
    return script, log


def runs(log: Path, name: str) -> int:
    return sum(name in line for line in log.read_text().splitlines()) if log.exists() else 0


def test_a_slow_file_fails_alone_and_the_others_of_its_batch_are_staged_in(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    names = ["a", "slow", "b", "c"]
    for name in names:
        (remote / f"{name}.txt").write_text(f"{name}\n")
    rsync, log = sleepy_rsync(tmp_path, "*/slow.txt")
    items = [{"id": n, "job_id": n, "direction": "in", "location_alias": "here", "remote_path": str(remote / f"{name}.txt"),
              "local_path": "input.txt", "recursive": False, "state": "pending", "task_id": "", "transfer_info": {}}
             for n, name in enumerate(names, 1)]
    api = FakeAPI(items, [{"id": n, "workdir": f"job_{name}", "state": "READY"} for n, name in enumerate(names, 1)])
    site = tmp_path / "site"
    (site / "data").mkdir(parents=True)
    options = TransfersOptions(transfer_locations={"here": "rsync:///"}, retry_backoff_sec=0, max_attempts=2,
                               backend_options={"rsync": {"rsync": str(rsync), "timeout_sec": 1, "threads": 1}})
    module = TransfersModule(SimpleNamespace(site_path=str(site), data_path=str(site / "data"), site_id=1), options, api)
    try:
        deadline = time.monotonic() + BOUND_SEC
        while set(api.states()) - {"done", "error"}:
            assert time.monotonic() < deadline, api.states()
            module.run_cycle()
            time.sleep(0.05)
    finally:
        module.close()
    by_name = {name: api.items[n] for n, name in enumerate(names, 1)}
    assert {name: item["state"] for name, item in by_name.items()} == {"a": "done", "slow": "error", "b": "done", "c": "done"}
    assert "did not finish within 1 s" in by_name["slow"]["transfer_info"]["error"]
    assert by_name["slow"]["transfer_info"]["attempts"] == 2
    for name in ("a", "b", "c"):
        assert (site / "data" / f"job_{name}" / "input.txt").read_text() == f"{name}\n"
        assert not by_name[name]["transfer_info"].get("attempts"), by_name[name]["transfer_info"]  # no try used
        assert "not_tried" not in by_name[name]["transfer_info"].get("task", {})  # a list, not a figure
        assert runs(log, f"/{name}.txt") == 1  # tried once, after the slow file's first timeout
    assert runs(log, "/slow.txt") == 2


def test_a_host_that_never_answers_costs_one_timeout_per_task_not_one_per_file(tmp_path: Path, monkeypatch) -> None:
    """The first rsync that gets no answer spares the task's other files (listed ``not_tried``: no
    try used); the next task's first rsync getting none either (no answer in between) charges them
    (not listed): a hung host's jobs fail after ``max_attempts`` tasks, one timeout each."""
    monkeypatch.setattr(rsync_transfer, "PROBE_TIMEOUT_SEC", 1)  # (the check hangs too: no need to wait 10 s)
    rsync, log = sleepy_rsync(tmp_path, "*")
    backend = build_backend(RsyncTransfer, "rsync", {"rsync": str(rsync), "timeout_sec": 1, "threads": 1})
    location = TransferLocation.parse("here", "rsync:///")
    (tmp_path / "remote").mkdir()
    for n in ("x", "y", "z"):
        (tmp_path / "remote" / f"{n}.txt").write_text(n)
    files = [TransferFile(str(tmp_path / "remote" / f"{n}.txt"), str(tmp_path / "job" / f"{n}.txt")) for n in ("x", "y", "z")]
    try:
        first = backend.submit(location, TransferDirection.stage_in, files)
        first_status = wait_for_tasks(backend, [first], timeout=BOUND_SEC)[first]
        second = backend.submit(location, TransferDirection.stage_in, files[1:])
        second_status = wait_for_tasks(backend, [second], timeout=BOUND_SEC)[second]
    finally:
        backend.close()
    assert first_status.state == TaskState.done and set(first_status.file_errors) == {f.dest for f in files}
    assert "did not finish within 1 s" in first_status.file_errors[files[0].dest]
    assert first_status.info.get("not_tried") == [files[1].dest, files[2].dest]
    assert first_status.file_errors[files[1].dest].startswith("not tried: an earlier file of this task failed (")
    assert second_status.state == TaskState.done and set(second_status.file_errors) == {files[1].dest, files[2].dest}
    assert "did not finish within 1 s" in second_status.file_errors[files[1].dest]
    assert "not_tried" not in second_status.info  # the second no-answer in a row: z fails a try
    assert "the second rsync in a row to this machine that got no answer, nor did a check of it" in \
        second_status.file_errors[files[2].dest]
    copies = [line for line in log.read_text().splitlines() if "--list-only" not in line]
    assert len(copies) == 2  # one rsync per task
    checks = [line for line in log.read_text().splitlines() if "--list-only" in line]
    assert len(checks) == 1 and checks[0].endswith(f"-- {tmp_path / 'remote'}")  # before charging z, only then


def test_the_module_spares_only_the_listed_files_that_are_an_items_own(tmp_path: Path) -> None:
    """A backend's ``info["not_tried"]`` puts back (no try) the items whose own destination it lists;
    a file error it does not list is a try as before, and the list is no figure kept in the items."""
    from test_transfer_module_refusals import setup

    api, module, backend, _ = setup(tmp_path, {"far": 4}, transfer_batch_size=4, max_attempts=3)
    module.run_cycle()
    (task_id, files), = backend.files.items()
    dests = [f.dest for f in files]
    backend.tasks[task_id] = TaskStatus(
        TaskState.done, info={"files": 4, "files_done": 1, "not_tried": [dests[1], "/not/an/item"]},
        file_errors={dests[0]: "rsync of /remote/1.dat did not finish within 1 s",
                     dests[1]: "not tried: an earlier file of this task failed (timeout)",
                     dests[2]: "not tried: an earlier file of this task failed (timeout), the second in a row"})
    module.run_cycle()
    info = {n: api.items[n]["transfer_info"] for n in range(1, 5)}
    assert [api.items[n]["state"] for n in range(1, 5)] == ["pending", "pending", "pending", "done"]
    assert info[1]["attempts"] == 1 and info[3]["attempts"] == 1  # tries used
    assert "attempts" not in info[2] and info[2]["reason"] == "not tried: an earlier file of this task failed (timeout)"
    assert info[4]["task"] == {"files": 4, "files_done": 1}


def test_two_slow_files_in_a_row_on_a_host_that_answers_charge_no_other_file(tmp_path: Path) -> None:
    """Review: s1 timed out (s2 and b spared), then s2 timed out in the next task: counted as the
    host's second silence in a row, b failed a try it never got (with ``max_attempts: 1``: error,
    never run). Now a second silence in a row first checks the host (``rsync --list-only`` of the
    directory there): it answers, so b is spared again, and runs in the task after. (The check
    gets ``PROBE_TIMEOUT_SEC``, 10 s, whatever ``timeout_sec``: given 1 s like the copies, through
    the wrapper script, it could miss it on a loaded machine and charge b.)"""
    rsync, log = sleepy_rsync(tmp_path, "*/s[12].txt")
    backend = build_backend(RsyncTransfer, "rsync", {"rsync": str(rsync), "timeout_sec": 1, "threads": 1})
    location = TransferLocation.parse("here", "rsync:///")
    (tmp_path / "remote").mkdir()
    for n in ("s1", "s2", "b"):
        (tmp_path / "remote" / f"{n}.txt").write_text(n)
    s1, s2, b = [TransferFile(str(tmp_path / "remote" / f"{n}.txt"), str(tmp_path / "job" / f"{n}.txt"))
                 for n in ("s1", "s2", "b")]
    try:
        statuses = []
        for files in ([s1, s2, b], [s2, b], [b]):  # what the agent submits again (s1 failed its try)
            task = backend.submit(location, TransferDirection.stage_in, files)
            statuses.append(wait_for_tasks(backend, [task], timeout=BOUND_SEC)[task])
    finally:
        backend.close()
    assert statuses[0].info.get("not_tried") == [s2.dest, b.dest]
    assert "did not finish within 1 s" in statuses[1].file_errors[s2.dest]
    assert statuses[1].info.get("not_tried") == [b.dest], statuses[1]  # spared: the host answered a check
    assert statuses[1].file_errors[b.dest].endswith("; submitted again without using a try")
    assert not statuses[2].file_errors and (tmp_path / "job" / "b.txt").read_text() == "b"
    assert runs(log, "/b.txt") == 1 and runs(log, "--list-only") == 1


def test_two_files_failing_at_once_are_not_two_silences_in_a_row(tmp_path: Path) -> None:
    """Review: with ``threads: 2``, s1 and s2 (of two tasks) running at the same time both got no
    answer; the one recorded second counted as the host's second silence in a row although its
    rsync had started before the first failure was known, and the other file of its task failed a
    try it never got. Now a failure counts as the second only if its rsync started after the
    previous one was recorded: both tasks spare their other file. (The wrapper makes each of s1
    and s2 wait until the other has started, then fail as ssh does: exit 255; no timing.)"""
    marks = tmp_path / "marks"
    marks.mkdir()
    log = tmp_path / "rsync-runs.log"
    rsync = tmp_path / "rsync-meet"
    rsync.write_text(
        f'#!/bin/sh\necho "$*" >> {log}\n'
        f'for a in "$@"; do case "$a" in */s1.txt) me=s1; other=s2;; */s2.txt) me=s2; other=s1;; esac; done\n'
        f'if [ -n "$me" ]; then touch {marks}/$me; i=0\n'
        f'  while [ ! -e {marks}/$other ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done\n'
        f'  echo "ssh: connect to host dtn port 22: Connection refused" >&2; exit 255; fi\n'
        f'exec {shutil.which("rsync")} "$@"\n')
    rsync.chmod(0o755)
    backend = build_backend(RsyncTransfer, "rsync", {"rsync": str(rsync), "timeout_sec": 60, "threads": 2})
    location = TransferLocation.parse("here", "rsync:///")
    (tmp_path / "remote").mkdir()
    for n in ("s1", "a", "s2", "b"):
        (tmp_path / "remote" / f"{n}.txt").write_text(n)
    s1, a, s2, b = [TransferFile(str(tmp_path / "remote" / f"{n}.txt"), str(tmp_path / "job" / f"{n}.txt"))
                    for n in ("s1", "a", "s2", "b")]
    try:
        tasks = [backend.submit(location, TransferDirection.stage_in, files) for files in ([s1, a], [s2, b])]
        statuses = wait_for_tasks(backend, tasks, timeout=BOUND_SEC)
    finally:
        backend.close()
    first, second = (statuses[t] for t in tasks)
    assert first.file_errors[s1.dest].startswith("rsync exited 255: ssh: connect to host dtn")
    assert second.file_errors[s2.dest].startswith("rsync exited 255: ssh: connect to host dtn")
    assert first.info.get("not_tried") == [a.dest] and second.info.get("not_tried") == [b.dest], (first, second)
    assert runs(log, "--list-only") == 0 and runs(log, "/a.txt") == 0 and runs(log, "/b.txt") == 0
