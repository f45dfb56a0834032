"""Moved to :mod:`balsam.client.status_updater` (shared by launchers and agent modules); this name
stays importable for job modes and agent modules written against it."""

from balsam.client.status_updater import BulkStatusUpdater, split_into_rounds

__all__ = ["BulkStatusUpdater", "split_into_rounds"]
