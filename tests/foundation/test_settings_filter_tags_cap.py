"""settings.yml ``filter_tags``: at most MAX_TAG_FILTERS (100), refused when the settings load, in
one line naming file, line, key, limit and count. Every launcher's acquire sends them, and the API
refuses an acquire with more: each one was a 422, for the whole allocation."""

from __future__ import annotations

import pytest

from balsam.config import SettingsError, loads_settings


def _settings_text(count: int) -> str:
    return "launcher:\n  platform: default\nfilter_tags:\n" + "".join(f"  k{i}: v{i}\n" for i in range(count))


def test_the_limit_is_taken() -> None:
    assert len(loads_settings(_settings_text(100), only=("filter_tags",)).filter_tags) == 100


def test_one_more_is_refused_naming_the_key_the_limit_and_the_count() -> None:
    with pytest.raises(SettingsError) as info:
        loads_settings(_settings_text(101), source="/site/settings.yml", only=("filter_tags",))
    assert info.value.errors == [
        "/site/settings.yml:3 filter_tags: at most 100 tags (the API's limit on an acquire's filter_tags), got 101"]
