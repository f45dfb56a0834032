"""The source of an app loaded from the API whose stored source is empty (it was synced from
``python -c`` or a REPL, where no source can be read). ``source_code`` then looked the class up by
name in the loading process's ``__main__`` file: a script defining another class of that name got
that class's source, and ``sync()`` of the loaded class stored it with the other class's code.
Real processes against the live server."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any


def test_loaded_app_with_no_stored_source_never_takes_a_local_class_source(balsam_env: Any, tmp_path: Path) -> None:
    from balsam.api import Site
    from balsam._api.models import App

    name = f"site-{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    Site.objects.create(name=name, path=str(tmp_path / name))
    interactive = textwrap.dedent(f"""
        from balsam.api import ApplicationDefinition
        class Square(ApplicationDefinition):
            site = {name!r}
            def run(self, x):
                return x * x
        Square.sync()
    """)
    subprocess.run([sys.executable, "-c", interactive], check=True, capture_output=True, text=True, timeout=120)
    app = App.objects.get(name="Square")
    assert app.source_code == ""

    script = tmp_path / "other.py"
    script.write_text(textwrap.dedent(f"""
        from balsam.api import ApplicationDefinition
        class Square(ApplicationDefinition):  # another class of the same name, never synced
            site = {name!r}
            def run(self, x):
                return "LOCAL CLASS"
        loaded = ApplicationDefinition.load_by_site({name!r})["Square"]
        assert loaded is not Square
        print("SOURCE", repr(loaded.source_code))
        loaded.sync()
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SOURCE ''" in proc.stdout
    assert "LOCAL CLASS" not in proc.stdout
    assert App.objects.get(id=app.id).source_code == ""
