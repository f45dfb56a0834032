"""A launcher's end-of-run note (runnable jobs it never leased: serial mode's multi-rank note, mpi
mode's wall-time note) is not made when a filter tag key holds ':' (the jobs listing's tag filter
is KEY:VALUE, cut at the first ':'). That was logged at debug only, so a site with such a key
(settings.yml filter_tags, ``queue submit -tag``) lost the note without a word: one INFO line now
says why. (Here, beside the site's filter_tags tests: the launcher's own tests are another helper's.)"""

from __future__ import annotations

import logging
import types
from typing import Any

import pytest

import balsam.launcher.modes.mpi as mpi_mode
import balsam.launcher.modes.serial as serial_mode


def _launcher(filter_tags: dict[str, str]) -> Any:
    context = types.SimpleNamespace(site_id=3, filter_tags=filter_tags, wall_time_min=10, batch_job_id=None)
    return types.SimpleNamespace(context=context, countdown=None)


@pytest.mark.parametrize("note, module, logger_name", [
    (serial_mode.SerialMode.note_multi_rank_jobs, serial_mode, "balsam.launcher.modes.serial"),
    (mpi_mode.MPIMode.note_too_long_jobs, mpi_mode, "balsam.launcher.modes.mpi"),
])
def test_the_note_given_up_for_a_colon_key_says_why_at_info(note: Any, module: Any, logger_name: str,
                                                            monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    sent: list[Any] = []
    monkeypatch.setattr(module, "default_client", lambda: types.SimpleNamespace(get=lambda *a, **k: sent.append(a)))
    with caplog.at_level(logging.INFO, logger=logger_name):
        assert note(_launcher({"proj:exp": "1", "x": "y"})) is None
    lines = [r for r in caplog.records if r.name == logger_name]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO, [(r.levelname, r.getMessage()) for r in lines]
    assert "'proj:exp'" in lines[0].getMessage() and "':'" in lines[0].getMessage(), lines[0].getMessage()
    assert sent == []  # no listing sent
