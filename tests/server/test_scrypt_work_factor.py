"""BALSAM_AUTH_SCRYPT_N: scrypt's work factor for new password hashes (default 2**14).

The test servers of tests/conftest.py run at the floor (registering and logging in every test's
user cost ~115 ms of scrypt at the default); these tests pin the default, the setting's effect on
a real server, its refusal of bad values, and that hashes of another N keep verifying.
"""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa

from balsam.server import auth
from balsam.server.settings import ServerSettings
from balsam.util import EnvNumberError

PASSWORD = "a-long-enough-password"


def _stored_n(database_url: str, username: str) -> int:
    """The N recorded in ``username``'s hash (``scrypt$N$r$p$salt$digest``)."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            stored = conn.execute(sa.text("SELECT hashed_password FROM users WHERE username = :u"), {"u": username}).scalar_one()
    finally:
        engine.dispose()
    return int(stored.split("$")[1])


def _login(url: str, username: str) -> int:
    return httpx.post(f"{url}/auth/password/login", data={"username": username, "password": PASSWORD},
                      timeout=30).status_code


def test_a_server_without_the_setting_stores_n_16384(live_server_factory, register):
    # A blank value is an unset one: this server runs at the default, unlike the suite's others.
    server = live_server_factory(env={"BALSAM_AUTH_SCRYPT_N": ""})
    username = register(server.url, password=PASSWORD)[0]
    assert _stored_n(server.database_url, username) == 16384
    assert "weaker than recommended" not in server.log_tail()


def test_the_setting_sets_n_of_new_hashes(live_server_factory, register):
    """Before: the work factor was fixed (N=16384 whatever the environment said)."""
    server = live_server_factory(env={"BALSAM_AUTH_SCRYPT_N": "2048"})
    username = register(server.url, password=PASSWORD)[0]
    assert _stored_n(server.database_url, username) == 2048
    warning = [line for line in server.log_tail().splitlines() if "BALSAM_AUTH_SCRYPT_N" in line]
    assert warning == ["balsam server: WARNING: BALSAM_AUTH_SCRYPT_N=2048 is weaker than recommended (16384, "
                       "RFC 7914 for interactive logins): new password hashes are 8x cheaper to crack if the "
                       "database leaks"]
    assert _login(server.url, username) == 200


def test_hashes_of_another_n_keep_verifying(monkeypatch):
    """A hash verifies with the N it records, whatever the setting is now."""
    monkeypatch.setenv("BALSAM_AUTH_SCRYPT_N", "2048")
    made_at_2048 = auth.hash_password(PASSWORD)
    monkeypatch.setenv("BALSAM_AUTH_SCRYPT_N", "")
    assert auth.verify_password(PASSWORD, made_at_2048) and not auth.verify_password("wrong", made_at_2048)
    assert auth.hash_password(PASSWORD).split("$")[1] == "16384"


def test_a_bad_value_stops_the_server_with_one_line(live_server_factory):
    """Before: any value was ignored and the server started at N=16384."""
    with pytest.raises(RuntimeError, match="exited with code 3") as failed:
        live_server_factory(env={"BALSAM_AUTH_SCRYPT_N": "3000"})
    assert ("balsam server: environment variable BALSAM_AUTH_SCRYPT_N='3000' is not a power of two from 1024 to "
            "131072 (e.g. 16384)") in str(failed.value).splitlines()
    assert "Traceback" not in str(failed.value)


@pytest.mark.parametrize(("value", "line"), [
    ("3000", "environment variable BALSAM_AUTH_SCRYPT_N='3000' is not a power of two from 1024 to 131072 (e.g. 16384)"),
    ("512", "environment variable BALSAM_AUTH_SCRYPT_N='512' is not a number from 1024 to 131072 (digits only, e.g. 30)"),
    ("262144", "environment variable BALSAM_AUTH_SCRYPT_N='262144' is not a number from 1024 to 131072 (digits only, e.g. 30)"),
    ("2**14", "environment variable BALSAM_AUTH_SCRYPT_N='2**14' is not a number from 1024 to 131072 (digits only, e.g. 30)"),
    ("1e4", "environment variable BALSAM_AUTH_SCRYPT_N='1e4' is not a number from 1024 to 131072 (digits only, e.g. 30)"),
])
def test_bad_values_are_refused_with_one_line_naming_the_variable(monkeypatch, value, line):
    monkeypatch.setenv("BALSAM_AUTH_SCRYPT_N", value)
    with pytest.raises(EnvNumberError) as refused:
        ServerSettings.from_env("sqlite://", secret_key="x" * 32)
    assert str(refused.value) == line


def test_the_setting_is_read_and_the_unknown_user_stand_in_costs_the_same(monkeypatch):
    """The stand-in hash checked for unknown user names has the configured N (the same scrypt work
    as a real user's hash made since), not the default's. Before: both were always 16384."""
    monkeypatch.setenv("BALSAM_AUTH_SCRYPT_N", "2048")
    assert auth._hash_for_timing().split("$")[1:4] == ["2048", "8", "1"]
    assert auth.hash_password(PASSWORD).split("$")[1:4] == ["2048", "8", "1"]
    assert ServerSettings.from_env("sqlite://", secret_key="x" * 32).scrypt_n == 2048
    monkeypatch.setenv("BALSAM_AUTH_SCRYPT_N", "")
    assert ServerSettings.from_env("sqlite://", secret_key="x" * 32).scrypt_n == 16384
    assert auth._hash_for_timing().split("$")[1] == "16384"


def test_n_above_openssl_default_memory_limit_hashes_and_verifies(monkeypatch):
    """N=2**15 at r=8 needs 32 MiB and a little more: OpenSSL's default limit (32 MiB) refused it
    (ValueError), so without an explicit maxmem a larger setting broke every login."""
    monkeypatch.setenv("BALSAM_AUTH_SCRYPT_N", str(2**15))
    hashed = auth.hash_password(PASSWORD)
    assert hashed.split("$")[1] == str(2**15)
    assert auth.verify_password(PASSWORD, hashed) and not auth.verify_password("wrong", hashed)


def test_a_stored_hash_beyond_the_cap_is_refused_without_spending_its_memory():
    # A corrupt or planted row (N=2**24: 2 GiB) must not make one login allocate gigabytes.
    salt_and_digest = "c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 44
    assert auth.verify_password(PASSWORD, f"scrypt${2**24}$8$1${salt_and_digest}") is False
