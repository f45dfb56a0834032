"""The process-wide default REST client (the one every unbound ``balsam.api`` model uses).

Kept apart from the models (:mod:`balsam._api.model`, which re-exports these functions) so that a
caller needing only the client, such as a launcher opening its Session while it starts, does not
import the models and their converters (cattrs, dill) first.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from .rest import RESTClient, load_client
from .settings import NotLoggedIn, client_path

_default_lock = threading.Lock()
_default_state: dict[str, Any] = {"client": None, "key": None, "explicit": None}


def set_default_client(client: Optional[RESTClient]) -> None:
    """Use ``client`` for every unbound model (``None`` goes back to the stored login)."""
    with _default_lock:
        _default_state["explicit"] = client


def reset_default_client() -> None:
    """Forget the cached default client; the next API call re-reads the login file."""
    with _default_lock:
        _default_state["client"] = None
        _default_state["key"] = None
        _default_state["explicit"] = None


def get_default_client() -> RESTClient:
    """The client the ``balsam.api`` models use, built lazily from the login file.

    It is rebuilt when ``$BALSAM_CLIENT_PATH``/``$BALSAM_HOME`` point elsewhere or the file
    changes (a new ``balsam login``). After ``fork()`` it opens a fresh connection pool.
    """
    explicit = _default_state["explicit"]
    if explicit is not None:
        return explicit
    path = client_path()
    try:
        stat = path.stat()
    except OSError:
        raise NotLoggedIn(f"no login file at {path}") from None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    with _default_lock:
        if _default_state["key"] != key or _default_state["client"] is None:
            _default_state["client"] = load_client(path)
            _default_state["key"] = key
        return _default_state["client"]
