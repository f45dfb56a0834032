"""`balsam queue submit` outside a site names every way to give one: `--site` takes an id, a site
name or a path fragment (docs/cli.md, "Choosing sites"), and the error used to offer `ID|PATH`
only, so a new user with the site's name at hand was told to look up its id or path."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from balsam.cli._site_selector import resolve_one_site


def test_outside_a_site_the_hint_names_id_name_and_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    monkeypatch.chdir(tmp_path)  # no .balsam-site here or above: not inside a site
    with pytest.raises(click.UsageError) as err:
        resolve_one_site("")
    assert "--site ID|NAME|PATH" in err.value.message, err.value.message
