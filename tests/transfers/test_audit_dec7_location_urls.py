"""settings.yml transfer locations that urlsplit misreads: a '#' or '?' (``local:///data/run#1`` was
the directory /data/run, the rest dropped without a word) and an unclosed IPv6 bracket
(``rsync://me@[::1/p`` raised a bare ValueError, "Invalid IPv6 URL", out of the settings loader)
are settings errors naming the key and its line."""

from __future__ import annotations

import pytest

from balsam.config.settings import SettingsError, loads_settings
from balsam.transfer import TransferError, TransferLocation

SETTINGS = """transfers:
  transfer_locations:
    ok: local:///data/ok
    hash: local:///data/run#1
    query: globus://9d6d994a-6d04-11e5-ba46-22000b92c6ec?x=1
    bracket: rsync://me@[::1/scratch
"""


def test_locations_urlsplit_misreads_are_settings_errors() -> None:
    with pytest.raises(SettingsError) as info:
        loads_settings(SETTINGS)
    errors = info.value.errors
    assert len(errors) == 3, errors
    hash_, query, bracket = errors
    assert hash_.startswith("settings.yml:4 transfers.transfer_locations.hash: ")
    assert "'#' in 'local:///data/run#1' starts a URL fragment" in hash_ and "('#1' would be dropped)" in hash_
    assert query.startswith("settings.yml:5 transfers.transfer_locations.query: ")
    assert "starts a URL query" in query and "('?x=1' would be dropped)" in query
    assert bracket == ("settings.yml:6 transfers.transfer_locations.bracket: transfer location 'bracket': "
                       "Invalid IPv6 URL in 'rsync://me@[::1/scratch'")


@pytest.mark.parametrize("url, dropped", [("local:///a#b?c", "'#b?c'"), ("local:///a?b#c", "'?b#c'"),
                                          ("rsync://me@host/p?", "'?'")])
def test_the_first_mark_names_what_would_be_dropped(url: str, dropped: str) -> None:
    with pytest.raises(TransferError, match=f"\\({dropped.replace('?', '[?]')} would be dropped\\)") as info:
        TransferLocation.parse("x", url)
    assert not info.value.retryable


def test_well_formed_locations_parse_as_before() -> None:
    assert TransferLocation.parse("x", "rsync://me@[::1]:2222/p").netloc == "me@[::1]:2222"
    assert TransferLocation.parse("x", "local:///data/run 1/é").prefix == "/data/run 1/é"
