"""Credential labels are stored without control characters (written out as escapes).

Labels come from any user (``POST /auth/password/login`` field ``label``, ``POST
/auth/credentials`` body) and ``balsam server credentials`` prints them to the administrator's
terminal as they are. Before: ``"\\x1b[2J..."`` or ``"\\r"`` was stored as sent, so a user could
clear the administrator's screen, rewrite the lines above (hiding a credential), or set the
terminal's title or clipboard (OSC sequences) while the administrator listed credentials.
"""

from __future__ import annotations

import httpx
import pytest
from server_testlib import Api

#: (sent, stored)
HOSTILE = [
    ("x\x1b[2J\x1b[Hfake listing", "x\\x1b[2J\\x1b[Hfake listing"),
    ("ok\rrewritten", "ok\\rrewritten"),
    ("osc \x1b]52;c;ZWNobyBoaQ==\x07", "osc \\x1b]52;c;ZWNobyBoaQ==\\x07"),
    ("del\x7f c1 \x9b31m", "del\\x7f c1 \\x9b31m"),
    ("rtl \u202egnp.exe", "rtl \\u202egnp.exe"),
]


def _labels(url: str, token: str) -> dict[int, str]:
    resp = httpx.get(f"{url}/auth/credentials", headers={"Authorization": f"Bearer {token}"})
    resp.raise_for_status()
    return {c["id"]: c["label"] for c in resp.json()["results"]}


@pytest.mark.parametrize("sent,stored", HOSTILE)
def test_login_label_is_stored_without_control_characters(live_server, register, sent, stored):
    username, password, *_ = register(live_server)
    resp = httpx.post(f"{live_server}/auth/password/login",
                      data={"username": username, "password": password, "scope": "offline_access", "label": sent})
    assert resp.status_code == 200, resp.text
    labels = _labels(live_server, resp.json()["access_token"])
    assert stored in labels.values(), labels
    assert all(label.isprintable() for label in labels.values()), labels


def test_launcher_credential_label_is_stored_without_control_characters(live_server, register):
    api = Api(live_server, register)
    try:
        site = api.site()
        for sent, stored in HOSTILE:
            created = api.ok("POST", "/auth/credentials", 201, json={"site_id": site["id"], "ttl_sec": 600, "label": sent})
            assert created["label"] == stored
        labels = _labels(live_server, api.token)
        assert all(label.isprintable() for label in labels.values()), labels
        # At most 200 characters, escapes included.
        created = api.ok("POST", "/auth/credentials", 201,
                         json={"site_id": site["id"], "ttl_sec": 600, "label": "\x1b" * 200})
        assert created["label"] == ("\\x1b" * 50)
    finally:
        api.close()


def test_ordinary_labels_are_kept(live_server, register):
    username, password, *_ = register(live_server)
    long_label = "balsam login on " + "h" * 300  # cut to 200 characters, as before
    for label, stored in (("balsam login on polaris-login-02", "balsam login on polaris-login-02"),
                          ("généré à Zürich – 東京", "généré à Zürich – 東京"), (long_label, long_label[:200])):
        resp = httpx.post(f"{live_server}/auth/password/login",
                          data={"username": username, "password": password, "label": label})
        assert resp.status_code == 200, resp.text
        assert stored in _labels(live_server, resp.json()["access_token"]).values()
