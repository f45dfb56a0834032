"""Balsam 0.7's ``balsam.schemas``, for scripts and hooks that import from it.

0.7 kept its pydantic models here. The names that have an equivalent in this Balsam are
re-exported (the same objects as ``balsam.states``, ``balsam.models`` and the client's payload
codec, so ``balsam.schemas.JobState is balsam.api.JobState``). The pydantic request and response
models (``JobCreate``, ``JobOut``, ``SiteOut``, ``Paginated*``, ``*Ordering`` ...) have none:
the client API (``balsam.api``) and the REST API's JSON take their place, so they are not here.
"""

from balsam.models import (
    MAX_ITEMS_PER_BULK_OP,
    MAX_JOBS_PER_SESSION_ACQUIRE,
    MAX_PAGE_SIZE,
    AllowedQueue,
    AppParameter,
    BackfillWindow,
    BatchJobPartition,
    JobTransferItem,
    SchedulerJobStatus,
    SessionAcquire,
    TransferSlot,
)
from balsam.states import (
    DONE_STATES,
    RUNNABLE_STATES,
    BatchJobState,
    JobMode,
    JobState,
    TransferDirection,
    TransferItemState,
)

from .serializer import (
    DeserializeError,
    EmptyPayload,
    SerializeError,
    deserialize,
    get_source,
    raise_from_serialized,
    serialize,
    serialize_exception,
)

#: 0.7's name for a Site's backfill window (``{num_nodes, wall_time_min}``).
SchedulerBackfillWindow = BackfillWindow

__all__ = [
    "AllowedQueue",
    "AppParameter",
    "TransferSlot",
    "BatchJobState",
    "BatchJobPartition",
    "JobMode",
    "SessionAcquire",
    "MAX_JOBS_PER_SESSION_ACQUIRE",
    "JobState",
    "JobTransferItem",
    "RUNNABLE_STATES",
    "DONE_STATES",
    "TransferItemState",
    "TransferDirection",
    "SchedulerBackfillWindow",
    "SchedulerJobStatus",
    "serialize",
    "deserialize",
    "serialize_exception",
    "raise_from_serialized",
    "get_source",
    "SerializeError",
    "DeserializeError",
    "EmptyPayload",
    "MAX_ITEMS_PER_BULK_OP",
    "MAX_PAGE_SIZE",
]
