"""balsam.testing fails drivers that break the contract (a kit that passes everything is no kit)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from balsam.builtin.default_platform import DefaultPlatform
from balsam.platform import LaunchSpec
from balsam.scheduler import Command, SchedulerError
from balsam.states import BatchJobState
from balsam.testing import PlatformContract, SchedulerContract, result
from balsam_scheduler_slurm import SlurmScheduler

SLURM_DATA = Path(__file__).resolve().parents[1] / "schedulers" / "data" / "slurm"


def test_importing_the_kit_imports_nothing_heavy():
    code = "import sys, balsam.testing; print(sorted(m for m in ('pytest', 'balsam.config', 'balsam.scheduler') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class TrustingSlurm(SlurmScheduler):
    """Reads anything it cannot parse as an empty queue, and lets parser exceptions out."""

    name = "trusting"

    def parse_status(self, result, now):
        try:
            return super().parse_status(result, now)
        except SchedulerError:
            return {}

    def parse_submit(self, result):
        return int(result.stdout.strip().split()[-1])  # ValueError / IndexError on garbage

    def get_statuses(self, now=None):  # no guard: what a driver overriding orchestration risks
        return self.parse_status(self.run(self.render_status(self.user)), now)


class TrustingContract(SchedulerContract):
    scheduler_class = TrustingSlurm
    user = "root"
    recorded_dir = SLURM_DATA
    submit_outputs = {"sbatch_parsable": 6}
    status_outputs = {"squeue_after": {5: BatchJobState.queued, 11: BatchJobState.queued}}


def test_garbage_read_as_an_empty_queue_fails_the_contract(tmp_path):
    with pytest.raises(AssertionError, match="must raise SchedulerError"):
        TrustingContract().test_garbage_gives_scheduler_error_only(tmp_path, 0, 0)


def test_an_exception_escaping_an_unguarded_override_fails_the_contract(tmp_path):
    class Unguarded(TrustingSlurm):
        def parse_status(self, result, now):
            return {}["missing"]

    class Contract(TrustingContract):
        scheduler_class = Unguarded

    with pytest.raises(KeyError):
        Contract().test_garbage_gives_scheduler_error_only(tmp_path, 0, 0)


def test_wrong_expectations_fail_the_contract():
    class Wrong(TrustingContract):
        scheduler_class = SlurmScheduler
        status_outputs = {"squeue_after": {5: BatchJobState.running}}

    with pytest.raises(AssertionError, match="squeue_after: got"):
        Wrong().test_status_outputs()


class MissingHostPlatform(DefaultPlatform):
    """Starts every launch on the first host only (the fault that makes serial mode degrade)."""

    name = "missing-host"
    description = "test double"

    def mpi_launch_args(self, spec: LaunchSpec) -> list[str]:
        return ["mpiexec", "-n", "1", "--hosts", spec.hostnames[0]]


def test_serial_workers_on_one_host_fail_the_contract():
    class Contract(PlatformContract):
        platform_class = MissingHostPlatform
        expected_hostnames = ["n0", "n1"]

    with pytest.raises(AssertionError, match="does not name hosts"):
        Contract().test_serial_workers_start_one_per_node(MissingHostPlatform(mpi_flavor="mpich"))


def test_undocumented_option_fails_the_contract():
    import attrs

    @attrs.frozen
    class Opts:
        flag: str = attrs.field(default="x")  # no help text

    class Undocumented(DefaultPlatform):
        options_schema = Opts

    class Contract(PlatformContract):
        platform_class = Undocumented

    with pytest.raises(AssertionError, match="no help text"):
        Contract().test_options_defaults_and_help()


def test_render_returning_non_strings_fails_the_contract(tmp_path):
    class Sloppy(SlurmScheduler):
        def render_delete(self, scheduler_id):
            return Command(["scancel", scheduler_id])  # an int argument

    class Contract(TrustingContract):
        scheduler_class = Sloppy

    with pytest.raises(AssertionError, match="non-string argument"):
        Contract().test_render_commands_are_strings(tmp_path)
