"""Start-up of a Python ``run()`` job: balsam's modules compiled ahead against compiled as they load.

A ``run()`` job is the line the launchers start, ``python -m balsam._api.python_runner ...``, built
here for a small app with ``python_runner_command`` (no server needed: the job carries its app and
parameters on the command line). Every process runs with ``PYTHONDONTWRITEBYTECODE=1`` (what
containers and CI often set), against one of two copies of the installed ``balsam`` package made for
this run, first on ``PYTHONPATH``:

- **compiled**: the copy compiled with ``compileall`` first (what ``scripts/bootstrap.sh`` and a
  regular ``pip install`` leave);
- **source**: the copy without bytecode, so each process compiles every balsam module it imports
  (an editable install where no process may write bytecode).

Beside them, in the same rounds, the floor: the same interpreter running ``python -c pass``. The
sides alternate within each round; printed: the median wall time and CPU (user + system) per
process. The copies go away at the end.

``--baseline CHECKOUT`` adds sides that compare whole environments, as installed: the same line
run by this checkout's venv (``sys.executable``, no ``PYTHONPATH``) and by ``CHECKOUT/.venv`` (made
by that checkout's ``scripts/bootstrap.sh``: e.g. ``git worktree add /tmp/base HEAD~1``, then
``bash /tmp/base/scripts/bootstrap.sh``), each beside its own ``python -c pass``. So a change to
what a run() job imports, or to how balsam is installed, is measured against the code before it in
the same rounds.

    .venv/bin/python benchmarks/python_app_startup.py [--rounds 10] [--runs 2] [--baseline CHECKOUT]
"""

from __future__ import annotations

import argparse
import compileall
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import balsam
from balsam.api import ApplicationDefinition, Job
from balsam._api.app import python_runner_command


class Square(ApplicationDefinition):
    site = "bench"

    def run(self, x: int) -> int:
        return x * x


def runner_line() -> str:
    Square.__app_id__ = 1
    return python_runner_command(Square, Job(workdir="bench/1", app_id=1, parameters={"x": 3}))


def copy_of_balsam(root: Path, compiled: bool) -> Path:
    target = root / "balsam"
    shutil.copytree(Path(balsam.__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__"))
    if compiled and not compileall.compile_dir(target, quiet=1):
        raise SystemExit(f"compileall failed on {target}")
    return root


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one process (its CPU from this process's children's usage)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or "BALSAM-EXCEPTION" in proc.stdout:
        raise SystemExit(f"{argv[:3]} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=2, help="processes per side in each round")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="another checkout whose .venv (made by its scripts/bootstrap.sh) to compare this one's with")
    args = parser.parse_args()
    line = runner_line()
    if not line.startswith(sys.executable + " "):
        raise SystemExit(f"the runner line does not start with this interpreter ({sys.executable}): {line[:80]}")
    other_python = None
    if args.baseline is not None:
        other_python = str(args.baseline.resolve() / ".venv" / "bin" / "python")
        if not os.access(other_python, os.X_OK):
            raise SystemExit(f"--baseline {args.baseline}: no {other_python} (run its scripts/bootstrap.sh first)")
    base_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory(prefix="balsam-app-startup-") as tmp:
        roots = {"compiled": copy_of_balsam(Path(tmp, "compiled"), True),
                 "source": copy_of_balsam(Path(tmp, "source"), False)}
        sides: dict[str, tuple[list[str], dict[str, str]]] = {
            name: (["bash", "-c", line], {**base_env, "PYTHONPATH": str(root)}) for name, root in roots.items()}
        sides["python -c pass"] = ([sys.executable, "-c", "pass"], base_env)
        if other_python is not None:
            sides["installed"] = (["bash", "-c", line], base_env)
            sides["baseline"] = (["bash", "-c", other_python + line[len(sys.executable):]], base_env)
            sides["baseline python -c pass"] = ([other_python, "-c", "pass"], base_env)
        for name, (_argv, env) in sides.items():
            if name in roots:  # the copy is the balsam these processes import
                where = subprocess.run([sys.executable, "-c", "import balsam; print(balsam.__file__)"], env=env,
                                       capture_output=True, text=True, check=True).stdout.strip()
                if not where.startswith(str(roots[name])):
                    raise SystemExit(f"{name}: balsam imported from {where}, not from the copy")
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        order = list(sides)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                argv, env = sides[name]
                results[name].extend(timed(argv, env) for _ in range(args.runs))
    print(f"Python run() job start-up ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"PYTHONDONTWRITEBYTECODE=1; {args.rounds} alternated rounds x {args.runs} processes per side; medians)")
    labels = [("compiled", "run() job, balsam compiled ahead"), ("source", "run() job, balsam compiled as it loads"),
              ("python -c pass", "python -c pass (the floor)")]
    if other_python is not None:
        labels += [("installed", "run() job, this venv as installed"), ("baseline", "run() job, --baseline's venv"),
                   ("baseline python -c pass", "python -c pass, --baseline's venv")]
    for name, label in labels:
        walls, cpus = zip(*results[name])
        print(f"  {label:42s} wall {statistics.median(walls) * 1000:6.0f} ms   CPU {statistics.median(cpus) * 1000:6.0f} ms")
    saved = statistics.median(c for _w, c in results["source"]) - statistics.median(c for _w, c in results["compiled"])
    print(f"  compiling balsam as it loads costs each run() job {saved * 1000:.0f} ms of CPU")
    if other_python is not None:
        for what, index in (("wall", 0), ("CPU", 1)):
            base, this = (statistics.median(x[index] for x in results[k]) for k in ("baseline", "installed"))
            print(f"  this checkout against --baseline: {what} {base * 1000:.0f} -> {this * 1000:.0f} ms "
                  f"({(this - base) * 1000:+.0f} ms per run() job)")


if __name__ == "__main__":
    main()
