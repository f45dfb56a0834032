"""``balsam.testing``: the conformance kit a scheduler or platform plugin runs against itself.

Nothing here is imported by balsam at run time, and ``import balsam.testing`` itself imports
nothing (each name below loads its module on first use), so shipping the kit costs users nothing.
The contract classes need pytest, which a plugin's tests have anyway.

=========================  ===================================================================
:class:`PlatformContract`  pytest base class of a platform plugin's tests: node discovery from
                           a faked allocation, GPU visibility, launch lines, serial-worker
                           start, settings defaults and options (``balsam.testing.platform_contract``)
:class:`SchedulerContract` pytest base class of a scheduler plugin's tests: render/parse round
                           trips on recorded output, garbage and empty output, error mapping,
                           submit/status/delete/history/backfill/projects
                           (``balsam.testing.scheduler_contract``); with :class:`Refusal` and
                           :class:`HistoryCase` to describe expected outcomes
:class:`ReplayRunner`      a CommandRunner answering from recorded results
                           (``balsam.testing.replay``, with :func:`load_recorded`,
                           :func:`result` and :func:`utc`)
:class:`TransferContract`  pytest base class of a transfer backend's tests: stage-in and
                           stage-out batches, several tasks in one poll, a missing file
                           failing only itself, atomic replacement, unknown ids, one-line
                           errors (``balsam.testing.transfer_contract``, with
                           :func:`wait_for_tasks`)
``fakebatch``              the fake batch server engine your own fake ``qsub``/``qstat`` on PATH
                           run on (``balsam.testing.fakebatch``, with :func:`fake_batch_env` and
                           :func:`wait_for`)
=========================  ===================================================================

A platform plugin's whole contract test::

    from balsam.testing import PlatformContract
    from balsam_platform_mymachine import MyMachinePlatform

    class TestMyMachine(PlatformContract):
        platform_class = MyMachinePlatform
        allocation_env = {"PBS_NODEFILE": "{nodefile}", "PBS_JOBID": "4242.pbs01"}
        nodefile_text = "n0\\nn1\\n"
        expected_hostnames = ["n0", "n1"]
        expected_scheduler_id = 4242

See docs/plugins/writing-a-platform-plugin.md and docs/schedulers/writing-a-scheduler-plugin.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "HistoryCase",
    "PlatformContract",
    "Refusal",
    "ReplayRunner",
    "SchedulerContract",
    "TransferContract",
    "fake_batch_env",
    "fakebatch",
    "load_recorded",
    "result",
    "utc",
    "wait_for",
    "wait_for_tasks",
]

#: public name -> the submodule that defines it
_WHERE = {
    "HistoryCase": "scheduler_contract",
    "PlatformContract": "platform_contract",
    "Refusal": "scheduler_contract",
    "ReplayRunner": "replay",
    "SchedulerContract": "scheduler_contract",
    "TransferContract": "transfer_contract",
    "fake_batch_env": "fakebatch",
    "load_recorded": "replay",
    "result": "replay",
    "utc": "replay",
    "wait_for": "fakebatch",
    "wait_for_tasks": "transfer_contract",
}

if TYPE_CHECKING:  # pragma: no cover
    from . import fakebatch
    from .fakebatch import fake_batch_env, wait_for
    from .platform_contract import PlatformContract
    from .replay import ReplayRunner, load_recorded, result, utc
    from .scheduler_contract import HistoryCase, Refusal, SchedulerContract
    from .transfer_contract import TransferContract, wait_for_tasks


def __getattr__(name: str) -> Any:
    if name == "fakebatch":
        return importlib.import_module(f"{__name__}.fakebatch")
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
