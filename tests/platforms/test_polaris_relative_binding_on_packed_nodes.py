"""Polaris: PALS lays ``--cpu-bind depth``/``core`` out from core 0 whatever cores balsam assigned a
job, so jobs packed on one node with such a binding overlap; it is said once per app. Without a
binding each job gets a ``list:`` of its own cores."""

from __future__ import annotations

import logging

from balsam.platform import LaunchSpec
from balsam_platform_polaris import PolarisPlatform

HOST = "x3004c0s1b0n0.hsn.cm.polaris.alcf.anl.gov"


def _spec(cores: range, app_id: int, **launch_params: str) -> LaunchSpec:
    return LaunchSpec(cmdline="./app", hostnames=[HOST], ranks_per_node=2, threads_per_rank=8,
                      cpu_ids=[tuple(cores)], launch_params=launch_params, job_id=app_id * 10, app_id=app_id)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "PALS binds" in r.getMessage()]


def test_relative_binding_of_packed_jobs_is_warned_once_per_app(caplog) -> None:
    platform = PolarisPlatform()
    caplog.set_level(logging.WARNING)
    first = platform.mpi_command_line(_spec(range(16, 32), 901, **{"cpu-bind": "depth"}))
    second = platform.mpi_command_line(_spec(range(8, 24), 901, **{"cpu-bind": "depth"}))
    assert "--cpu-bind depth" in first and "--cpu-bind depth" in second  # passed as asked
    (warning,) = _warnings(caplog)
    assert "job 9010 (app 901)" in warning and "16-31" in warning
    platform.mpi_command_line(_spec(range(16, 32), 902, **{"cpu_bind": "core"}))
    assert len(_warnings(caplog)) == 2  # another app: its own warning


def test_no_warning_for_a_job_on_the_first_cores_of_its_node(caplog) -> None:
    """PALS binds from core 0: a job assigned exactly cores 0-15 (2 ranks x 8 threads, e.g. alone on
    its node with node_packing_count=1) is bound where balsam put it."""
    platform = PolarisPlatform()
    caplog.set_level(logging.WARNING)
    line = platform.mpi_command_line(_spec(range(0, 16), 905, **{"cpu-bind": "depth"}))
    assert "--cpu-bind depth" in line
    assert _warnings(caplog) == []
    platform.mpi_command_line(_spec(range(16, 32), 905, **{"cpu-bind": "depth"}))
    (warning,) = _warnings(caplog)  # the same app placed on cores 16-31 still is
    assert "16-31" in warning


def test_a_site_leaving_core_0_out_still_gets_the_warning(caplog) -> None:
    """cpu_ids 1-31: a job on cores 1-16 holds the first of cpu_ids, but PALS counts from core 0 (it
    does not know the site left core 0 out): depth puts it on cores 0-15."""
    platform = PolarisPlatform({"cpu_ids": "1-31"})
    caplog.set_level(logging.WARNING)
    platform.mpi_command_line(_spec(range(1, 17), 906, **{"cpu-bind": "depth"}))
    (warning,) = _warnings(caplog)
    assert "1-16" in warning


def test_no_warning_for_list_bindings_or_whole_nodes(caplog) -> None:
    platform = PolarisPlatform()
    caplog.set_level(logging.WARNING)
    line = platform.mpi_command_line(_spec(range(16, 32), 903))
    assert "--cpu-bind list:16-23:24-31" in line
    whole = LaunchSpec(cmdline="./app", hostnames=[HOST], ranks_per_node=2, threads_per_rank=8,
                       launch_params={"cpu-bind": "depth"}, app_id=904)
    platform.mpi_command_line(whole)
    assert _warnings(caplog) == []
