"""Running a set of jobs through the real launcher on a faked machine (shared by the per-machine tests)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from platform_harness import finish, start_launcher
from launcher_harness import make_site
from launcher_helpers import make_runnable, wait_for_states

__all__ = ["PRINT_ENV", "balsam_client", "done_site_id", "job_out", "make_runnable", "run_jobs", "site_for",
           "wait_for_states"]

PRINT_ENV = "echo job {{ n }} CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES OMP_NUM_THREADS=$OMP_NUM_THREADS"


def site_for(tmp_path: Path, platform: str, **launcher: Any) -> tuple[str, Path]:
    name = f"{platform}-{uuid.uuid4().hex[:6]}"
    return name, make_site(tmp_path / name, name, {"platform": platform, "idle_ttl_sec": 2, **launcher})


def run_jobs(
    site: tuple[str, Path],
    mode: str,
    env: dict[str, str],
    jobs: Callable[[Any], Iterable[Any]],
    *,
    command_template: str = PRINT_ENV,
    states: frozenset[str] = frozenset({"RUN_DONE"}),
) -> dict[str, Any]:
    """Register an app, create ``jobs(App)`` runnable, run one launcher; ``{workdir: Job}``."""
    from balsam.api import ApplicationDefinition

    name, path = site

    PrintEnv = type("PrintEnv", (ApplicationDefinition,), {"site": name, "command_template": command_template})
    PrintEnv.sync()
    ids = make_runnable(jobs(PrintEnv))
    proc = start_launcher(path, mode, 10, env)
    done = wait_for_states(ids, set(states), timeout=90)
    assert finish(proc) == 0, Path(proc.console_path).read_text()
    return {str(j.workdir): j for j in done.values()}


def job_out(site: tuple[str, Path], workdir: str) -> str:
    return (site[1] / "data" / workdir / "job.out").read_text()


def balsam_client() -> Any:
    from balsam.client import load_client

    return load_client()


def done_site_id(done: dict[str, Any]) -> int:
    """The site of the jobs ``run_jobs`` returned."""
    return int(next(iter(done.values())).site_id)
