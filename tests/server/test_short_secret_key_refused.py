"""A token signing key shorter than 32 bytes is refused when the server reads its settings: tokens
are HMAC-SHA256, and a short key can be found offline from any one token, after which any user's
token can be forged (PyJWT only warns)."""

from __future__ import annotations

import pytest

from balsam.server.settings import MIN_SECRET_KEY_BYTES, ServerSettings


def test_a_short_key_from_the_environment_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("BALSAM_AUTH_SECRET_KEY", "hunter2")
    with pytest.raises(ValueError) as caught:
        ServerSettings.from_env(database_url=f"sqlite:///{tmp_path / 'b.db'}")
    message = str(caught.value)
    assert "BALSAM_AUTH_SECRET_KEY is 7 bytes" in message and "at least 32" in message and "\n" not in message
    assert "hunter2" not in message  # the key itself is never shown


def test_keys_of_32_bytes_and_the_generated_one_are_accepted(monkeypatch, tmp_path):
    monkeypatch.setenv("BALSAM_AUTH_SECRET_KEY", "k" * MIN_SECRET_KEY_BYTES)
    assert ServerSettings.from_env(database_url=f"sqlite:///{tmp_path / 'a.db'}").secret_key == "k" * 32
    monkeypatch.delenv("BALSAM_AUTH_SECRET_KEY")
    generated = ServerSettings.from_env(database_url=f"sqlite:///{tmp_path / 'b.db'}").secret_key
    assert len(generated.encode()) >= MIN_SECRET_KEY_BYTES
