"""run() apps under another Python than Balsam's: the app's ``python_exe`` (a venv, a container
wrapper, another Python minor version). Real interpreters made here with ``python -m venv``; the
command line is the one a launcher runs (``python_runner_command``), run through bash with its
output in one file, as job.out.

What a user must see when the interpreter cannot run the app is ONE line naming the interpreter and
what it lacks, not a traceback of Balsam's frames."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import tblib

import balsam
from balsam._api import codec
from balsam._api.app import parse_run_markers, python_runner_command

#: Where the runner's dependencies are installed for this test run (the .venv's site-packages).
SITE_PACKAGES = Path(tblib.__file__).parent.parent
CORE = Path(balsam.__file__).parent.parent
#: What the runner imports (pure Python but orjson, which another minor version never reaches: the
#: runner stops at the app's version first).
RUNNER_DEPS = ("attr", "attrs", "cattrs", "dill", "tblib", "typing_extensions.py", "orjson")


def python_env(root: Path, name: str, deps: tuple[str, ...], base: Optional[Path] = None) -> Path:
    """A venv (``python -m venv``, no pip) where Balsam is importable (a ``.pth`` to its source)
    with only ``deps`` of its dependencies (links to the installed ones); its python."""
    base = base or Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    env = root / name
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    site = next((env / "lib").glob("python3.*/site-packages"))
    links = env / "balsam-deps"
    links.mkdir()
    for dep in deps:
        (links / dep).symlink_to(SITE_PACKAGES / dep)
    (site / "balsam-test.pth").write_text(f"{CORE}\n{links}\n")
    return env / "bin" / "python"


def another_minor_python() -> Optional[Path]:
    """An installed CPython 3.8+ of another minor version than this one (pyenv's, beside this
    one's base), or None."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in sorted(Path(sys.base_prefix).parent.glob("3.*/bin/python3")):
        version = candidate.parent.parent.name.split(".")
        if len(version) >= 2 and version[1].isdecimal() and int(version[1]) >= 8 and ".".join(version[:2]) != here:
            return candidate
    return None


def _app(python_exe: str):
    from balsam.api import ApplicationDefinition

    class Elsewhere(ApplicationDefinition):
        site = 1

        def run(self, x):
            import sys

            return [x, sys.executable]

    Elsewhere.python_exe = python_exe
    Elsewhere.__app_id__ = 41
    return Elsewhere


def _job(params: dict):
    from balsam.api import Job

    return Job._from_api({"id": 9, "workdir": "w", "app_id": 41, "serialized_parameters": codec.serialize(params)})


def run_line(line: str, cwd: Path, env: Optional[dict] = None) -> tuple[int, str]:
    """The line through bash, stdout and stderr in one file as the launcher writes job.out."""
    out = cwd / "job.out"
    # Without PYTHONPATH: each venv finds Balsam through its own .pth (the source this test imported).
    env = {k: v for k, v in (env or os.environ).items() if k != "PYTHONPATH"}
    with open(out, "wb") as fh:
        code = subprocess.run(["/bin/bash", "-c", line], cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                              env=env, timeout=120).returncode
    return code, out.read_text()


def assert_one_line(text: str, *needles: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_a_python_without_dill_says_so_in_one_line(tmp_path: Path) -> None:
    """Before: a 15-line traceback ending in "its code needs module 'dill'" (as if the app's code
    needed it), without saying which interpreter."""
    python = python_env(tmp_path, "nodill", tuple(d for d in RUNNER_DEPS if d != "dill"))
    code, out = run_line(python_runner_command(_app(str(python)), _job({"x": 1})), tmp_path)
    assert code == 78
    line = assert_one_line(out, str(python), "module 'dill' is not installed", "python_exe")
    assert "its code needs" not in line
    assert parse_run_markers(out) == (None, None)


def test_a_python_without_tblib_says_so_in_one_line(tmp_path: Path) -> None:
    """A dependency the runner imports before its own code runs: before, a traceback from the
    runner's import lines."""
    python = python_env(tmp_path, "notblib", tuple(d for d in RUNNER_DEPS if d != "tblib"))
    code, out = run_line(python_runner_command(_app(str(python)), _job({"x": 1})), tmp_path)
    assert code == 78
    assert_one_line(out, f"in {python} (Python ", "module 'tblib' is not installed")


def test_a_python_without_balsam_names_itself_and_balsam(tmp_path: Path) -> None:
    """The runner's bootstrap line (Python's own, exit 1, before: a quick failure relaunched 3
    times): one line, the interpreter and the module, and the runner's set-up exit 78."""
    env = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    code, out = run_line(python_runner_command(_app(str(python)), _job({"x": 1})), tmp_path)
    assert code == 78
    assert_one_line(out, str(python), "module 'balsam' is not installed there")


def test_another_python_minor_version_says_which_in_one_line(tmp_path: Path) -> None:
    """An app synced from this Python, run by another minor version (dill cannot load code across
    them): before, a traceback ending in the versions, without the interpreter's path, and advice
    (re-sync from the other version) that the launcher, loading the app in this one, refutes."""
    other = another_minor_python()
    if other is None:
        pytest.skip("no CPython of another minor version installed beside this one")
    python = python_env(tmp_path, "other", RUNNER_DEPS, base=other)
    code, out = run_line(python_runner_command(_app(str(python)), _job({"x": 1})), tmp_path)
    assert code == 78
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    line = assert_one_line(out, str(python), f"was synced from Python {here}",
                           f"set the app's python_exe to a Python {here} that has Balsam")
    # Not the codec's "or re-sync the app from" the other version: the launcher could not load it then.
    assert "re-sync" not in line


@pytest.mark.parametrize("version", ["3.9", "3.12", "3.13"])
def test_the_program_starts_the_runner_in_each_python(tmp_path: Path, version: str) -> None:
    """The ``-c`` program starts the runner with ``runpy._run_module_as_main`` (what ``-m`` calls;
    private, so checked in old and the newest CPythons installed): there the runner runs and says
    the app's version is not this one, in its own line (a missing function: a traceback). (3.8
    reaches the runner too, whose models fail there with this venv's attrs, linked in.)"""
    found = sorted(Path(sys.base_prefix).parent.glob(f"{version}.*/bin/python3"))
    if not found or version == f"{sys.version_info.major}.{sys.version_info.minor}":
        pytest.skip(f"no CPython {version} beside this one")
    python = python_env(tmp_path, "other", RUNNER_DEPS, base=found[0])
    code, out = run_line(python_runner_command(_app(str(python)), _job({"x": 1})), tmp_path)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert code == 78, out
    assert_one_line(out, f"{python} (Python {version}.", f"was synced from Python {here}")


def test_the_same_python_in_a_venv_runs_the_app(tmp_path: Path) -> None:
    """The control: a venv of this Python with the runner's dependencies runs run() and returns
    its value through the marker, read by this process."""
    python = python_env(tmp_path, "full", RUNNER_DEPS)
    code, out = run_line(python_runner_command(_app(str(python)), _job({"x": 5})), tmp_path)
    assert code == 0, out
    value, _ = parse_run_markers(out)
    assert codec.deserialize(value) == [5, str(python)]


FAKE_APPTAINER = r"""#!/bin/bash
# `apptainer exec [options] IMAGE CMD...` as the real one behaves for this test: the host's
# environment passes in (APPTAINERENV_X becomes X), a missing image is FATAL with status 255, and
# CMD is exec'd; the "image" is a file naming the python that is python3 inside it.
[ "$1" = exec ] || { echo "FATAL:   unknown command $1" >&2; exit 255; }
shift
while [ $# -gt 0 ]; do case "$1" in --nv|--cleanenv|-e) shift;; -B|--bind) shift 2;; *) break;; esac; done
image=$1; shift
[ -f "$image" ] || { echo "FATAL:   could not open image $image: no such file or directory" >&2; exit 255; }
for v in $(compgen -e); do case "$v" in APPTAINERENV_*) export "${v#APPTAINERENV_}=${!v}"; unset "$v";; esac; done
export APPTAINER_CONTAINER="$image" APPTAINER_NAME="$(basename "$image")"
if [ "$1" = python3 ]; then shift; exec "$(head -1 "$image")" "$@"; fi
exec "$@"
"""


@pytest.mark.parametrize("form", ["apptainer", "env var", "flag"])
def test_python_exe_is_shell_words_as_in_balsam_07(tmp_path: Path, form: str) -> None:
    """Balsam 0.7 put ``python_exe`` on the line as written: a container wrapper, a variable, an
    interpreter flag. Before, it was quoted as one word: "apptainer exec ...: No such file or
    directory" (exit 127), in both launcher modes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(FAKE_APPTAINER)
    (bin_dir / "apptainer").chmod(0o755)
    image = tmp_path / "image.sif"
    image.write_text(f"{sys.executable}\n")
    python_exe = {"apptainer": f"apptainer exec --nv {image} python3",
                  "env var": "$APP_PYTHON_HOME/bin/python",
                  "flag": f"{sys.executable} -u"}[form]
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               APP_PYTHON_HOME=str(Path(sys.executable).parent.parent))
    code, out = run_line(python_runner_command(_app(python_exe), _job({"x": 3})), tmp_path, env)
    assert code == 0, out
    value, _ = parse_run_markers(out)
    assert codec.deserialize(value)[0] == 3


def test_a_python_exe_path_with_a_space_stays_one_word(tmp_path: Path) -> None:
    """An existing interpreter whose path has a space is quoted (0.7 split it)."""
    from balsam._api.app import python_exe_words

    spaced = python_env(tmp_path, "my envs", RUNNER_DEPS)
    assert python_exe_words(str(spaced)) == f"'{spaced}'"
    code, out = run_line(python_runner_command(_app(str(spaced)), _job({"x": 4})), tmp_path)
    assert code == 0, out
    assert codec.deserialize(parse_run_markers(out)[0])[0] == 4
    # Words stay words; a plain path costs no quoting.
    assert python_exe_words("apptainer exec img.sif python3") == "apptainer exec img.sif python3"
    assert python_exe_words(sys.executable) == sys.executable
    assert re.fullmatch(r"\S+", python_exe_words(sys.executable))
