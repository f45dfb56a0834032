"""Acquire wake-ups across server processes that share one PostgreSQL database (``LISTEN``/``NOTIFY``).

A waiting acquire (acquire_waits.py) is woken by writes in its own process. Behind uvicorn
``--workers N`` or several hosts the write that makes a job leasable usually lands in another
process, and the wait would run to its deadline. So each process also:

- *publishes* every wake-up it makes: after the write has committed, ``pg_notify`` on
  :data:`CHANNEL` with the payload ``"<process token> <user id>"`` (``*`` for every user: the expiry
  sweep), in a short transaction of its own;
- *listens* on one connection of its own, outside the pool, in a daemon thread, and turns each
  notification from another process into a local wake-up (its own come back too and are skipped:
  they were woken already).

Why no wake-up is missed while the channel works: PostgreSQL delivers a notification after the
transaction that sent it commits, and that is after the write it announces committed. So a
generation read before a look (acquire_waits.py) either predates the local wake-up that the
notification causes (the wait returns at once) or follows the write's commit (the look sees the
write).

While the listening connection is down (database restart, connection cut) notifications are lost.
Waits then end at their deadlines, as polls would. Each time the listener has (re)connected and
issued ``LISTEN``, it wakes every user once, so a write that committed while it was deaf is looked
for again. A failed publish is logged and dropped: the write itself has committed, and a
process's own waits were woken locally.
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import threading
from typing import Any, Optional

import sqlalchemy as sa

from .acquire_waits import AcquireWaits
from .db import pg_connect_defaults

logger = logging.getLogger("balsam.server.acquire_notify")

#: The PostgreSQL notification channel (channels are per database).
CHANNEL = "balsam_acquire_wake"
#: Seconds of silence after which the listener checks its connection with a query.
PING_AFTER_SEC = 30.0
#: Longest pause between reconnection attempts.
MAX_RECONNECT_DELAY_SEC = 10.0

_ALL_USERS = "*"


def supports_notify(engine: sa.Engine) -> bool:
    """PostgreSQL through psycopg2 (the driver balsam installs): the listener needs its socket."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg2"


def parse_payload(payload: str) -> Optional[tuple[str, Optional[int]]]:
    """``"<token> <user id>"`` -> ``(token, user_id)``; ``"<token> *"`` -> ``(token, None)`` (every
    user); anything else (another program on the channel) -> None."""
    parts = payload.split(" ")
    if len(parts) != 2 or not parts[0]:
        return None
    token, who = parts
    if who == _ALL_USERS:
        return token, None
    if not who.isdecimal():
        return None
    return token, int(who)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class WakeBridge:
    """Publishes this process's wake-ups and applies the other processes' (one per server process)."""

    def __init__(self, engine: sa.Engine, waits: AcquireWaits) -> None:
        self.engine = engine
        self.waits = waits
        #: Tells this process's notifications from the others'.
        self.token = secrets.token_hex(8)
        #: Set while the listener is listening (tests wait for it).
        self.listening = threading.Event()
        #: The PostgreSQL backend of the listening connection (for an administrator: pg_stat_activity).
        self.backend_pid: Optional[int] = None
        self._stop = threading.Event()
        self._stop_r, self._stop_w = os.pipe()  # wakes the listener's select() at stop
        self._thread: Optional[threading.Thread] = None
        self._publish_failing = False

    # -- publishing (any thread; the request handlers call it from the thread pool) -------------

    def publish(self, user_id: Optional[int]) -> None:
        """Tell the other processes that ``user_id``'s (None: every user's) writes committed."""
        payload = f"{self.token} {_ALL_USERS if user_id is None else int(user_id)}"
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.select(sa.func.pg_notify(CHANNEL, payload)))
                conn.commit()
        except sa.exc.SQLAlchemyError as exc:  # database unreachable, pool exhausted
            if not self._publish_failing:  # once per outage, not once per request
                logger.warning("Could not tell other server processes of a wake-up (%s); their waiting "
                               "acquires end at their deadlines", _first_line(getattr(exc, "orig", None) or exc))
            self._publish_failing = True
            return
        if self._publish_failing:
            logger.info("Wake-ups reach other server processes again")
        self._publish_failing = False

    # -- listening (its own thread) -------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._listen_forever, name="balsam-acquire-notify", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout)
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _connect(self) -> Any:
        """A psycopg2 connection of its own (not the pool's: it is held for the process's life)."""
        cargs, cparams = self.engine.dialect.create_connect_args(self.engine.url)
        # An unreachable host must not hold the thread for minutes (db.PG_CONNECT_DEFAULTS): its
        # quiet-time ping would otherwise wait ~15 min on a vanished host, deaf all that time.
        for name, value in pg_connect_defaults(self.engine.url).items():
            cparams.setdefault(name, value)
        conn = self.engine.dialect.connect(*cargs, **cparams)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {CHANNEL}")
        return conn

    def _listen_forever(self) -> None:
        delay, failing = 0.5, False
        while not self._stop.is_set():
            try:
                conn = self._connect()
            except Exception as exc:  # database down or refusing: try again, slower each time
                if not failing:
                    logger.warning("Cannot listen for other server processes' wake-ups (%s); retrying",
                                   _first_line(exc))
                failing = True
                self._stop.wait(delay)
                delay = min(delay * 2, MAX_RECONNECT_DELAY_SEC)
                continue
            if failing:
                logger.info("Listening for other server processes' wake-ups again")
            delay, failing = 0.5, False
            self.backend_pid = conn.get_backend_pid()
            # Notifications sent while nobody listened are lost: look again for every user.
            self.waits.wake_all()
            self.listening.set()
            try:
                self._pump(conn)
            except Exception as exc:  # connection lost: reconnect
                if not self._stop.is_set():
                    logger.warning("Lost the connection that listens for other server processes' wake-ups "
                                   "(%s); reconnecting", _first_line(exc))
                    failing = True
            finally:
                self.listening.clear()
                try:
                    conn.close()
                except Exception:  # already broken
                    pass

    def _pump(self, conn: Any) -> None:
        # poll(), not select(): a busy server's descriptors may number past select's 1024.
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while not self._stop.is_set():
            ready = [fd for fd, _ in poller.poll(PING_AFTER_SEC * 1000)]
            if self._stop_r in ready:
                return
            if not ready:  # quiet for a while: make sure the connection is still there
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
            conn.poll()  # raises if the server closed the connection
            while conn.notifies:
                self._apply(conn.notifies.pop(0).payload)

    def _apply(self, payload: str) -> None:
        parsed = parse_payload(payload)
        if parsed is None:
            logger.debug("Ignored a notification on %s that is not balsam's: %r", CHANNEL, payload[:100])
            return
        token, user_id = parsed
        if token == self.token:  # our own: woken locally already
            return
        if user_id is None:
            self.waits.wake_all()
        else:
            self.waits.wake(user_id)
