"""Globus transfer backend for balsam: ``globus://<collection-id>`` locations, batches submitted as
Globus Transfer tasks, and ``balsam site globus-login`` (see docs/transfers.md)."""

from typing import Any

__all__ = ["GlobusOptions", "GlobusTransfer"]


def __getattr__(name: str) -> Any:
    # The backend (globus_sdk) is imported when first used: the hook module below is imported by
    # every balsam process, launchers included, which never transfer (~0.1 s of their start-up).
    if name in __all__:
        from . import backend

        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
