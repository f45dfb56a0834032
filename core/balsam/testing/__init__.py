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
    "fake_batch_env",
    "fakebatch",
    "load_recorded",
    "result",
    "utc",
    "wait_for",
]

#: public name -> the submodule that defines it
_WHERE = {
    "HistoryCase": "scheduler_contract",
    "PlatformContract": "platform_contract",
    "Refusal": "scheduler_contract",
    "ReplayRunner": "replay",
    "SchedulerContract": "scheduler_contract",
    "fake_batch_env": "fakebatch",
    "load_recorded": "replay",
    "result": "replay",
    "utc": "replay",
    "wait_for": "fakebatch",
}

if TYPE_CHECKING:  # pragma: no cover
    from . import fakebatch
    from .fakebatch import fake_batch_env, wait_for
    from .platform_contract import PlatformContract
    from .replay import ReplayRunner, load_recorded, result, utc
    from .scheduler_contract import HistoryCase, Refusal, SchedulerContract


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
