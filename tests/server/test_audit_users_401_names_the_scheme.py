"""Every 401 of the API says which scheme it wants, ``WWW-Authenticate: Bearer`` (RFC 7235 3.1: a
401 MUST carry it; Balsam 0.7's FastAPI server sent it): it was missing from all of them, a token
that is absent, malformed or not one, and a wrong password alike."""

from __future__ import annotations

import httpx


def test_a_401_carries_www_authenticate_bearer(server_url: str) -> None:
    answers = [
        httpx.get(f"{server_url}/sites/", timeout=30),
        httpx.get(f"{server_url}/jobs/", headers={"Authorization": "Bearer not-a-token"}, timeout=30),
        httpx.get(f"{server_url}/jobs/", headers={"Authorization": "Basic dTpw"}, timeout=30),
        httpx.post(f"{server_url}/auth/password/login", data={"username": "nobody-here", "password": "x" * 12}, timeout=30),
    ]
    assert [(r.status_code, r.headers.get("www-authenticate")) for r in answers] == [(401, "Bearer")] * len(answers)
