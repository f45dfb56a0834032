"""A settings.yml ``filter_tags`` key holding ':' is refused when the file is read, one line naming
the file, the line and the key. The queue maintainer counts this site's BatchJobs with the API's
tag filter, ``KEY:VALUE`` split at the first ':': ``filter_tags: {"a:b": c}`` was sent as tag
``a`` = ``"b:c"``, so it counted other BatchJobs (and missed its own) and submitted by that count."""

from __future__ import annotations

from pathlib import Path

import pytest

from balsam.config import SettingsError, load_settings


def test_a_colon_key_is_refused_naming_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "settings.yml"
    path.write_text("filter_tags:\n  exp: one\n  \"a:b\": c\n")
    for only in (None, ("filter_tags",)):  # the agent reads every section; a launcher the core ones
        with pytest.raises(SettingsError) as caught:
            load_settings(path, only=only)
        assert str(caught.value) == (
            f"{path}:3 filter_tags.a:b: key 'a:b' holds ':', which a filter tag key cannot (the API's tag filters "
            "are KEY:VALUE split at the first ':': it would be read as tag 'a' = 'b:c')")
    # A ':' in a value is sent as it is: kept.
    path.write_text("filter_tags:\n  exp: \"one:two\"\n")
    assert load_settings(path).filter_tags == {"exp": "one:two"}
