"""The embedded server's log: rotated by size, every line capped (an access line carries the whole
query string: 50 KB for a request naming 5,000 job ids)."""

from __future__ import annotations

import logging
import logging.config
from pathlib import Path

from balsam.server.embedded import (
    DEFAULT_LOG_MAX_BYTES,
    LOG_BACKUP_COUNT,
    MAX_LOG_LINE_CHARS,
    log_config,
    log_max_bytes_from_env,
)


def test_long_lines_are_capped_and_the_file_rotates(tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    # dictConfig sets these loggers for the whole process (the "balsam" logger stops propagating):
    # put them back, or later tests of this worker lose balsam's records (caplog saw nothing).
    names = ("uvicorn", "uvicorn.error", "uvicorn.access", "balsam")
    saved = {name: (logging.getLogger(name).level, logging.getLogger(name).propagate,
                    list(logging.getLogger(name).handlers), logging.getLogger(name).disabled) for name in names}
    logging.config.dictConfig(log_config(log_file, "info", max_bytes=20_000))
    access = logging.getLogger("uvicorn.access")
    try:
        ids = "&".join(f"id={i}" for i in range(5000))
        for _ in range(40):
            access.info('127.0.0.1 - "GET /jobs/?%s HTTP/1.1" 200', ids)
        logging.getLogger("balsam.server").warning("short line")
    finally:
        for handler in access.handlers + logging.getLogger("balsam").handlers:
            handler.close()
        for name, (level, propagate, handlers, disabled) in saved.items():
            logger = logging.getLogger(name)
            logger.setLevel(level)
            logger.propagate = propagate
            logger.handlers[:] = handlers
            logger.disabled = disabled
    files = sorted(tmp_path.glob("server.log*"))
    assert [f.name for f in files] == ["server.log", *(f"server.log.{i}" for i in range(1, LOG_BACKUP_COUNT + 1))]
    assert all(f.stat().st_size <= 20_000 + MAX_LOG_LINE_CHARS + 200 for f in files)
    lines = [line for f in files for line in f.read_text().splitlines()]
    long = [line for line in lines if "GET /jobs/" in line]
    assert long and all(len(line) <= MAX_LOG_LINE_CHARS + 40 for line in long)
    assert long[0].endswith("more characters]")
    assert log_file.read_text().splitlines()[-1].endswith("short line")  # the newest file


def test_the_rotation_size_comes_from_the_environment_and_a_bad_value_is_said(monkeypatch, capsys) -> None:
    monkeypatch.setenv("BALSAM_SERVER_LOG_MAX_BYTES", "123456")
    assert log_max_bytes_from_env() == 123456
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("BALSAM_SERVER_LOG_MAX_BYTES", "10M")
    assert log_max_bytes_from_env() == DEFAULT_LOG_MAX_BYTES
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "BALSAM_SERVER_LOG_MAX_BYTES='10M'" in err[0] and "default" in err[0]
    monkeypatch.delenv("BALSAM_SERVER_LOG_MAX_BYTES")
    assert log_max_bytes_from_env() == DEFAULT_LOG_MAX_BYTES
