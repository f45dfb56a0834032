"""How the client reaches the one server it logged in to, and nothing else.

- ``unix:///path/balsam.sock``: the embedded server's Unix socket. Before connecting, the client
  checks that the socket's directory belongs to this user and nobody else may enter it (mode 0700),
  so no other user can put a socket there to collect tokens (as anyone can with a TCP port on
  127.0.0.1 while the server is down).
- ``https://``: certificate verification by the machine's authorities (a server behind a reverse
  proxy with a real certificate), or - when ``balsam login`` found the certificate unverifiable and
  the user accepted its fingerprint - only that exact certificate (pinned, trust on first use).
- ``http://``: only to this machine (loopback: SSH tunnels, tests), unless the login opted in with
  ``--insecure-http``: a bearer token or password sent in clear text to another host is a gift to
  whoever listens on the network.

A server on this machine (Unix socket, loopback http) is reached through the standard library's
``http.client`` (:mod:`balsam.client.local_http`, see :func:`local_pool_args`); any other through
httpx (:func:`httpx_client_args`), imported only then. For the same reason ``ssl`` and ``hashlib``
(~7 ms together) are imported by the functions that deal with certificates, not with this module:
every process that imports ``balsam.api`` imports it, and one that talks to a local server (or to
none: a Python ``run()`` job) never uses them.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlparse

from balsam.netnames import LOOPBACK_NAMES, is_loopback_host  # noqa: F401 - this module's names too

if TYPE_CHECKING:  # pragma: no cover
    import ssl

UNIX_SCHEME = "unix://"
#: The Host header sent over the Unix socket.
UNIX_BASE_URL = "http://balsam.local"


class TransportRefused(RuntimeError):
    """The client refuses to send anything to this address (the message says why and what to do)."""


def is_unix(api_root: str) -> bool:
    return api_root.startswith(UNIX_SCHEME)


def unix_socket_path(api_root: str) -> Path:
    return Path(api_root[len(UNIX_SCHEME):])


def check_private_socket(path: Path) -> None:
    """Refuse a socket whose directory another user could write to (or that another user owns)."""
    uid = os.getuid()
    try:
        dir_stat = path.parent.stat()
    except FileNotFoundError:
        raise TransportRefused(f"{path.parent} does not exist: the local Balsam server is not running "
                               "(`balsam server start`)") from None
    if dir_stat.st_uid != uid or stat.S_IMODE(dir_stat.st_mode) & 0o077:
        raise TransportRefused(f"refusing to use the socket {path}: its directory must belong to you with mode 0700 "
                               f"(owner uid {dir_stat.st_uid}, mode {stat.S_IMODE(dir_stat.st_mode):o})")
    try:
        sock_stat = path.lstat()
    except FileNotFoundError:
        return  # not listening: the connection is refused, and nothing is sent
    if sock_stat.st_uid != uid or not stat.S_ISSOCK(sock_stat.st_mode):
        raise TransportRefused(f"refusing to use {path}: not a socket of yours")


def fingerprint_of_pem(pem: str) -> str:
    """SHA-256 of the certificate's DER bytes, as ``AB:CD:...`` (what ``openssl x509 -fingerprint
    -sha256`` prints)."""
    import hashlib
    import ssl

    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def normalize_fingerprint(text: str) -> str:
    hexchars = "".join(c for c in text.upper().removeprefix("SHA256:") if c in "0123456789ABCDEF")
    return ":".join(hexchars[i:i + 2] for i in range(0, len(hexchars), 2))


def pinned_ssl_context(pem: str) -> ssl.SSLContext:
    """A context that accepts exactly this certificate. The host name is not checked: the pinned
    certificate is the server's identity (it may name another host, or none)."""
    import ssl

    ctx = ssl.create_default_context(cadata=pem)
    ctx.check_hostname = False
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


def fetch_server_certificate(api_root: str, timeout: float = 10.0) -> str:
    """The PEM certificate an https server presents (unverified: for the user to accept or not)."""
    import ssl

    parsed = urlparse(api_root)
    host, port = parsed.hostname or "", parsed.port or 443
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    if not der:
        raise TransportRefused(f"{api_root} presented no certificate")
    return ssl.DER_cert_to_PEM_cert(der)


def no_tls_context() -> ssl.SSLContext:
    """The SSL context of an httpx client that talks plain http only.

    httpx builds an SSL context for every client whether or not it will use TLS, and its default
    one loads the system's and certifi's authorities: ~20 ms of CPU, a tenth of a launcher's
    start-up. This one loads no authority at all and still requires a verified certificate and
    host name, so an https request through such a client fails verification (fails closed)."""
    import ssl

    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def httpx_client_args(api_root: str, *, server_certificate: Optional[str] = None,
                      allow_insecure_http: bool = False) -> dict[str, Any]:
    """``httpx.Client`` keyword arguments (base_url, verify) for an https or http api_root;
    raises :class:`TransportRefused` when the client must not talk to it. (A Unix socket is
    :func:`local_pool_args`' alone, like the loopback addresses the client sends there first.)"""
    parsed = urlparse(api_root)
    if parsed.scheme == "https":
        verify: Any = pinned_ssl_context(server_certificate) if server_certificate else True
        return {"base_url": api_root, "verify": verify}
    if parsed.scheme == "http":
        if not allow_insecure_http and not is_loopback_host(parsed.hostname or ""):
            raise TransportRefused(
                f"refusing to send credentials over plain http to {parsed.hostname}: use https "
                "(or, on a network you trust, `balsam login --insecure-http`)")
        return {"base_url": api_root, "verify": no_tls_context()}
    raise TransportRefused(f"unsupported server address {api_root!r} (expected https://, http:// or unix://)")


def local_pool_args(api_root: str) -> Optional[dict[str, Any]]:
    """:class:`~balsam.client.local_http.LocalHTTPPool` keyword arguments (host, port or
    unix_path, base_path) when ``api_root`` is a server on this machine (a Unix socket, or plain
    http to a loopback address); None for any other (then :func:`httpx_client_args` applies).
    Checks the Unix socket's directory like :func:`httpx_client_args`."""
    if is_unix(api_root):
        path = unix_socket_path(api_root)
        check_private_socket(path)
        return {"host": urlparse(UNIX_BASE_URL).hostname, "unix_path": str(path)}
    parsed = urlparse(api_root)
    if parsed.scheme == "http" and is_loopback_host(parsed.hostname or ""):
        return {"host": parsed.hostname, "port": parsed.port or 80, "base_path": parsed.path}
    return None
