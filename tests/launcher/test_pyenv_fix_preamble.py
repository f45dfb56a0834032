"""A job's shell preamble in bash's POSIX mode and with an unwritable stderr, through the launcher's
own JobPreparer, shell_line and in-process pool (real bash):

- ``POSIXLY_CORRECT`` in the app's ``environment_variables`` or in the launcher's environment puts
  the job's bash in POSIX mode, where a function named ``exit`` is fatal ("`exit': is a special
  builtin", status 2): every job with a preamble failed without running. It runs; a preamble that
  calls ``exit`` or fails still says so in one line, and bash still execs the app (a signal that
  kills it reads -N, not 128+N);
- a preamble that stops with ``exit 3`` under ``set -e`` with stderr closed or on a full device
  ended the job with status 1 (the message's ``echo`` failed under errexit): 3."""

from __future__ import annotations

import os
import signal
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

from balsam.launcher.app_run import JobPreparer, shell_line
from balsam.launcher.runner import ProcessPool

EXIT_LINE = "balsam: the shell preamble called exit {}: the app was not started"
FAILED_LINE = "balsam: the shell preamble failed (exit status {}): the app was not started"
#: In POSIX mode (an EXIT trap, which cannot tell an ``exit`` from a ``set -e`` stop).
ENDED_LINE = "balsam: the shell preamble ended the job (exit status {}): the app was not started"

#: name -> (preamble, command line, exit status, job.out's lines, job.out's lines in POSIX mode)
CASES: dict[str, tuple[Any, str, int, list[str], list[str]]] = {
    "plain": ("export FROM_PREAMBLE=yes", "echo APP-RAN $FROM_PREAMBLE", 0, ["APP-RAN yes"], ["APP-RAN yes"]),
    "module function": ("module() { :; }\nmodule load x\n", "echo APP-RAN", 0, ["APP-RAN"], ["APP-RAN"]),
    "exit": ("exit 3", "echo APP-RAN", 3, [EXIT_LINE.format(3)], [ENDED_LINE.format(3)]),
    "multi-line exit": ("echo loading\nexit 5\necho never\n", "echo APP-RAN", 5, ["loading", EXIT_LINE.format(5)],
                        ["loading", ENDED_LINE.format(5)]),
    "ERR trap": ("trap 'exit 7' ERR; false; echo never", "echo APP-RAN", 7, [EXIT_LINE.format(7)],
                 [ENDED_LINE.format(7)]),
    "last command fails": (["echo 'Loading mymod/1.0'", "false"], "echo APP-RAN", 1,
                           ["Loading mymod/1.0", FAILED_LINE.format(1)], ["Loading mymod/1.0", FAILED_LINE.format(1)]),
    "set -e stop": ("set -e; false; echo never", "echo APP-RAN", 1, [], [ENDED_LINE.format(1)]),
    "subshell exit idiom": ("(exit 4); x=$(exit 6); echo set-up", "echo APP-RAN", 0, ["set-up", "APP-RAN"],
                            ["set-up", "APP-RAN"]),
    "own EXIT trap kept": ("trap 'echo user-trap' EXIT", "echo APP-RAN", 0, ["APP-RAN", "user-trap"],
                           ["APP-RAN", "user-trap"]),
    # bash execs the app (no trap of Balsam's left): the signal that kills it is the job's status.
    "app killed": ("true", "sh -c 'kill -9 $$'", -signal.SIGKILL, [], []),
}


def _job(job_id: int) -> Any:
    return types.SimpleNamespace(id=job_id, app_id=job_id, workdir=f"w{job_id}", num_nodes=1, ranks_per_node=1,
                                 threads_per_rank=1, threads_per_core=1, gpus_per_rank=0, node_packing_count=1,
                                 launch_params={}, parameters={}, serialized_parameters="", get_parameters=lambda: {})


