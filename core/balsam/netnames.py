"""Which host names are this machine's loopback: one answer for the client (which sends tokens
over plain HTTP only to a loopback server) and the server (whose loopback TCP port answers only
loopback ``Host`` names, against DNS rebinding). Standard library only: both import it at once."""

from __future__ import annotations

import ipaddress

#: Names that mean this machine (``/etc/hosts`` of common distributions), compared lower-cased and
#: without a trailing dot.
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or address, IPv6 with or without brackets, no port) is a loopback
    one: a name of :data:`LOOPBACK_NAMES`, 127.0.0.0/8 or ::1. A fully qualified name's trailing
    dot (``localhost.``) is the same name."""
    host = (host or "").strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host[:-1] if host.endswith(".") else host
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 literal in brackets (``::1`` -> ``[::1]``), anything
    else as it is (``http://::1:8765`` is no URL)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
