"""settings.yml ``logging.buffer_num_records`` has an upper bound, refused in one line naming the
key and its line, like the other counts (``launcher.max_concurrent_mpiruns``, ``processing.num_workers``).

Unbounded, ``buffer_num_records: 100000000000000000000000`` passed: the buffer was never full, so only
``flush_period`` (up to a year) wrote the records; each process's log stayed in its memory and a
SIGKILL lost all of it.
"""

from __future__ import annotations

import pytest

from balsam.config import SettingsError, loads_settings


@pytest.mark.parametrize("value", ["100001", "2147483648", "100000000000000000000000"])
def test_a_buffer_past_the_bound_is_refused_in_one_line(value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        loads_settings(f"logging:\n  level: INFO\n  buffer_num_records: {value}\n")
    (line,) = caught.value.errors
    assert line == (f"settings.yml:3 logging.buffer_num_records: must be at most 100000 (records held in memory "
                    f"by each process), got {value}"), line
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("value", [0, 1, 1024, 100000])
def test_buffers_up_to_the_bound_load(value: int) -> None:
    assert loads_settings(f"logging:\n  buffer_num_records: {value}\n").logging.buffer_num_records == value


def test_the_bound_is_in_the_help_text() -> None:
    import attrs

    from balsam.config.schema import MAX_LOG_BUFFER_RECORDS, LoggingSettings

    assert MAX_LOG_BUFFER_RECORDS == 100_000
    assert "at most 100000" in attrs.fields(LoggingSettings).buffer_num_records.metadata["help"]
