"""``balsam app sync``, which Balsam 0.7's docs name (its CLI never had it), says how apps are synced
now (``ApplicationDefinition.sync()`` from Python) instead of click's bare "No such command 'sync'"."""

from __future__ import annotations

from cli_test_utils import balsam, fresh_api_state  # noqa: F401 (autouse)


def test_app_sync_points_to_the_python_sync() -> None:
    out = balsam("app", "sync")
    assert out.exit_code == 2, out.output
    # Not "a Balsam 0.7 command": 0.7's command line never had it.
    assert "`balsam app sync` is no command (Balsam 0.7's docs name it; its command line never had it)" in out.output
    assert "0.7 command" not in out.output and ".sync()" in out.output, out.output
    assert "No such command" not in out.output
