"""The per-rank GPU wrappers of docs/platforms/polaris.md and aurora.md, run as written: each rank of
a packed job narrows to its own share of the list Balsam set, so packed jobs never double-book."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs" / "platforms"


def wrapper(page: str, name: str, tmp_path: Path) -> Path:
    blocks = [b for b in re.findall(r"```bash\n(.*?)\n```", (DOCS / page).read_text(), re.DOTALL) if name in b]
    assert len(blocks) == 1, f"{page} shows {name} once"
    path = tmp_path / name
    path.write_text(blocks[0] + "\n")
    path.chmod(0o755)
    return path


def seen(script: Path, variable: str, value: str | None, rank_var: str, rank: int, **extra: str) -> str:
    env = {"PATH": "/usr/bin:/bin", rank_var: str(rank), **extra}
    if value is not None:
        env[variable] = value
    out = subprocess.run([str(script), "sh", "-c", f'echo "${{{variable}-unset}}"'], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("page, name, variable, rank_var, per_rank_var", [
    ("polaris.md", "gpu_per_rank.sh", "CUDA_VISIBLE_DEVICES", "PMI_LOCAL_RANK", "GPUS_PER_RANK"),
    ("aurora.md", "tile_per_rank.sh", "ZE_AFFINITY_MASK", "PALS_LOCAL_RANKID", "TILES_PER_RANK"),
])
def test_packed_jobs_keep_their_own_gpus(page: str, name: str, variable: str, rank_var: str, per_rank_var: str,
                                         tmp_path: Path) -> None:
    script = wrapper(page, name, tmp_path)
    # two packed two-rank jobs on one node, given "3,2" and "1,0" (or tiles "0,1" and "2,3")
    first, second = ("3,2", "1,0") if variable == "CUDA_VISIBLE_DEVICES" else ("0,1", "2,3")
    used = [seen(script, variable, ids, rank_var, r) for ids in (first, second) for r in (0, 1)]
    assert sorted(used) == sorted(first.split(",") + second.split(","))
    # two ids per rank
    assert [seen(script, variable, "3,2,1,0", rank_var, r, **{per_rank_var: "2"}) for r in (0, 1)] == ["3,2", "1,0"]
    # MIG instances: one UUID per rank
    assert seen(script, variable, "MIG-a,MIG-b", rank_var, 1) == "MIG-b"
    # a multi-node job (no list set): left as it is
    assert seen(script, variable, None, rank_var, 1) == "unset"
