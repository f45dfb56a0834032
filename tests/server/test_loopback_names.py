"""The client (which sends a token over plain HTTP only to a loopback server) and the embedded
server (whose loopback port answers only loopback Host names) agree on what is loopback. Before:
the server knew ``localhost`` only and answered 421 to ``localhost.localdomain``,
``ip6-localhost`` and ``localhost.`` (a fully qualified name's trailing dot), which the client
took for loopback (``localhost.`` neither did)."""

from __future__ import annotations

import pytest

from balsam.client.transport import is_loopback_host as client_loopback
from balsam.server.embedded import is_loopback_host as server_loopback

LOOPBACK = ["localhost", "LocalHost", "localhost.", "localhost.localdomain", "LOCALHOST.LOCALDOMAIN.",
            "ip6-localhost", "ip6-localhost.", "127.0.0.1", "127.1.2.3", "::1", "[::1]", " localhost "]
NOT_LOOPBACK = ["", ".", "localhost..", "localhost.evil", "evil.localhost", "localhost.localdomain.evil",
                "127.0.0.1.nip.io", "0.0.0.0", "::", "[::2]", "10.0.0.1", "example.org."]


@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_names_and_addresses(host):
    assert client_loopback(host) and server_loopback(host), host


@pytest.mark.parametrize("host", NOT_LOOPBACK)
def test_other_names_and_addresses(host):
    assert not client_loopback(host) and not server_loopback(host), host
