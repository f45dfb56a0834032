"""Globus credentials of a balsam user: the native-app login flow and the tokens file.

``balsam site globus-login`` runs Globus Auth's native-app flow (a link to open, a code to paste)
for the Transfer scope, with a ``data_access`` dependency for each collection named with ``-e``
(Globus Connect Server v5 mapped collections need that consent). The refresh token is stored in
``$BALSAM_HOME/globus-tokens.json``, or the backend's ``tokens_file`` option (a relative path is
relative to the site directory), mode 0600, written atomically; the agent's backend builds a
refresh-token authorizer from it and writes refreshed access tokens back. Token values never go to
logs or error messages.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import globus_sdk
from globus_sdk.scopes import GCSCollectionScopes, Scope, TransferScopes

from balsam.config.paths import balsam_home

__all__ = ["TOKENS_FILE", "TRANSFER_RESOURCE_SERVER", "load_tokens", "login", "login_command", "save_tokens",
           "tokens_path", "transfer_scope"]

TOKENS_FILE = "globus-tokens.json"
TRANSFER_RESOURCE_SERVER = "transfer.api.globus.org"


def tokens_path(override: Optional[str] = None, base: Optional[str | os.PathLike[str]] = None) -> Path:
    """The tokens file: ``override`` (``~`` expanded; a relative path is relative to ``base``, the
    site directory for the ``tokens_file`` option, else to the current directory), else the default
    ``$BALSAM_HOME/globus-tokens.json``."""
    if not override:
        return balsam_home() / TOKENS_FILE
    path = Path(override).expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path


def _absolute(path: Path) -> Path:
    return Path(os.path.normpath(path.expanduser().absolute()))


def login_command(collections: Iterable[str] = (), tokens_file: Optional[str | os.PathLike[str]] = None,
                  session_domains: Iterable[str] = ()) -> str:
    """The exact command a user runs to (re)grant what the agent needs: ``--tokens-file`` (absolute,
    so the command works from any directory) when the agent reads another file than the default;
    ``--session-domain`` for each identity domain a collection's policy requires a login with."""
    words = ["balsam site globus-login", *(f"-e {c}" for c in dict.fromkeys(c for c in collections if c))]
    words += [f"--session-domain {shlex.quote(d)}" for d in dict.fromkeys(d for d in session_domains if d)]
    if tokens_file is not None:
        path = _absolute(Path(tokens_file))
        if path != _absolute(balsam_home() / TOKENS_FILE):
            words.append(f"--tokens-file {shlex.quote(str(path))}")
    return " ".join(words)


def transfer_scope(collections: Iterable[str]) -> Scope:
    """Transfer's scope with an optional data_access dependency for each collection
    (``all[*https://auth.globus.org/scopes/<id>/data_access]``): the form Globus Transfer's
    ConsentRequired asks for. Optional, as only a GCS v5 mapped collection (not high-assurance)
    uses data_access: a guest collection, Globus Connect Personal or a GCS v4 endpoint named with
    ``-e`` (or in settings.yml) has none to consent to, and should not then fail the login (not
    tried against such collections: no offline test can show what Globus Auth answers)."""
    deps = tuple(Scope(GCSCollectionScopes(c).data_access.scope_string, optional=True)
                 for c in dict.fromkeys(collections))
    return Scope(TransferScopes.all.scope_string, dependencies=deps)


def load_tokens(path: Path) -> Optional[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable Globus tokens file ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not data.get("refresh_token") or not data.get("client_id"):
        raise ValueError(f"{path}: not a Globus tokens file written by balsam site globus-login")
    return data


def save_tokens(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` readable by the owner only, replacing the file in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def login(client_id: str, collections: list[str], path: Path, *, prompt: Callable[[str], str],
          echo: Callable[[str], None], auth_client: Optional[globus_sdk.NativeAppAuthClient] = None,
          session_domains: Iterable[str] = ()) -> dict[str, Any]:
    """Run the native-app flow and store the tokens; returns what was stored (without printing it).
    ``session_domains``: the login must be with an identity of one of these domains (a collection's
    authentication policy asked for it), authenticated anew."""
    client = auth_client or globus_sdk.NativeAppAuthClient(client_id, app_name="balsam")
    client.oauth2_start_flow(requested_scopes=[transfer_scope(collections)], refresh_tokens=True,
                             prefill_named_grant="balsam site agent")
    domains = list(dict.fromkeys(d for d in session_domains if d))
    # A policy's requirement is met by a fresh authentication with such an identity, not by the
    # browser's existing session: hence prompt=login.
    session = {"session_required_single_domain": domains, "prompt": "login"} if domains else {}
    echo("Open this link in a browser, log in, and paste the authorization code it shows:\n")
    echo(f"  {client.oauth2_get_authorize_url(**session)}\n")
    code = prompt("Authorization code").strip()
    if not code:
        raise ValueError("no authorization code given")
    response = client.oauth2_exchange_code_for_tokens(code)
    tokens = response.by_resource_server.get(TRANSFER_RESOURCE_SERVER)
    if not tokens or not tokens.get("refresh_token"):
        raise ValueError("Globus Auth returned no refresh token for the Transfer service")
    data = {
        "client_id": client_id,
        "collections": sorted(dict.fromkeys(collections)),
        "access_token": tokens["access_token"],
        "refresh_token": tokens["refresh_token"],
        "expires_at_seconds": int(tokens.get("expires_at_seconds") or time.time()),
        "scope": tokens.get("scope", ""),
    }
    save_tokens(path, data)
    return data