class _App:
    preamble: Any = ""
    cmdline = "echo APP-RAN"
    own_env: dict[str, str] = {}

    def __init__(self, job: Any) -> None:
        self.job = job

    def get_arg_str(self) -> str:
        return self.cmdline

    def get_environ_vars(self) -> dict:
        return {**os.environ, **self.own_env}

    def shell_preamble(self) -> Any:
        return self.preamble


def _run_jobs(tmp_path: Path, apps: dict[int, type]) -> tuple[dict[int, int], dict[int, str]]:
    preparer = JobPreparer(tmp_path / "data", load_app=apps.__getitem__)
    pool = ProcessPool(4, wake=threading.Event())
    workdirs = {}
    try:
        for job_id in apps:
            prepared = preparer.prepare(_job(job_id))
            workdirs[job_id] = prepared.workdir
            pool.start(job_id, shell_line(prepared.cmdline, prepared.preamble, prepared.workdir), prepared.workdir,
                       prepared.env)
        exits: dict[int, int] = {}
        deadline = time.monotonic() + 30  # only keeps a broken test from hanging
        while len(exits) < len(apps) and time.monotonic() < deadline:
            time.sleep(0.01)
            for job_id, rc, _tail, _when in pool.reap():
                exits[job_id] = rc
    finally:
        pool.terminate_all(1.0)
    assert set(exits) == set(apps), f"not reported: {set(apps) - set(exits)}"
    return exits, {job_id: (workdir / "job.out").read_text() for job_id, workdir in workdirs.items()}


@pytest.mark.parametrize("posix_from", ["app", "launcher", "none"])
def test_preambles_run_and_report_in_posix_mode(posix_from: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: with POSIXLY_CORRECT set, every case here ended with status 2 and job.out
    "/bin/bash: line 1: `exit': is a special builtin"."""
    own_env = {"POSIXLY_CORRECT": "1"} if posix_from == "app" else {}
    if posix_from == "launcher":
        monkeypatch.setenv("POSIXLY_CORRECT", "1")
    else:
        monkeypatch.delenv("POSIXLY_CORRECT", raising=False)
    apps = {i: type(f"App{i}", (_App,), {"preamble": case[0], "cmdline": case[1], "own_env": own_env})
            for i, case in enumerate(CASES.values(), 1)}
    exits, outs = _run_jobs(tmp_path, apps)
    for job_id, (name, (_, _, status, lines, posix_lines)) in enumerate(CASES.items(), 1):
        out = outs[job_id]
        assert "special builtin" not in out, (name, out)
        assert exits[job_id] == status, (name, exits[job_id], out)
        assert "never" not in out, (name, out)
        assert out.splitlines() == (lines if posix_from == "none" else posix_lines), (name, out)


@pytest.mark.parametrize("posix", [False, True])
def test_exit_status_kept_when_stderr_cannot_be_written(posix: bool, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: ``set -e`` then ``exit 3`` with stderr closed or full ended the job with status 1
    (the message's echo failed, and errexit stopped the shell there)."""
    if posix:
        monkeypatch.setenv("POSIXLY_CORRECT", "1")
    else:
        monkeypatch.delenv("POSIXLY_CORRECT", raising=False)
    preambles = {"set -e; exec 2>&-; exit 3": 3, "set -e; exec 2>/dev/full; exit 3": 3, "exec 2>&-; exit 4": 4,
                 # the last command fails with stderr gone, set -e exempting it (a && list)
                 "set -e; exec 2>/dev/full; true && (exit 5)": 5}
    apps = {i: type(f"App{i}", (_App,), {"preamble": p}) for i, p in enumerate(preambles, 1)}
    exits, outs = _run_jobs(tmp_path, apps)
    for job_id, (preamble, status) in enumerate(preambles.items(), 1):
        assert exits[job_id] == status, (preamble, exits[job_id], outs[job_id])
        assert "APP-RAN" not in outs[job_id], (preamble, outs[job_id])
