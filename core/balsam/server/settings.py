"""Server settings, read from the environment (no config file needed).

| variable | default |
|---|---|
| ``BALSAM_DATABASE_URL`` | ``sqlite:///$BALSAM_HOME/server/balsam.db`` |
| ``BALSAM_AUTH_SECRET_KEY`` | generated once, stored 0600 in ``$BALSAM_HOME/server/secret.key`` |
| ``BALSAM_AUTH_TOKEN_TTL_SEC`` | 172800 (48 h, as Balsam 0.7): a password login without refresh credential |
| ``BALSAM_AUTH_ACCESS_TTL_SEC`` | 3600: access tokens minted from a refresh credential |
| ``BALSAM_AUTH_REFRESH_TTL_SEC`` | 2592000 (30 days, extended at every use) |
| ``BALSAM_AUTH_LAUNCHER_MAX_TTL_SEC`` | 2592000: the longest a launcher credential may live per renewal |
| ``BALSAM_AUTH_LOGIN_METHODS`` | ``password`` |
| ``BALSAM_AUTH_REGISTRATION`` | ``closed`` (admins add users), ``invitation`` or ``open`` |
| ``BALSAM_AUTH_ONLY_USER`` | unset; the embedded server sets it to its local user |
| ``BALSAM_AUTH_MIN_PASSWORD_LENGTH`` | 12 |
| ``BALSAM_AUTH_SCRYPT_N`` | 16384 (2**14, RFC 7914's interactive-login cost): scrypt's work factor for new password hashes, a power of two from 1024 to 131072; below 16384 the server warns at its start |
| ``BALSAM_AUTH_MAX_FAILURES_PER_USER`` / ``..._PER_ADDRESS`` | 10 / 50 failed logins per window |
| ``BALSAM_AUTH_FAILURE_WINDOW_SEC`` | 900 (the sliding window of login throttling) |
| ``BALSAM_TRUSTED_PROXIES`` | unset: ``X-Forwarded-For`` is ignored; else the proxies' addresses (uvicorn's ``forwarded_allow_ips``) |
| ``BALSAM_AUTH_REVOCATION_CACHE_SEC`` | 5 (how long a worker trusts a credential it checked) |
| ``BALSAM_AUTH_CREDENTIAL_RETENTION_SEC`` | 2592000 (30 days, at least 3600): a revoked or expired credential is deleted this long after it ended |
| ``BALSAM_MAX_BODY_BYTES`` | 67108864 (64 MiB; larger request bodies get 413) |
| ``BALSAM_SESSION_EXPIRE_SEC`` | 300 (seconds, a fraction allowed, from 0.1: the launchers read the same rule) |
| ``BALSAM_SESSION_SWEEP_SEC`` | 60 (background sweep period, capped at half the expiry, at least 0.5 s; 0: every request sweeps) |
| ``BALSAM_IDEMPOTENCY_TTL_SEC`` | 86400 (how long a create's ``Idempotency-Key`` is remembered) |
| ``BALSAM_DB_POOL_SIZE`` / ``BALSAM_DB_MAX_OVERFLOW`` | 10 / 20 (PostgreSQL; an overflow of ``-1``: no limit, as SQLAlchemy) |
| ``BALSAM_DASHBOARD_SESSION_TTL_SEC`` | 28800 (8 h: a dashboard login lasts this long without use) |
| ``BALSAM_DASHBOARD_SESSION_MAX_AGE_SEC`` | 604800 (7 days: no dashboard login outlives this, however much it is used) |
| ``BALSAM_DASHBOARD_SECURE_COOKIES`` | ``auto`` (Secure cookies when the request came over HTTPS); ``always`` (or a yes word); ``never`` (or a no word) |
| ``BALSAM_SERVER_CREATE_TABLES`` | ``1`` for SQLite, ``0`` for PostgreSQL (use ``balsam server migrate``) |

Numbers are plain decimal digits (``BALSAM_AUTH_REVOCATION_CACHE_SEC`` and
``BALSAM_SESSION_EXPIRE_SEC`` may have a fraction, ``0.5``): ``1_000``, ``1e3``, ``-5``, ``nan`` or
``inf`` stop the server at its start with one line naming the variable, as does a lifetime or period
(``*_TTL_SEC``, ``*_EXPIRE_SEC``, ``*_SWEEP_SEC``, ``*_MAX_AGE_SEC``, ``*_WINDOW_SEC``) over ten years
(:data:`balsam.util.MAX_SETTING_SEC`: the server adds it to now or takes it from now, and
datetime overflows ~2,000 years back) or of 0 (the failure window and the sweep period may be 0; an idempotency TTL of 0 would
remember no answer, so a resent create made its records twice), ``BALSAM_MAX_BODY_BYTES=0``, or a
yes/no or choice setting spelt otherwise, or a ``BALSAM_AUTH_SCRYPT_N`` that is not a power of two.
A blank value is an unset one.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..util import MAX_SETTING_SEC, EnvNumberError, env_number, session_expire_from_env, warn_env_once


def balsam_home() -> Path:
    return Path(os.environ.get("BALSAM_HOME") or Path.home() / ".balsam").expanduser()


def server_dir() -> Path:
    return balsam_home() / "server"


def default_database_url() -> str:
    return f"sqlite:///{server_dir() / 'balsam.db'}"


def load_or_create_secret(path: Path) -> str:
    """The embedded server's signing key: created once with mode 0600, then reused.

    Creation is exclusive (O_EXCL + rename), so workers starting together agree on one key.
    """
    import time

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for _attempt in range(50):
        if path.exists():
            key = path.read_text().strip()
            if key:
                return key
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48) + "\n")
        try:
            os.link(tmp, path)  # fails if another process created the key first
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        time.sleep(0.01)
    raise RuntimeError(f"cannot create or read the signing key {path}")


#: Shortest token signing key accepted (bytes; HMAC-SHA256's own output size).
MIN_SECRET_KEY_BYTES = 32


def _int_env(name: str, default: int, minimum: int = 0, maximum: "int | None" = None,
             words: "dict[str, int] | None" = None) -> int:
    """A whole number from the environment (plain digits: not ``1_000``, ``1e3``, ``-5``, ``nan`` or
    ``inf``, which int(float()) took or turned into a traceback); a bad one stops the server at its
    start with one line naming the variable (:class:`EnvNumberError`, a ValueError)."""
    return env_number(name, default, minimum=minimum, maximum=maximum, on_bad="raise", words=words)


#: ``BALSAM_AUTH_SCRYPT_N``: scrypt's work factor for new password hashes. The default is RFC 7914's
#: for interactive logins (~50 ms and 16 MiB a hash at r=8). The floor keeps a hash from being
#: trivially cheap to crack; the cap keeps one login's memory sane (128 * r * N bytes: 128 MiB at
#: the cap, per login being checked at the same time). Hashes store their own N, so a hash made
#: under another setting keeps verifying (auth.verify_password).
SCRYPT_N_ENV = "BALSAM_AUTH_SCRYPT_N"
DEFAULT_SCRYPT_N, MIN_SCRYPT_N, MAX_SCRYPT_N = 2**14, 2**10, 2**17


def scrypt_n_from_env() -> int:
    """``$BALSAM_AUTH_SCRYPT_N`` (default :data:`DEFAULT_SCRYPT_N`): a power of two from
    :data:`MIN_SCRYPT_N` to :data:`MAX_SCRYPT_N`, else an :class:`EnvNumberError` (one line naming
    the variable: scrypt itself takes only a power of two, and would fail at the first login)."""
    n = _int_env(SCRYPT_N_ENV, DEFAULT_SCRYPT_N, MIN_SCRYPT_N, MAX_SCRYPT_N)
    if n & (n - 1):
        raise EnvNumberError(f"environment variable {SCRYPT_N_ENV}={os.environ.get(SCRYPT_N_ENV)!r} is not a power "
                             f"of two from {MIN_SCRYPT_N} to {MAX_SCRYPT_N} (e.g. {DEFAULT_SCRYPT_N})")
    return n


def warn_if_weak_scrypt(n: int) -> None:
    """A WARNING line (once per process and value) when new password hashes are cheaper than
    recommended: fine for a test server, not for one whose hashes could leak."""
    if n < DEFAULT_SCRYPT_N:
        warn_env_once(SCRYPT_N_ENV, str(n),
                      f"balsam server: WARNING: {SCRYPT_N_ENV}={n} is weaker than recommended ({DEFAULT_SCRYPT_N}, "
                      f"RFC 7914 for interactive logins): new password hashes are {DEFAULT_SCRYPT_N // n}x cheaper "
                      f"to crack if the database leaks", logging.getLogger("balsam.server").warning)


#: The shortest ``BALSAM_AUTH_CREDENTIAL_RETENTION_SEC`` (see ``ServerSettings.credential_retention_sec``).
MIN_CREDENTIAL_RETENTION_SEC = 3600


def _sec_env(name: str, default: int, minimum: int = 1) -> int:
    """A whole number of seconds from ``minimum`` (a lifetime or period of 0 is none) to ten years."""
    return _int_env(name, default, minimum, MAX_SETTING_SEC)


#: The spellings of a yes/no environment setting: anything else is refused, not taken as "no".
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")
#: ``BALSAM_DASHBOARD_SECURE_COOKIES``: the modes, and the yes/no words that mean one of them.
SECURE_COOKIE_MODES = {"auto": "auto", "always": "always", "never": "never",
                       **{word: "always" for word in _TRUE_WORDS}, **{word: "never" for word in _FALSE_WORDS}}


def secure_cookie_mode(value: Any) -> "str | None":
    """``value`` (a mode or a yes/no word, any case, spaces around it ignored; True and False too)
    as ``auto``, ``always`` or ``never``; None for anything else."""
    return SECURE_COOKIE_MODES.get(str(value).strip().lower())


def _choice_env(name: str, choices: "tuple[str, ...]", default: str) -> str:
    """One of ``choices`` (any case, spaces around it ignored); unset or blank: ``default``; else
    a ValueError quoting the value as it was set."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"environment variable {name}={raw!r} is not one of {', '.join(choices)}")
    return value


