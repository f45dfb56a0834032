"""The client's credentials: refresh without a human, a fresh login on disk, revocation, transports."""

from __future__ import annotations

import time
import uuid

import pytest
import yaml

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def short_token_server(live_server_factory):
    """Access tokens minted from a refresh credential live 3 s here."""
    return live_server_factory("sqlite", env={"BALSAM_AUTH_ACCESS_TTL_SEC": "3"})


def _login_file(url, tmp_path, monkeypatch):
    import httpx

    from balsam.client import ClientSettings, RESTClient

    name = f"u-{uuid.uuid4().hex[:8]}"
    httpx.post(f"{url}/auth/password/register", json={"username": name, "password": PASSWORD}).raise_for_status()
    client = RESTClient(url)
    result = client.password_login(name, PASSWORD, refresh=True, label="test")
    path = tmp_path / "client.yml"
    from balsam.serialization import parse_datetime

    ClientSettings(api_root=url, token=result["access_token"], token_expiry=parse_datetime(result["expiration"]),
                   username=name,
                   refresh_token=result["refresh_token"], retry_count=1).save(path)
    monkeypatch.setenv("BALSAM_CLIENT_PATH", str(path))
    return name, path


def test_access_tokens_are_renewed_from_the_refresh_credential(short_token_server, tmp_path, monkeypatch):
    """Before: the agent stopped at its first token's expiry (48 h). Now it runs on refresh credentials."""
    from balsam.client import load_client
    from balsam.client import rest

    monkeypatch.setattr(rest, "REFRESH_MARGIN_SEC", 0.5)
    _name, path = _login_file(short_token_server.url, tmp_path, monkeypatch)
    client = load_client(path)
    first = client.token
    assert client.get("/sites/")["count"] == 0 and client.token == first
    time.sleep(3.2)  # the access token has expired
    assert client.get("/sites/")["count"] == 0
    assert client.token != first
    assert yaml.safe_load(path.read_text())["token"] == client.token  # stored for the other processes
    # A token refused by the server (e.g. expired in between) is renewed on the 401 and the call retried.
    client.token = first
    client.token_expiry = None
    monkeypatch.setattr(client, "_reload_token", lambda: False)
    assert client.get("/sites/")["count"] == 0 and client.token != first


def test_a_fresh_login_on_disk_is_picked_up(live_server, tmp_path, monkeypatch):
    from balsam.client import RESTClient, load_client

    name, path = _login_file(live_server, tmp_path, monkeypatch)
    running = load_client(path)  # e.g. the site agent
    assert running.whoami()["username"] == name
    # The user logs out (revoking this login) and logs in again on the same machine.
    running.post("/auth/logout")
    relogin = RESTClient(live_server).password_login(name, PASSWORD, refresh=True)
    stored = yaml.safe_load(path.read_text())
    stored.update(token=relogin["access_token"], token_expiry=relogin["expiration"],
                  refresh_token=relogin["refresh_token"])
    path.write_text(yaml.safe_dump(stored))
    assert running.whoami()["username"] == name
    assert running.refresh_token == relogin["refresh_token"]


def test_a_revoked_credential_is_refused_for_good_and_listeners_hear_it(live_server, tmp_path, monkeypatch):
    from balsam.client import AuthenticationError, load_client, on_credential_refused

    _name, path = _login_file(live_server, tmp_path, monkeypatch)
    client = load_client(path)
    heard = []
    forget = on_credential_refused(heard.append)
    try:
        client.post("/auth/logout")
        with pytest.raises(AuthenticationError) as info:
            client.get("/sites/")
        assert info.value.credential_refused and "revoked" in str(info.value.detail)
        assert heard == [info.value]
    finally:
        forget()


def test_no_credentials_over_plain_http_to_another_host():
    from balsam.client import RESTClient, TransportRefused

    client = RESTClient("http://balsam.example.org:8000", token="secret")
    with pytest.raises(TransportRefused, match="plain http"):
        client.get("/sites/")
    with pytest.raises(TransportRefused, match="plain http"):
        RESTClient("http://balsam.example.org:8000").password_login("me", "secret password")
    for loopback in ("http://127.0.0.1:1", "http://localhost:1", "http://[::1]:1"):
        from balsam.client.transport import httpx_client_args

        assert httpx_client_args(loopback)["base_url"] == loopback



def test_plain_http_clients_build_no_certificate_store_and_refuse_https(tmp_path):
    """A client of an http:// (or unix://) server has no use for TLS: its SSL context loads no
    authority (the default one costs ~20 ms of every start), and an https request through it
    fails verification rather than going unverified."""
    import datetime as dt
    import socket
    import ssl
    import threading

    import httpx
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from balsam.client.transport import httpx_client_args

    args = httpx_client_args("http://127.0.0.1:1")
    context = args["verify"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 0
    assert httpx_client_args("https://balsam.example.org")["verify"] is True  # the machine's authorities

    # A TLS server with a self-signed certificate for 127.0.0.1, answering one handshake.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            server_context.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):  # the client aborts the handshake
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with httpx.Client(**args) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                client.get(f"https://127.0.0.1:{port}/")
    finally:
        thread.join(10)
        listener.close()
