"""``balsam login`` to an https server whose certificate no authority vouches for: trust on first
use by fingerprint, pinned; a different certificate later is refused. Admin account commands."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

BALSAM = [str(Path(sys.executable).with_name("balsam"))]
SECRET = "balsam-test-secret-key-not-for-production-use-0123456789"
PASSWORD = "correct horse battery"


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def start_tls_server(workdir: Path, port: int, cert: Path, key: Path) -> subprocess.Popen:
    env = dict(os.environ, BALSAM_DATABASE_URL=f"sqlite:///{workdir / 'balsam.db'}", BALSAM_AUTH_SECRET_KEY=SECRET,
               BALSAM_HOME=str(workdir / "server-home"), BALSAM_AUTH_REGISTRATION="open")
    log = open(workdir / f"server-{port}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "balsam.server.app:create_app_from_env",
                             "--host", "127.0.0.1", "--port", str(port), "--ssl-certfile", str(cert),
                             "--ssl-keyfile", str(key), "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"https://127.0.0.1:{port}/auth/how", verify=False, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError((workdir / f"server-{port}.log").read_text()[-2000:])


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_an_unverifiable_certificate_is_pinned_by_fingerprint(tmp_path):
    from balsam.client import ServerUnavailable, load_client
    from balsam.client.transport import fingerprint_of_pem

    home = tmp_path / "home"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}, "BALSAM_HOME": str(home)}
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    cert, key = self_signed(tmp_path, "balsam.example.org")  # names another host: the pin is the identity
    fingerprint = fingerprint_of_pem(cert.read_text())
    server = start_tls_server(tmp_path, port, cert, key)
    try:
        user = f"tls-{uuid.uuid4().hex[:6]}"
        httpx.post(f"{url}/auth/password/register", json={"username": user, "password": PASSWORD},
                   verify=False).raise_for_status()

        def login(*extra: str) -> subprocess.CompletedProcess:
            return subprocess.run(BALSAM + ["login", "-u", url, "--username", user, "--password-stdin", *extra],
                                  input=PASSWORD + "\n", capture_output=True, text=True, env=env, timeout=60)

        first = login()
        assert first.returncode == 1 and fingerprint in first.stdout + first.stderr
        assert "--fingerprint" in first.stderr and not (home / "client.yml").exists()
        assert login("--fingerprint", "AA:BB").returncode == 1
        pinned = login("--fingerprint", fingerprint.replace(":", "").lower())
        assert pinned.returncode == 0, pinned.stderr
        stored = yaml.safe_load((home / "client.yml").read_text())
        assert stored["server_fingerprint"] == fingerprint and "BEGIN CERTIFICATE" in stored["server_certificate"]
        client = load_client(home / "client.yml")
        assert client.whoami()["username"] == user
        client.close()
    finally:
        stop(server)

    # Someone else answers on that address with another certificate: nothing is sent.
    other_cert, other_key = self_signed(tmp_path, "impostor")
    impostor = start_tls_server(tmp_path, port, other_cert, other_key)
    try:
        client = load_client(home / "client.yml")
        client.retry_count = 0
        with pytest.raises(ServerUnavailable):
            client.get("/sites/")
        again = login()
        assert again.returncode == 1 and "CHANGED" in again.stderr
    finally:
        stop(impostor)


def test_admin_user_commands(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from balsam.cli import main

    for key in [k for k in os.environ if k.startswith("BALSAM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BALSAM_DATABASE_URL", f"sqlite:///{tmp_path / 'shared.db'}")

    def run(*args: str, stdin: str = ""):
        return CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)

    assert run("server", "migrate").exit_code == 0
    added = run("server", "user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert added.exit_code == 0 and "Created user alice" in added.output
    assert "already exists" in run("server", "user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n").output
    assert "at least 12" in run("server", "user", "add", "bob", "--password-stdin", stdin="short\n").output
    invite = run("server", "user", "invite", "carol")
    # The code on its own line, never inside a command (whose argv other users can read)
    assert invite.exit_code == 0 and "bsi1." in invite.output and "--invitation bsi1." not in invite.output
    listing = run("server", "user", "ls").output
    assert "alice" in listing and "carol" in listing
    assert "invitation" in run("server", "credentials", "--user", "carol").output
    revoked = run("server", "revoke", "--user", "carol")
    assert revoked.exit_code == 0 and "Revoked 1 credential(s)" in revoked.output
    assert "active" not in run("server", "credentials", "--user", "carol").output.split("\n", 1)[1]
    assert run("server", "revoke").exit_code == 1