def _bool_env(name: str, default: bool) -> bool:
    return _choice_env(name, _TRUE_WORDS + _FALSE_WORDS, "1" if default else "0") in _TRUE_WORDS


def trusted_proxies_from_env() -> "str | None":
    """``BALSAM_TRUSTED_PROXIES`` (e.g. ``127.0.0.1`` or ``10.0.0.5,10.0.1.0/24``), or None."""
    raw = ",".join(part.strip() for part in os.environ.get("BALSAM_TRUSTED_PROXIES", "").split(",") if part.strip())
    return raw or None


def uvicorn_proxy_options() -> "dict[str, object]":
    """uvicorn's proxy options: ``X-Forwarded-For`` honoured only from ``BALSAM_TRUSTED_PROXIES``
    (uvicorn's own default trusts it from 127.0.0.1, where anybody on the host could forge it)."""
    trusted = trusted_proxies_from_env()
    return {"proxy_headers": trusted is not None, "forwarded_allow_ips": trusted or ""}


@dataclass
class ServerSettings:
    database_url: str
    secret_key: str
    token_ttl_sec: int = 48 * 3600
    access_ttl_sec: int = 3600
    refresh_ttl_sec: int = 30 * 24 * 3600
    launcher_max_ttl_sec: int = 30 * 24 * 3600
    login_methods: list[str] = field(default_factory=lambda: ["password"])
    #: ``closed``: only ``balsam server user add`` creates users; ``invitation``: registering needs
    #: an invitation code (``balsam server user invite``); ``open``: anyone who reaches the server.
    registration: str = "closed"
    #: The embedded server serves its own local user only (tokens of anybody else are refused).
    only_user: "str | None" = None
    min_password_length: int = 12
    #: scrypt's N for new password hashes (``BALSAM_AUTH_SCRYPT_N``), validated at the start.
    #: auth.hash_password reads the variable itself (its callers, ``balsam server user add`` among
    #: them, have no settings at hand): this field records it, setting it changes no hash.
    scrypt_n: int = DEFAULT_SCRYPT_N
    max_failures_per_user: int = 10
    max_failures_per_address: int = 50
    failure_window_sec: int = 900
    #: Addresses or networks (comma-separated) of reverse proxies whose ``X-Forwarded-For`` names
    #: the client; None: the header is ignored (anybody could forge it).
    trusted_proxies: "str | None" = None
    revocation_cache_sec: float = 5.0
    #: A revoked or expired credential stays listed for audit this long after it ended, then the
    #: background sweep deletes it (auth.sweep_ended_credentials). At least an hour: the sweep's
    #: race-freedom relies on no request lasting that long.
    credential_retention_sec: int = 30 * 24 * 3600
    max_body_bytes: int = 64 * 1024 * 1024
    session_expire_sec: float = 300
    session_sweep_sec: int = 60
    idempotency_ttl_sec: int = 24 * 3600
    pool_size: int = 10
    max_overflow: int = 20
    create_tables: bool = True
    dashboard_session_ttl_sec: int = 8 * 3600
    dashboard_session_max_age_sec: int = 7 * 24 * 3600
    #: ``auto``, ``always`` or ``never`` (a yes/no word given is stored as the mode it means).
    dashboard_secure_cookies: str = "auto"

    def __post_init__(self) -> None:
        mode = secure_cookie_mode(self.dashboard_secure_cookies)
        if mode is None:
            raise ValueError(f"dashboard_secure_cookies={self.dashboard_secure_cookies!r} is not one of "
                             f"{', '.join(SECURE_COOKIE_MODES)}")
        self.dashboard_secure_cookies = mode

    @classmethod
    def from_env(cls, database_url: "str | None" = None, secret_key: "str | None" = None) -> "ServerSettings":
        url = database_url or os.environ.get("BALSAM_DATABASE_URL") or default_database_url()
        key = secret_key or os.environ.get("BALSAM_AUTH_SECRET_KEY")
        if not secret_key and key and len(key.encode()) < MIN_SECRET_KEY_BYTES:  # as configured, not as passed in
            # Tokens are HMAC-SHA256: a short key is found offline from any one token (a login's
            # answer, a launcher's environment), and with it every user's token can be forged.
            raise ValueError(f"BALSAM_AUTH_SECRET_KEY is {len(key.encode())} bytes: at least {MIN_SECRET_KEY_BYTES} "
                             f"are needed (python -c 'import secrets; print(secrets.token_urlsafe(48))')")
        if not key:
            if url.startswith("sqlite"):
                db_path = url.split("///", 1)[-1]
                key_path = Path(db_path).parent / "secret.key" if db_path and db_path != ":memory:" else None
            else:
                key_path = None
            key = load_or_create_secret(key_path or server_dir() / "secret.key")
        methods = [m.strip() for m in os.environ.get("BALSAM_AUTH_LOGIN_METHODS", "password").split(",") if m.strip()]
        create_default = url.startswith("sqlite")
        scrypt_n = scrypt_n_from_env()
        warn_if_weak_scrypt(scrypt_n)
        return cls(
            database_url=url,
            secret_key=key,
            token_ttl_sec=_sec_env("BALSAM_AUTH_TOKEN_TTL_SEC", 48 * 3600),
            access_ttl_sec=_sec_env("BALSAM_AUTH_ACCESS_TTL_SEC", 3600),
            refresh_ttl_sec=_sec_env("BALSAM_AUTH_REFRESH_TTL_SEC", 30 * 24 * 3600),
            launcher_max_ttl_sec=_sec_env("BALSAM_AUTH_LAUNCHER_MAX_TTL_SEC", 30 * 24 * 3600),
            login_methods=methods,
            registration=_choice_env("BALSAM_AUTH_REGISTRATION", ("closed", "invitation", "open"), "closed"),
            only_user=os.environ.get("BALSAM_AUTH_ONLY_USER") or None,
            min_password_length=_int_env("BALSAM_AUTH_MIN_PASSWORD_LENGTH", 12),
            scrypt_n=scrypt_n,
            max_failures_per_user=_int_env("BALSAM_AUTH_MAX_FAILURES_PER_USER", 10),
            max_failures_per_address=_int_env("BALSAM_AUTH_MAX_FAILURES_PER_ADDRESS", 50),
            failure_window_sec=_sec_env("BALSAM_AUTH_FAILURE_WINDOW_SEC", 900, minimum=0),
            trusted_proxies=trusted_proxies_from_env(),
            revocation_cache_sec=env_number("BALSAM_AUTH_REVOCATION_CACHE_SEC", 5.0, fraction=True, maximum=MAX_SETTING_SEC,
                                            on_bad="raise"),
            credential_retention_sec=_sec_env("BALSAM_AUTH_CREDENTIAL_RETENTION_SEC", 30 * 24 * 3600,
                                              minimum=MIN_CREDENTIAL_RETENTION_SEC),
            max_body_bytes=_int_env("BALSAM_MAX_BODY_BYTES", 64 * 1024 * 1024, minimum=1),
            session_expire_sec=session_expire_from_env(300.0, on_bad="raise"),
            # 0: the background sweep runs every 0.5 s (app.py's floor) and a request sweeps each time.
            session_sweep_sec=_sec_env("BALSAM_SESSION_SWEEP_SEC", 60, minimum=0),
            idempotency_ttl_sec=_sec_env("BALSAM_IDEMPOTENCY_TTL_SEC", 24 * 3600),
            pool_size=_int_env("BALSAM_DB_POOL_SIZE", 10),
            # -1: SQLAlchemy's "no limit on overflow connections".
            max_overflow=_int_env("BALSAM_DB_MAX_OVERFLOW", 20, words={"-1": -1}),
            dashboard_session_ttl_sec=_sec_env("BALSAM_DASHBOARD_SESSION_TTL_SEC", 8 * 3600),
            dashboard_session_max_age_sec=_sec_env("BALSAM_DASHBOARD_SESSION_MAX_AGE_SEC", 7 * 24 * 3600),
            dashboard_secure_cookies=_choice_env("BALSAM_DASHBOARD_SECURE_COOKIES", tuple(SECURE_COOKIE_MODES), "auto"),
            create_tables=_bool_env("BALSAM_SERVER_CREATE_TABLES", create_default),
        )
