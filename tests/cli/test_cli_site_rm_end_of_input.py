"""``balsam site rm`` without ``-y`` and with no answer (standard input ended: a script, cron)
fails with one line naming the question and ``-y``, status 1, and deletes nothing: it was
click's bare "Aborted!", which said neither."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cli_test_utils import balsam, fresh_api_state, make_marked_site  # noqa: F401 (autouse)


def test_site_rm_at_end_of_input_names_the_question_and_yes(balsam_env: Any, tmp_path: Path) -> None:
    from balsam.api import Site

    site = make_marked_site(tmp_path, "eoi-site")
    out = balsam("site", "rm", str(tmp_path / "eoi-site"), input="")
    assert out.exit_code == 1, out.output
    assert out.stderr.strip().splitlines()[-1] == (
        "Error: no answer to 'Do you really want to destroy eoi-site? This will wipe out 0 jobs inside!': "
        "standard input ended; pass -y/--yes to go on without asking"), out.stderr
    assert "Aborted!" not in out.output
    assert (tmp_path / "eoi-site").is_dir() and Site.objects.get(id=site.id).name == "eoi-site"
    # "n" keeps both, status 1 as before
    out = balsam("site", "rm", str(tmp_path / "eoi-site"), input="n\n")
    assert out.exit_code == 1 and (tmp_path / "eoi-site").is_dir(), out.output
    out = balsam("site", "rm", str(tmp_path / "eoi-site"), "-y")
    assert out.exit_code == 0 and not (tmp_path / "eoi-site").exists(), out.output
