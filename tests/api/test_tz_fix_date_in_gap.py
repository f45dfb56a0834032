"""A day given to a filter starts at its first instant where daylight saving starts at midnight.

In Cairo (2026-04-24) and Santiago (2026-09-06) the clock goes from 23:59:59 to 01:00: local midnight
does not exist, and ``date`` filters were sent an hour before the day began (23:00 the day before).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest

from balsam._api.query import encode_filter_value

UTC = dt.timezone.utc


@pytest.fixture
def zone(monkeypatch: pytest.MonkeyPatch) -> Any:
    def set_zone(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()

    yield set_zone
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("name, day, first", [
    ("Africa/Cairo", dt.date(2026, 4, 24), dt.datetime(2026, 4, 23, 22, tzinfo=UTC)),
    ("America/Santiago", dt.date(2026, 9, 6), dt.datetime(2026, 9, 6, 4, tzinfo=UTC)),
    ("America/Chicago", dt.date(2026, 3, 8), dt.datetime(2026, 3, 8, 6, tzinfo=UTC)),  # the change at 02:00
])
def test_a_day_whose_midnight_does_not_exist_starts_at_its_first_instant(zone: Any, name: str, day: dt.date,
                                                                          first: dt.datetime) -> None:
    zone(name)
    sent = dt.datetime.fromisoformat(encode_filter_value(day))
    assert sent == first, sent
    # The day itself, locally: the instant sent is on it, the second before is on the day before.
    assert dt.datetime.fromtimestamp(sent.timestamp()).date() == day
    assert dt.datetime.fromtimestamp(sent.timestamp() - 1).date() == day - dt.timedelta(days=1)
