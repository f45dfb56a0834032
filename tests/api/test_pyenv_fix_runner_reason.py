"""The one line a run() app's runner prints when a dependency is installed in the app's
``python_exe`` but cannot be used (too old: "cannot import name 'X' from 'Y'"): it said "module 'Y'
is not installed there", which sent the user to install what was installed, and dropped the name
that was missing. Real venv (``python -m venv``) with an old ``typing_extensions`` in it."""

from __future__ import annotations

from pathlib import Path

from balsam._api.app import parse_run_markers, python_runner_command
from balsam._api.python_runner import missing_module_reason
from test_pyenv_runner import RUNNER_DEPS, _app, _job, assert_one_line, python_env, run_line


def test_a_too_old_dependency_is_named_with_what_it_lacks(tmp_path: Path) -> None:
    deps = tuple(d for d in RUNNER_DEPS if d != "typing_extensions.py")
    python = python_env(tmp_path, "old-typing-extensions", deps)
    # Installed, but from before the names the runner's imports use.
    (python.parent.parent / "balsam-deps" / "typing_extensions.py").write_text("from typing import *\n"
                                                                               "__version__ = 'old'\n")
    code, out = run_line(python_runner_command(_app(str(python)), _job({"x": 1})), tmp_path)
    assert code != 0
    line = assert_one_line(out, f"in {python} (Python ", "module 'typing_extensions' there cannot be used",
                           "too old", "cannot import name", "python_exe")
    assert "not installed" not in line
    assert parse_run_markers(out) == (None, None)


def test_reasons_for_each_kind_of_import_error() -> None:
    missing = ModuleNotFoundError("No module named 'dill'", name="dill")
    assert missing_module_reason(missing).startswith("module 'dill' is not installed there; ")
    old = ImportError("cannot import name 'NoDefault' from 'typing_extensions' (/env/typing_extensions.py)",
                      name="typing_extensions", path="/env/typing_extensions.py")
    reason = missing_module_reason(old)
    assert reason.startswith("module 'typing_extensions' there cannot be used (too old, or a broken build): "
                             "cannot import name 'NoDefault' from 'typing_extensions' (/env/typing_extensions.py); ")
    assert "not installed" not in reason and "\n" not in reason
    # A build for another Python (no module name on the error): Python's words, first line only.
    foreign = ImportError("/env/orjson.so: undefined symbol: PyUnicode_X\nmore")
    assert missing_module_reason(foreign).startswith("an import failed there (too old, or a broken build): "
                                                     "/env/orjson.so: undefined symbol: PyUnicode_X; ")


def test_a_relative_python_exe_with_a_space_runs_when_quoted_as_documented(tmp_path: Path) -> None:
    """docs/api.md: a relative path runs in the job's workdir, which the launcher does not look in
    when it decides whether python_exe is one file; quoted by the user (shell words, as in 0.7) it
    is one word wherever it is."""
    from balsam._api.app import python_exe_words

    workdir = tmp_path / "workdir"
    workdir.mkdir()
    python_env(workdir, "my venv", RUNNER_DEPS)
    assert python_exe_words("my venv/bin/python") == "my venv/bin/python"  # shell words: two of them
    value = "'my venv/bin/python'"
    assert python_exe_words(value) == value
    code, out = run_line(python_runner_command(_app(value), _job({"x": 1})), workdir)
    assert code == 0, out
    assert parse_run_markers(out)[0] is not None, out
