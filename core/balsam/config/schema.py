"""The settings.yml schema: one attrs class per section, every field with a default and a help text.

The help text (``metadata["help"]``) becomes the comment above the key in
``balsam site sample-settings``. Core sections are ``logging``, ``filter_tags`` and ``launcher``;
the agent-module sections below are contributed by the core hook plugin
(``balsam.builtin.core_plugin``) through ``balsam_settings_sections``, exactly as a third-party
plugin contributes its own.

Field types are plain Python annotations (``int``, ``str``, ``Optional[bool]``,
``dict[str, AllowedQueue]`` ...); the loader checks values against them and reports the YAML line.
An optional ``validate(self)`` method returns ``{field: problem}`` for checks across fields.
"""

from typing import Any, Optional

import attrs

# The API's record of a queue's limits is also the settings.yml schema of one allowed queue.
from balsam.models import AllowedQueue

__all__ = [
    "AGENT_MODULE_SECTIONS",
    "AllowedQueue",
    "ElasticQueueSettings",
    "FileCleanerSettings",
    "LauncherSettings",
    "LoggingSettings",
    "ProcessingSettings",
    "QueueMaintainerSettings",
    "SchedulerSettings",
    "TransferSettings",
    "setting",
]


def setting(default: Any = attrs.NOTHING, help: str = "", *, factory: Any = None) -> Any:
    """An attrs field with a help text (``factory`` for mutable defaults)."""
    if factory is not None:
        return attrs.field(factory=factory, metadata={"help": help})
    return attrs.field(default=default, metadata={"help": help})


DEFAULT_LOG_FORMAT = "%(asctime)s.%(msecs)03d | %(process)d | %(levelname)s | %(name)s:%(lineno)s] %(message)s"


@attrs.define
class LoggingSettings:
    level: str = setting("INFO", "Log level of the site agent and launchers: DEBUG, INFO, WARNING or ERROR.")
    format: str = setting(DEFAULT_LOG_FORMAT, "Python logging format of each log line.")
    datefmt: str = setting("%Y-%m-%d %H:%M:%S", "strftime format of the time stamp in log lines.")
    buffer_num_records: int = setting(1024, "Log records buffered in memory before they are written.")
    flush_period: int = setting(30, "Seconds after which buffered log records are written anyway.")

    def validate(self) -> dict[str, str]:
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            return {"level": f"expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {self.level!r}"}
        if self.buffer_num_records < 1:
            return {"buffer_num_records": "must be at least 1"}
        return {}


@attrs.define
class LauncherSettings:
    platform: str = setting(
        "default", "Platform plugin describing this machine's nodes and MPI launcher (see `balsam plugins ls`)."
    )
    platform_options: dict[str, Any] = setting(
        help="Options of the platform driver (see `balsam site sample-settings` and docs/platforms/).", factory=dict
    )
    idle_ttl_sec: int = setting(60, "A launcher with nothing to run for this many seconds exits.")
    delay_sec: int = setting(1, "Seconds between two launcher cycles.")
    error_tail_num_lines: int = setting(10, "Lines of a failed job's output kept in its error event.")
    max_concurrent_mpiruns: int = setting(1000, "Most MPI runs one mpi-mode launcher starts at the same time.")
    mpirun_allows_node_packing: Optional[bool] = setting(
        None, "Whether several MPI runs may share a node; null uses the platform's default."
    )
    serial_mode_prefetch_per_rank: int = setting(64, "Jobs a serial-mode launcher fetches ahead per worker rank.")
    sort_by: Optional[str] = setting(
        None, "Order runnable jobs before placing them: null (by id) or long_large_first."
    )
    serial_mode_startup_params: dict[str, str] = setting(
        help="Extra MPI launch parameters for starting serial-mode workers.", factory=lambda: {"cpu_affinity": "none"}
    )

    def validate(self) -> dict[str, str]:
        if self.sort_by not in (None, "long_large_first"):
            return {"sort_by": f"expected null or 'long_large_first', got {self.sort_by!r}"}
        if self.max_concurrent_mpiruns < 1:
            return {"max_concurrent_mpiruns": "must be at least 1"}
        return {}


@attrs.define
class SchedulerSettings:
    name: str = setting("local", "Scheduler plugin that submits BatchJobs (local, slurm, pbs, ...).")
    options: dict[str, Any] = setting(
        help="Options of the scheduler plugin (e.g. slurm: queue_flag: --qos; see docs/schedulers/).", factory=dict
    )
    sync_period: int = setting(10, "Seconds between two polls of the scheduler queue.")
    allowed_queues: dict[str, AllowedQueue] = setting(
        help="Queues BatchJobs may be submitted to, with their limits.",
        factory=lambda: {"local": AllowedQueue(max_nodes=1, max_walltime=1440, max_queued_jobs=1000)},
    )
    allowed_projects: list[str] = setting(help="Projects (allocations) BatchJobs may charge.", factory=lambda: ["local"])
    optional_batch_job_params: dict[str, str] = setting(
        help="Extra job-template variables a BatchJob may set, with their default values.", factory=dict
    )
    job_template_path: str = setting("job-template.sh", "The batch script template, relative to the site directory.")


