"""A jobs.json of the local queue damaged by bytes that are not UTF-8: the error names the file
(it was a bare "UnicodeDecodeError: 'utf-8' codec can't decode byte ...", naming none)."""

from __future__ import annotations

import pytest

from balsam.builtin.local_queue import LocalQueue, QueueError


def test_non_utf8_jobs_file_is_an_error_naming_the_file(tmp_path):
    queue = LocalQueue(tmp_path / "state")
    queue.db_path.write_bytes(b'{"next_id": 1, "jobs": {}}\xff\xfe garbage')
    with pytest.raises(QueueError) as info:
        queue._read()
    assert str(info.value).startswith(f"{queue.db_path} is not valid JSON (")
    assert "fix or move it" in str(info.value)


def test_damaged_json_still_names_the_file_and_line(tmp_path):
    queue = LocalQueue(tmp_path / "state")
    queue.db_path.write_text("{\n not json")
    with pytest.raises(QueueError, match=r"jobs\.json is not valid JSON \(.* at line 2\)"):
        queue._read()
