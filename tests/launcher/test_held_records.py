"""The launcher's start-up log hold (balsam.launcher.entry.HeldRecords): a record logged once reaches
the log file once, also when it is logged after the log file opened and before the hold ends (the
early Session's thread logs "session N created" then: it was written twice)."""

from __future__ import annotations

import logging

from balsam.launcher.entry import HeldRecords, configure_logging


def test_a_record_logged_after_the_log_file_opened_is_written_once(tmp_path):
    log = logging.getLogger("balsam.test_held_records")
    root = logging.getLogger("balsam")
    before = list(root.handlers), root.level
    path = tmp_path / "launcher.log"
    held = HeldRecords(echo=True)
    try:
        with held:
            log.info("before the log file")
            configure_logging(path)
            log.info("after the log file opened")
            held.replay()
        for handler in root.handlers:
            handler.flush()
        lines = path.read_text().splitlines()
        assert sum("before the log file" in line for line in lines) == 1, lines
        assert sum("after the log file opened" in line for line in lines) == 1, lines
    finally:
        for handler in list(root.handlers):
            if handler not in before[0]:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(before[1])
