"""A forged ``X-Forwarded-For`` that uvicorn cannot split into host and port still counts as
one forwarded address (login throttling).

uvicorn started by hand trusts ``X-Forwarded-For`` from 127.0.0.1 by default; without
``BALSAM_TRUSTED_PROXIES`` the server puts every request whose client address uvicorn took from
that header on one address (``forwarded-unverified``). It recognised such a request by the
header's hosts with their port or brackets taken off, but uvicorn keeps an item it cannot split
(``198.51.100.7:x1``, ``[198.51.100.7]x1``) whole as the client address. Before: each such forged
value was a new address with a fresh count, so anybody reaching the port over loopback (another
user of the host, an SSH tunnel) escaped every per-address and per-user-and-address limit.
"""

from __future__ import annotations

import uuid
from typing import Any, Iterator

import httpx
import pytest

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def throttled_server(live_server_factory: Any) -> Any:
    """3 failures per user name and address, 6 per address."""
    return live_server_factory("sqlite", env={"BALSAM_AUTH_MAX_FAILURES_PER_USER": "3",
                                              "BALSAM_AUTH_MAX_FAILURES_PER_ADDRESS": "6",
                                              "BALSAM_AUTH_FAILURE_WINDOW_SEC": "600"})


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.1"), timeout=60) as c:
        yield c


def _user(server: Any) -> str:
    from balsam.server.admin import Admin

    name = f"u-{uuid.uuid4().hex[:8]}"
    with Admin(server.database_url) as admin:
        admin.add_user(name, PASSWORD, 12)
    return name


@pytest.mark.parametrize("forged", ["198.51.100.7:x{i}", "[198.51.100.7]x{i}", "[2001:db8::{i}]zz",
                                    "203.0.113.5, 198.51.100.7:p{i}"])
def test_unsplittable_forwarded_values_share_one_address(throttled_server, client, forged):
    url, victim = throttled_server.url, _user(throttled_server)
    statuses = [client.post(f"{url}/auth/password/login", data={"username": victim, "password": "wrong guess x"},
                            headers={"X-Forwarded-For": forged.format(i=i)}).status_code for i in range(5)]
    # One address for all of them (shared by the cases of this module: the address may already
    # be restricted to 1 try per user name by an earlier case): refused after 3 tries at the most.
    assert statuses[0] == 401 and statuses[3:] == [429, 429], statuses
    # The victim's own requests from 127.0.0.1 without the header are counted apart.
    resp = client.post(f"{url}/auth/password/login", data={"username": victim, "password": PASSWORD})
    assert resp.status_code == 200, resp.text


def test_forwarded_hosts_cover_what_uvicorn_takes():
    """Every address uvicorn's proxy middleware may set from a header is in the set the server
    recognises as forwarded."""
    from uvicorn.middleware.proxy_headers import _TrustedHosts

    from balsam.server.auth import _forwarded_hosts

    trusted = _TrustedHosts("127.0.0.1")
    for value in ["198.51.100.7", "198.51.100.7:80", "198.51.100.7:x1", "[2001:db8::1]", "[2001:db8::1]:443",
                  "[2001:db8::1]x", "[2001:db8::1]:x", "2001:db8::1", "a, b:c, [d]e", " spaced  ,  198.51.100.9:q ",
                  "[unclosed", "host:1:2", "127.0.0.1, 198.51.100.3:zz"]:
        host, _port = trusted.get_trusted_client_address(value)
        assert not host or host in _forwarded_hosts([value]), (value, host)
