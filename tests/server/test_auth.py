"""/auth routes, tokens and password hashing."""

from __future__ import annotations

import uuid

import httpx
import jwt
import pytest

from balsam.server.auth import create_token, decode_token, hash_password, verify_password
from balsam.server.errors import Unauthorized

SECRET = "balsam-test-secret-key-not-for-production-use-0123456789"  # tests/conftest.py SERVER_SECRET


def test_how_lists_password_login(server_url):
    resp = httpx.get(f"{server_url}/auth/how")
    assert resp.status_code == 200
    assert resp.json() == ["LoginMethod.password"]


def test_register_login_me(server_url):
    name, password = f"u-{uuid.uuid4().hex[:8]}", "s3cret pass"
    resp = httpx.post(f"{server_url}/auth/password/register", json={"username": name, "password": password})
    assert resp.status_code == 201
    user = resp.json()
    assert user["username"] == name and isinstance(user["id"], int)

    # The Balsam 0.7 client sends an OAuth2 password form.
    resp = httpx.post(f"{server_url}/auth/password/login", data={"username": name, "password": password,
                                                                 "grant_type": "password", "scope": ""})
    assert resp.status_code == 200
    body = resp.json()
    assert body["token_type"] == "bearer" and body["access_token"] and body["expiration"]
    me = httpx.get(f"{server_url}/auth/password/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.json() == user

    # JSON login is accepted too.
    resp = httpx.post(f"{server_url}/auth/password/login", json={"username": name, "password": password})
    assert resp.status_code == 200


def test_register_duplicate_and_bad_input(server_url):
    name = f"u-{uuid.uuid4().hex[:8]}"
    assert httpx.post(f"{server_url}/auth/password/register", json={"username": name, "password": "x"}).status_code == 201
    dup = httpx.post(f"{server_url}/auth/password/register", json={"username": name, "password": "y"})
    assert dup.status_code == 400 and "already taken" in dup.json()["detail"]
    bad = httpx.post(f"{server_url}/auth/password/register", json={"username": "", "password": ""})
    assert bad.status_code == 422
    fields = {tuple(e["loc"]) for e in bad.json()["detail"]}
    assert fields == {("body", "username"), ("body", "password")}
    garbage = httpx.post(f"{server_url}/auth/password/register", content=b"{not json", headers={"content-type": "application/json"})
    assert garbage.status_code == 422 and "malformed JSON" in garbage.json()["detail"][0]["msg"]


def test_wrong_password_and_missing_fields(server_url, register):
    name, _pw, *_ = register(server_url)
    resp = httpx.post(f"{server_url}/auth/password/login", data={"username": name, "password": "wrong"})
    assert resp.status_code == 401 and resp.json()["detail"] == "Incorrect username or password"
    resp = httpx.post(f"{server_url}/auth/password/login", data={"username": name})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "password"]


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer not-a-jwt", "Basic abc"])
def test_protected_routes_need_a_valid_token(server_url, header):
    headers = {"Authorization": header} if header else {}
    for path in ("/sites/", "/apps/", "/jobs/", "/batch-jobs/", "/sessions/", "/transfers/", "/events/",
                 "/auth/password/me"):
        resp = httpx.get(f"{server_url}{path}", headers=headers)
        assert resp.status_code == 401, path
        assert "detail" in resp.json()


def test_expired_and_forged_tokens_are_refused(server_url, register):
    _name, _pw, user_id, _tok, _exp = register(server_url)
    expired, _ = create_token(user_id, "x", SECRET, ttl_sec=-10)
    resp = httpx.get(f"{server_url}/sites/", headers={"Authorization": f"Bearer {expired}"})
    assert resp.status_code == 401 and "expired" in resp.json()["detail"].lower()
    forged, _ = create_token(user_id, "x", "another-secret" * 4, ttl_sec=3600)
    resp = httpx.get(f"{server_url}/sites/", headers={"Authorization": f"Bearer {forged}"})
    assert resp.status_code == 401


def test_password_hash_is_salted_scrypt():
    first, second = hash_password("pw"), hash_password("pw")
    assert first != second and first.startswith("scrypt$")
    assert verify_password("pw", first) and verify_password("pw", second)
    assert not verify_password("PW", first)
    assert not verify_password("pw", None) and not verify_password("pw", "garbage")


def test_token_roundtrip_and_expiry():
    token, expiration = create_token(7, "alice", "k" * 40, 60)
    user = decode_token(token, "k" * 40)
    assert (user.id, user.username) == (7, "alice")
    assert jwt.decode(token, "k" * 40, algorithms=["HS256"])["exp"] == int(expiration.timestamp())
    with pytest.raises(Unauthorized):
        decode_token(token, "other" * 10)
