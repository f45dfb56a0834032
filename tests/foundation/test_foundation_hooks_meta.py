"""Every hook is documented and tested.

Each hookspec in ``balsam/plugins/hookspecs.py`` needs a ``## balsam_xxx`` section in
``docs/plugins/hooks.md`` and a test function named ``test_hook_balsam_xxx`` (or ``test_hook_xxx``)
somewhere under ``tests/``. The failure message lists exactly what is missing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from balsam.plugins import hookspecs

REPO = Path(__file__).resolve().parents[2]
HOOKS_DOC = REPO / "docs" / "plugins" / "hooks.md"
TESTS = REPO / "tests"


def hook_names() -> list[str]:
    names = []
    for name in dir(hookspecs):
        function = getattr(hookspecs, name)
        if callable(function) and hasattr(function, f"{hookspecs.PROJECT_NAME}_spec"):
            names.append(name)
    return sorted(names)


def documented_hooks() -> set[str]:
    return set(re.findall(r"^## (balsam_\w+)\s*$", HOOKS_DOC.read_text(), flags=re.MULTILINE))


def hooks_with_tests() -> dict[str, list[str]]:
    """hook name -> files holding a test_hook_<name> function."""
    found: dict[str, list[str]] = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_hook_"):
                suffix = node.name[len("test_hook_"):]
                name = suffix if suffix.startswith("balsam_") else f"balsam_{suffix}"
                found.setdefault(name, []).append(str(path.relative_to(REPO)))
    return found


def test_there_are_hooks():
    assert "balsam_cli_commands" in hook_names()
    assert len(hook_names()) >= 6


def test_hookspecs_name_real_types():
    """The names imported under TYPE_CHECKING exist, and every argument has a real type."""
    import typing

    specs = hookspecs
    tree = ast.parse(Path(specs.__file__).read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    namespace = dict(vars(specs))
    exec(compile(ast.Module(body=guarded.body, type_ignores=[]), specs.__file__, "exec"), namespace)
    for name in hook_names():
        hints = typing.get_type_hints(getattr(specs, name), globalns=namespace)
        assert hints.pop("return") is type(None), name
        assert hints and all(hint is not typing.Any for hint in hints.values()), f"{name}: {hints}"


def test_every_hook_has_a_doc_section():
    missing = [name for name in hook_names() if name not in documented_hooks()]
    assert not missing, f"hooks without a '## <name>' section in {HOOKS_DOC.relative_to(REPO)}: {', '.join(missing)}"
    stale = sorted(documented_hooks() - set(hook_names()))
    assert not stale, f"{HOOKS_DOC.relative_to(REPO)} documents hooks that do not exist: {', '.join(stale)}"


def test_every_hook_has_a_test():
    tested = hooks_with_tests()
    missing = [name for name in hook_names() if name not in tested]
    assert not missing, (
        "hooks without a test (write a function named test_hook_<hook name> under tests/): " + ", ".join(missing)
    )