@attrs.define
class ProcessingSettings:
    num_workers: int = setting(2, "Processes running the apps' preprocess/postprocess hooks.")
    prefetch_depth: int = setting(1000, "Jobs fetched ahead for the hook workers.")

    def validate(self) -> dict[str, str]:
        if self.num_workers < 1:
            return {"num_workers": "must be at least 1"}
        return {}


@attrs.define
class TransferSettings:
    transfer_locations: dict[str, str] = setting(
        help="Aliases of remote locations, e.g. {my_dtn: 'globus://<endpoint-uuid>'}.", factory=dict
    )
    globus_endpoint_id: Optional[str] = setting(None, "The Globus endpoint id of this site's file system.")
    globus_endpoint_site_path: Optional[str] = setting(
        None, "This site's directory as the Globus endpoint sees it, when it differs from the local path."
    )
    max_concurrent_transfers: int = setting(5, "Most transfer tasks active at once.")
    transfer_batch_size: int = setting(100, "Most files bundled into one transfer task.")
    num_items_query_limit: int = setting(2000, "Most transfer items read from the API per cycle.")
    service_period: int = setting(5, "Seconds between two transfer cycles.")


@attrs.define
class ElasticQueueSettings:
    service_period: int = setting(60, "Seconds between two elastic-queue cycles.")
    submit_project: str = setting("local", "Project charged by the BatchJobs it submits.")
    submit_queue: str = setting("local", "Queue it submits to.")
    job_mode: str = setting("mpi", "Launcher job mode of the BatchJobs it submits: mpi or serial.")
    min_wall_time_min: int = setting(35, "Shortest BatchJob it submits (minutes).")
    max_wall_time_min: int = setting(360, "Longest BatchJob it submits (minutes).")
    wall_time_pad_min: int = setting(5, "Minutes subtracted from a backfill window's length.")
    min_num_nodes: int = setting(1, "Smallest BatchJob it submits (nodes).")
    max_num_nodes: int = setting(127, "Largest BatchJob it submits (nodes).")
    max_queue_wait_time_min: int = setting(10, "A BatchJob queued longer than this is deleted.")
    max_queued_jobs: int = setting(20, "Most BatchJobs queued or running at once.")
    use_backfill: bool = setting(True, "Size BatchJobs to fit the scheduler's backfill windows.")

    def validate(self) -> dict[str, str]:
        if self.wall_time_pad_min >= self.min_wall_time_min:
            return {"wall_time_pad_min": f"must be less than min_wall_time_min ({self.min_wall_time_min})"}
        if self.min_num_nodes > self.max_num_nodes:
            return {"min_num_nodes": f"must not exceed max_num_nodes ({self.max_num_nodes})"}
        if self.min_wall_time_min > self.max_wall_time_min:
            return {"min_wall_time_min": f"must not exceed max_wall_time_min ({self.max_wall_time_min})"}
        if self.job_mode not in ("mpi", "serial"):
            return {"job_mode": f"expected 'mpi' or 'serial', got {self.job_mode!r}"}
        return {}


@attrs.define
class QueueMaintainerSettings:
    submit_period: int = setting(60, "Seconds between two checks of the queue.")
    submit_project: str = setting("local", "Project charged by the BatchJobs it submits.")
    submit_queue: str = setting("local", "Queue it keeps filled.")
    job_mode: str = setting("mpi", "Launcher job mode of the BatchJobs it submits: mpi or serial.")
    num_queued_jobs: int = setting(5, "BatchJobs kept queued or running at all times.")
    num_nodes: int = setting(1, "Nodes of each BatchJob.")
    wall_time_min: int = setting(10, "Wall time of each BatchJob (minutes).")

    def validate(self) -> dict[str, str]:
        if self.job_mode not in ("mpi", "serial"):
            return {"job_mode": f"expected 'mpi' or 'serial', got {self.job_mode!r}"}
        return {}


@attrs.define
class FileCleanerSettings:
    cleanup_batch_size: int = setting(180, "Finished jobs whose files are cleaned per cycle.")
    service_period: int = setting(30, "Seconds between two clean-up cycles.")


#: key -> (schema, comment, enabled in a new settings.yml). Contributed by the core hook plugin.
AGENT_MODULE_SECTIONS: dict[str, tuple[type, str, bool]] = {
    "scheduler": (SchedulerSettings, "Submits, polls and deletes BatchJobs through the scheduler plugin.", True),
    "processing": (ProcessingSettings, "Runs the apps' preprocess/postprocess hooks.", True),
    "transfers": (TransferSettings, "Stages job files in and out (Globus or other transfer plugins).", True),
    "elastic_queue": (
        ElasticQueueSettings,
        "Submits BatchJobs sized to the runnable work. null disables it.",
        False,
    ),
    "queue_maintainer": (
        QueueMaintainerSettings,
        "Keeps a fixed number of BatchJobs queued. null disables it.",
        False,
    ),
    "file_cleaner": (FileCleanerSettings, "Deletes the cleanup_files of finished jobs.", True),
}
