"""balsam.platform.read_node_file: a PBS/Cobalt node file's hosts, each once, in the order first listed
(one per line, or comma and whitespace separated), for a full-machine Aurora node file too."""

from __future__ import annotations

from pathlib import Path

import pytest

from balsam.platform import hosts_from_node_file, read_node_file


@pytest.mark.parametrize("text,hosts", [
    ("x1\nx2\nx3\n", ["x1", "x2", "x3"]),
    # PBS lists a host once per chunk (place=pack, mpiprocs): each host counts once, where first seen.
    ("x2\nx1\nx2\nx3\nx1\n", ["x2", "x1", "x3"]),
    ("x1,x2,,x1\n", ["x1", "x2"]),  # comma separated, an empty field
    (" x1 , x2\tx3\r\n\nx2 x4", ["x1", "x2", "x3", "x4"]),  # spaces, tabs, CRLF, blank lines
    ("", []),
    ("\n , \n", []),
    ("X1\nx1\n", ["X1", "x1"]),  # names as written: no case folding
])
def test_hosts_each_once_in_order(tmp_path: Path, text: str, hosts: list[str]) -> None:
    node_file = tmp_path / "nodefile"
    node_file.write_text(text)
    assert read_node_file(str(node_file)) == hosts


def test_full_machine_node_file(tmp_path: Path) -> None:
    # 10,624 Aurora nodes, each listed twice (two chunks per node): every one kept once, in order.
    names = [f"x{4000 + i // 64}c{i // 8 % 8}s{i % 8}b0n0.hostmgmt.cm.aurora.alcf.anl.gov" for i in range(10_624)]
    node_file = tmp_path / "nodefile"
    node_file.write_text("".join(f"{h}\n{h}\n" for h in names))
    assert read_node_file(str(node_file)) == names
    assert hosts_from_node_file({"PBS_NODEFILE": str(node_file)}, "PBS_NODEFILE", inside="a PBS job") == names


def test_errors_name_the_variable_and_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"\$PBS_NODEFILE is not set: not inside a PBS job"):
        hosts_from_node_file({}, "PBS_NODEFILE", inside="a PBS job")
    missing = tmp_path / "gone"
    with pytest.raises(RuntimeError, match=rf"cannot read \$PBS_NODEFILE {missing}"):
        hosts_from_node_file({"PBS_NODEFILE": str(missing)}, "PBS_NODEFILE", inside="a PBS job")
    empty = tmp_path / "empty"
    empty.write_text(" ,\n")
    with pytest.raises(RuntimeError, match=rf"\$PBS_NODEFILE {empty} lists no nodes"):
        hosts_from_node_file({"PBS_NODEFILE": str(empty)}, "PBS_NODEFILE", inside="a PBS job")
