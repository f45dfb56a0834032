"""The embedded server process (``balsam server start`` runs ``python -m balsam.server.embedded``).

One uvicorn server listening on:

- a Unix socket in a private directory (mode 0700): what the local user's CLI, agent and launchers
  use. Nobody else can create a socket there, so no other process can pose as the server and
  collect tokens, and the server is reachable from this machine only;
- optionally a TCP port on 127.0.0.1, for browsers (the dashboard) and Balsam 0.7 clients
  (``--port 0`` turns it off). Registration is closed and only the local user is served, so the
  port gives nobody else a way in.

With ``--log-file`` the server logs there (uvicorn's error and access logs and balsam's), rotated
at ``$BALSAM_SERVER_LOG_MAX_BYTES`` (10 MiB; 3 old files kept), every line capped at
:data:`MAX_LOG_LINE_CHARS`: an access line carries the whole query string, 50 KB for a request
naming 5,000 job ids. The query of the dashboard's one-time login link is not logged
(``AccessLogRedaction`` in access_guard.py, installed by every app: see ``create_app``).

When the TCP port is on a loopback address (the default), the app answers only requests whose
``Host`` is a loopback name or address (``loopback_hosts_only`` in access_guard.py): a web
page of another site that has its name resolve to 127.0.0.1 (DNS rebinding) cannot reach the
login routes. The Unix socket is not concerned.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import logging
import os
import socket
import stat
import sys
import tempfile
from pathlib import Path

from ..netnames import is_loopback_host
from ..util import env_number, try_exclusive_flock
from .access_guard import loopback_hosts_only

#: sockaddr_un.sun_path holds 108 bytes on Linux.
MAX_SOCKET_PATH = 100
#: Longest log line kept; the rest is replaced by a note of how much was cut.
MAX_LOG_LINE_CHARS = 2000
#: Size at which the log file is rotated (``$BALSAM_SERVER_LOG_MAX_BYTES`` overrides it).
DEFAULT_LOG_MAX_BYTES = 10 * 2**20
#: Rotated log files kept (server.log.1 ... server.log.3).
LOG_BACKUP_COUNT = 3
#: How the server's reason for not starting begins on its stderr (``server.out``): ``balsam server
#: start`` finds this run's line and reports it alone instead of a traceback and old log lines.
START_ERROR_PREFIX = "balsam server cannot start: "


def start_error(message: str) -> SystemExit:
    """A one-line reason for not starting (printed to stderr, exit status 1)."""
    return SystemExit(START_ERROR_PREFIX + message)


class CappedFormatter(logging.Formatter):
    """A formatter that cuts lines longer than ``max_chars`` (saying how many characters went)."""

    def __init__(self, fmt: "str | None" = None, datefmt: "str | None" = None, max_chars: int = MAX_LOG_LINE_CHARS) -> None:
        super().__init__(fmt, datefmt)
        self.max_chars = max_chars

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if len(text) <= self.max_chars:
            return text
        return f"{text[: self.max_chars]}... [{len(text) - self.max_chars} more characters]"


def log_max_bytes_from_env() -> int:
    """``$BALSAM_SERVER_LOG_MAX_BYTES`` (a whole number of bytes, plain digits; 0: never rotate), else the default.

    A value that is not one is not ignored silently: the server says so in one line on its stderr
    (``server.out``) and rotates at the default size (:func:`balsam.util.env_number`).
    """
    return env_number("BALSAM_SERVER_LOG_MAX_BYTES", DEFAULT_LOG_MAX_BYTES, warn=_server_out_line)


def _server_out_line(line: str) -> None:
    """A line on the server's stderr (``server.out``), prefixed as the server's."""
    print(f"balsam server: {line}", file=sys.stderr, flush=True)


def log_config(log_file: Path, level: str, max_bytes: "int | None" = None) -> dict:
    """uvicorn's ``log_config``: one rotating, line-capped file for uvicorn's and balsam's loggers."""
    if max_bytes is None:
        max_bytes = log_max_bytes_from_env()
    handler = {"class": "logging.handlers.RotatingFileHandler", "filename": str(log_file), "maxBytes": max_bytes,
               "backupCount": LOG_BACKUP_COUNT, "formatter": "capped", "encoding": "utf-8"}
    logger = {"handlers": ["file"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"capped": {"()": CappedFormatter, "fmt": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        "handlers": {"file": handler},
        "loggers": {"uvicorn": logger, "uvicorn.error": dict(logger), "uvicorn.access": dict(logger),
                    "balsam": dict(logger)},
    }


def socket_path_for(server_dir: Path) -> Path:
    """``<server_dir>/run/balsam.sock``, or - when that path is too long for a Unix socket - a
    private directory under the system temp dir named after the server directory."""
    preferred = server_dir / "run" / "balsam.sock"
    if len(str(preferred)) <= MAX_SOCKET_PATH:
        return preferred
    tag = hashlib.sha256(str(server_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"balsam-{os.getuid()}" / f"{tag}.sock"


def make_private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700, or check that the existing one is ours and private."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise start_error(f"{path} belongs to another user: refusing to put the server's files there")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)


def lock_server_dir(lock_path: Path) -> "int | None":
    """Take the exclusive flock on ``lock_path`` (``server/server.lock``); the descriptor, or None if
    another process holds it. ``balsam server start`` holds it from its check for a running server to
    the server's first answer, and the server (which inherits the descriptor) for its whole life: two
    starts at once, or a start beside a running server, found no live pid file and ran two servers
    (the pid file alone is check-then-write)."""
    try:
        return try_exclusive_flock(lock_path)
    except OSError as exc:
        # A file system without flock ($BALSAM_HOME on NFS without lockd: ENOLCK; some Lustre
        # mounts: ENOSYS): lock a file of the same name on this host's temporary directory instead,
        # which still keeps a second server of this BALSAM_HOME from starting here.
        local = Path(tempfile.gettempdir()) / (
            f"balsam-server-{os.getuid()}-{hashlib.sha256(str(Path(lock_path).absolute()).encode()).hexdigest()[:16]}.lock")
        print(f"balsam server: cannot lock {lock_path} ({exc}); locking {local} instead", file=sys.stderr)
        return try_exclusive_flock(local)


def bind_unix(path: Path, locked: bool = True) -> socket.socket:
    """Bind the socket; a socket file left by a server that died is replaced, but only under the
    server directory's lock (``locked``): without it, the file may be that of a server that has
    bound but not yet listens, which refuses connections just as a dead one does."""
    make_private_dir(path.parent)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            if not locked:
                raise start_error(f"{path} exists and nothing answers there: remove it if no server runs") from None
            path.unlink()  # a stale socket of a server that died
        else:
            raise start_error(f"another server already listens on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # For a restart while the previous server's connections are in TIME_WAIT. It also lets two
    # sockets bind one port as long as neither listens: listen at once, so a second one fails here.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise start_error(f"{host}:{port} is in use by another process: choose another --port (or --port 0)") from None
        raise start_error(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def main(argv: "list[str] | None" = None) -> None:
    import uvicorn

    # Here: the CLI imports this module for its helpers, and the app loads starlette and sqlalchemy.
    from .app import create_app_from_env
    from .settings import uvicorn_proxy_options

    parser = argparse.ArgumentParser(prog="python -m balsam.server.embedded", description=__doc__)
    parser.add_argument("--socket", required=True, help="Unix socket path (its directory is made private)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="TCP port on --host (0: no TCP listener)")
    parser.add_argument("--log-level", default=os.environ.get("BALSAM_LOG_LEVEL", "info").lower())
    parser.add_argument("--log-file", type=Path, default=None,
                        help="log here (rotated, lines capped) instead of to stderr")
    parser.add_argument("--lock-fd", type=int, default=None,
                        help="descriptor of the server directory's lock, taken by `balsam server start`: held "
                             "for the server's life, so that no second server runs on that directory")
    args = parser.parse_args(argv)
    # The database (password and credential hashes), the log and the socket: the user's only.
    os.umask(0o077)
    if args.lock_fd is not None:
        try:  # the start command's lock, inherited: flock on the same open file succeeds
            fcntl.flock(args.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise start_error(f"the server directory's lock (descriptor {args.lock_fd}) is not ours: {exc.strerror}") from None
    sockets = [bind_unix(Path(args.socket), locked=args.lock_fd is not None)]
    if args.port:
        sockets.append(bind_tcp(args.host, args.port))
    socket_path = Path(args.socket)

    class EmbeddedServer(uvicorn.Server):
        async def shutdown(self, sockets: "list[socket.socket] | None" = None) -> None:
            await super().shutdown(sockets)
            # Here, not after run(): uvicorn re-raises SIGTERM once serving ends.
            socket_path.unlink(missing_ok=True)

    guard_hosts = bool(args.port) and is_loopback_host(args.host)

    def app_factory() -> object:
        # Called by uvicorn once its logging is configured (factory=True), as the string
        # "balsam.server.app:create_app_from_env" was.
        app = create_app_from_env()
        # A loopback port is for this machine's browsers and clients: other Host names are refused
        # (DNS rebinding). A port on a public address (--host 0.0.0.0) is meant to be reached by
        # other names, and is left alone.
        return loopback_hosts_only(app) if guard_hosts else app

    extra = {"log_config": log_config(args.log_file, args.log_level)} if args.log_file else {}
    config = uvicorn.Config(app_factory, factory=True, log_level=args.log_level,
                            timeout_keep_alive=30, **uvicorn_proxy_options(), **extra)  # type: ignore[arg-type]
    EmbeddedServer(config).run(sockets=sockets)


if __name__ == "__main__":
    main()
