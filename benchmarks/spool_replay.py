"""The site agent's spool replay (one ``SpoolReplayer.poll``) beside a plain replay of the same files.

The replay merges a job's updates spooled by several processes in the order their states were
reached and holds back a file whose update follows one in a file another process is sending
(``core/balsam/client/status_updater.py``). Its peer, measured in the same run on copies of the same
files: the plain file-order replay that ordered nothing (claim each ``*.jsonl`` file in name order,
read it, put its updates), the floor that reading and queueing the updates costs. Both put into a
sink (no HTTP: the poll alone). The shapes, ``--updates`` in all (10^5 by default):

- ``two-writers-all-shared``: half the jobs' RUNNING in writer 1's files, their RUN_DONE in writer
  2's (50 files): every job is merged.
- ``one-claimed-elsewhere``: 100 writers' files of unrelated updates, one small file claimed by a
  live launcher.
- ``claimed-elsewhere-many-late``: the claimed file holds 100 jobs' RUNNING; 100 writers' files of
  unrelated updates, then 100 writers' files each with one of those jobs' RUN_DONE among unrelated
  ones (held back: the poll queues half; the plain replay queues them all, RUN_DONE before RUNNING).

Before the worklist, the last shape took 8-14 s a poll at 10^5 updates (the plain replay: 0.6 s).

Usage: ``.venv/bin/python benchmarks/spool_replay.py [--updates 100000] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from balsam.client import status_updater as su

T0 = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.timezone.utc)


class Sink:
    """What the poll needs of its updater: updates are counted, each is done at once."""

    def __init__(self) -> None:
        self.count = 0
        self.spool_files: list[Path] = []

    def put_update(self, update: dict[str, Any], stamp_session: bool = True) -> int:
        self.count += 1
        return self.count

    def done_through(self, sequence: int) -> bool:
        return True


def update(job: int, state: str, sec: float) -> dict[str, Any]:
    return {"id": job, "state": state, "state_timestamp": (T0 + dt.timedelta(seconds=sec)).isoformat(),
            "session_id": 7}


def write(spool: Path, pid: int, serial: int, updates: list[dict[str, Any]]) -> Path:
    """A spool file as process ``pid`` of this host names it (its ``serial``-th file)."""
    path = spool / f"{su.spool_prefix(socket.gethostname(), pid)}{1_800_000_000_000_000_000 + serial}{su.SPOOL_SUFFIX}"
    path.write_text("".join(json.dumps(u) + "\n" for u in updates))
    return path


def claim_elsewhere(path: Path) -> None:
    """Claimed by a live launcher of this host: this benchmark's parent process (no start time in
    the tag: it counts as alive while its pid runs and its claim is fresh)."""
    os.rename(path, path.with_name(f"{path.name}{su.CLAIM_MARK}{socket.gethostname()}-{os.getppid()}"))


def two_writers_all_shared(spool: Path, n: int) -> None:
    per_file = max(1, n // 50)
    for f in range(25):
        jobs = range(f * per_file, (f + 1) * per_file)
        write(spool, 1, f, [update(j, "RUNNING", j) for j in jobs])
        write(spool, 2, f, [update(j, "RUN_DONE", j + 0.5) for j in jobs])


def one_claimed_elsewhere(spool: Path, n: int) -> None:
    claim_elsewhere(write(spool, 99999, 0, [update(10**9, "RUNNING", 0)]))
    per_file = max(1, n // 100)
    for w in range(100):
        write(spool, 1000 + w, 0, [update(w * per_file + j, "RUNNING", j) for j in range(per_file)])


def claimed_elsewhere_many_late(spool: Path, n: int) -> None:
    claim_elsewhere(write(spool, 99999, 0, [update(10**9 + k, "RUNNING", 0) for k in range(100)]))
    per_file = max(1, n // 200)
    for w in range(100):
        write(spool, 1000 + w, 0, [update(w * per_file + j, "RUNNING", j) for j in range(per_file)])
    for w in range(100):
        write(spool, 5000 + w, 0, [update(10**9 + w, "RUN_DONE", 10)]
              + [update(10**8 + w * per_file + j, "RUNNING", j) for j in range(per_file - 1)])


SHAPES: dict[str, Callable[[Path, int], None]] = {
    "two-writers-all-shared": two_writers_all_shared,
    "one-claimed-elsewhere": one_claimed_elsewhere,
    "claimed-elsewhere-many-late": claimed_elsewhere_many_late,
}


def poll(spool: Path) -> int:
    sink = Sink()
    su.SpoolReplayer(spool, sink).poll()  # type: ignore[arg-type]
    return sink.count


def plain(spool: Path) -> int:
    """The replay that ordered nothing: each unclaimed file in name order, claimed, read, put."""
    sink = Sink()
    for name in sorted(os.listdir(spool)):
        if not name.endswith(su.SPOOL_SUFFIX):
            continue
        claimed = su.claim_spool_file(spool / name, agent=True)
        if claimed is None:
            continue
        for item in su.spooled_updates(spool / name, claimed.read_text().splitlines()):
            sink.put_update(item, stamp_session=False)
    return sink.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="spool-replay-"))
    try:
        print(f"{args.updates:,} spooled updates per shape; median of {args.repeat} runs each, alternated")
        for name, make in SHAPES.items():
            template = root / name
            template.mkdir()
            make(template, args.updates)
            times: dict[str, list[float]] = {"poll": [], "plain": []}
            queued: dict[str, int] = {}
            for round_ in range(args.repeat):
                order = [("poll", poll), ("plain", plain)]
                for which, run in order if round_ % 2 == 0 else order[::-1]:
                    spool = root / f"{name}-{which}-{round_}"
                    # Fresh copies (their mtime now: the launcher's claim is not stale).
                    shutil.copytree(template, spool, copy_function=shutil.copyfile)
                    started = time.perf_counter()
                    queued[which] = run(spool)
                    times[which].append(time.perf_counter() - started)
                    su._HELD_CLAIMS.clear()  # the claims of this process on the deleted copy
                    shutil.rmtree(spool)
            mine, peer = statistics.median(times["poll"]), statistics.median(times["plain"])
            print(f"{name:28} poll {mine:6.2f} s ({queued['poll']:,} queued)   plain file-order replay "
                  f"{peer:6.2f} s ({queued['plain']:,} queued)   poll/plain {mine / peer:4.1f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
