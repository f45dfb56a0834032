"""Globus transfer backend for balsam: ``globus://<collection-id>`` locations, batches submitted as
Globus Transfer tasks, and ``balsam site globus-login`` (see docs/transfers.md)."""

from .backend import GlobusOptions, GlobusTransfer

__all__ = ["GlobusOptions", "GlobusTransfer"]
