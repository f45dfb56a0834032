"""``PlatformContract``: the conformance tests every platform plugin runs against itself.

Subclass it in your plugin's tests (the class name must start with ``Test`` for pytest to collect
it) and describe your machine with class attributes; every ``test_*`` method below then runs
against your platform. A few lines suffice::

    from balsam.platform import LaunchSpec
    from balsam.testing import PlatformContract
    from balsam_platform_mymachine import MyMachinePlatform

    class TestMyMachine(PlatformContract):
        platform_class = MyMachinePlatform
        # the allocation as the batch system sets it up; {nodefile} is replaced by the path of a
        # file holding nodefile_text
        allocation_env = {"PBS_NODEFILE": "{nodefile}", "PBS_JOBID": "4242.pbs01"}
        nodefile_text = "x1000c0s0b0n0\\nx1000c0s0b0n1\\n"
        expected_hostnames = ["x1000c0s0b0n0", "x1000c0s0b0n1"]
        expected_scheduler_id = 4242
        expected_gpu_ids = ["0", "1", "2", "3"]        # on each node
        # recorded output of the programs discovery runs, as fakes on PATH
        fake_programs = {"nvidia-smi": "GPU 0: A100 (UUID: ...)\\n..."}
        gpu_visibility = [(["1", "3"], {"CUDA_VISIBLE_DEVICES": "1,3"})]
        launch_lines = [
            (LaunchSpec(cmdline="./app", hostnames=["n0", "n1"], ranks_per_node=4),
             "mpiexec -n 8 --ppn 4 --hosts n0,n1 ./app"),
        ]

What the contract checks:

- ``name`` and ``description`` are set; the ``balsam.platforms`` entry point of that name loads
  this class (skipped when the distribution is not installed, e.g. in a source checkout);
- the options schema builds with its defaults, every option has a help text, and
  ``platform_options`` (yours) are accepted;
- ``settings_defaults()`` is in settings.yml shape and passes the real settings loader (so
  ``balsam site init --platform NAME`` writes a valid file), names this platform, and any
  ``launcher.platform_options`` it sets fit the options schema;
- ``job_template()``, when given, renders for a sample BatchJob (mpi and serial) into a bash script
  that ``bash -n`` accepts and that starts the launcher;
- ``discover_nodes(env)`` on the faked allocation finds exactly ``expected_hostnames`` in order,
  with unique node ids, at least one CPU id each and (when given) ``expected_cpu_count`` CPUs and
  ``expected_gpu_ids`` GPUs; ``scheduler_id(env)`` gives ``expected_scheduler_id``;
- ``gpu_environment(ids)`` contains the variables of ``gpu_visibility`` for each case, and only
  strings;
- ``mpi_command_line(spec)`` is exactly the line of each ``launch_lines`` case and is
  ``mpi_launch_args(spec)`` followed by the app's command line; the arguments are strings;
- the serial-mode worker start (one rank per node over all nodes, see
  ``balsam.launcher.modes.serial``) gives a command line (``serial_worker_line`` checks it exactly
  when set) that names every host, so each node gets its worker;
- ``unbound_serial_worker_params()`` (what replaces ``serial_mode_startup_params: {cpu_affinity:
  none}``) is None or string launch params, and the worker line renders with them
  (``unbound_serial_worker_line`` checks it exactly when set);
- ``task_cpu_ids(ids, threads_per_core)`` (what a serial-mode task is pinned to) keeps the assigned
  ids first, is exactly them for one thread per core, and gives each case of ``task_cpu_cases``.
- ``signal_runs(job_ids, sig)`` (the launcher's stop signal, delivered by the platform) returns a
  set of job ids and delivers nothing when no job runs.

Override a ``test_*`` method (or set it to ``None``) only for a check that cannot apply to your
machine, and say why in a comment.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence

import attrs
import pytest

from balsam.config import parse_settings, render_settings_yaml
from balsam.options import build_options
from balsam.platform import LaunchSpec, NodeInfo, Platform

__all__ = ["PlatformContract", "SERIAL_WORKER_CMDLINE", "write_fake_programs"]

#: The app command line of the serial-worker launch the contract renders.
SERIAL_WORKER_CMDLINE = "python -m balsam.launcher.modes.serial_worker /site/log/serial.json"


def write_fake_programs(directory: Path, programs: Mapping[str, str]) -> Path:
    """Write executables that print recorded output (``{name: stdout}``) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, stdout in programs.items():
        data = directory / f"{name}.out"
        data.write_text(stdout)
        program = directory / name
        program.write_text(f"#!/bin/sh\ncat {shlex.quote(str(data))}\n")
        program.chmod(0o755)
    return directory


class PlatformContract:
    """Base class of a platform plugin's conformance tests (see the module docstring)."""

    #: The Platform subclass under test (required).
    platform_class: ClassVar[type[Platform]]
    #: ``launcher.platform_options`` to build it with (a mapping; None: the schema's defaults).
    platform_options: ClassVar[Optional[Mapping[str, Any]]] = None
    #: The allocation's environment; ``{nodefile}`` in a value is the path of ``nodefile_text``.
    allocation_env: ClassVar[Mapping[str, str]] = {}
    #: Contents of the allocation's node file, when the platform reads one.
    nodefile_text: ClassVar[Optional[str]] = None
    #: ``{program: stdout}``: recorded output of programs discovery runs (put first on PATH).
    fake_programs: ClassVar[Mapping[str, str]] = {}
    #: Hostnames discover_nodes must find, in order (required).
    expected_hostnames: ClassVar[Sequence[str]] = ()
    #: CPU ids per node, when the platform knows them without reading this host.
    expected_cpu_count: ClassVar[Optional[int]] = None
    #: GPU ids on each node, as discover_nodes reports them (None: not checked).
    expected_gpu_ids: ClassVar[Optional[Sequence[str]]] = None
    #: What scheduler_id(allocation_env) returns.
    expected_scheduler_id: ClassVar[Optional[int]] = None
    #: ``(gpu ids, variables that must be in gpu_environment(ids))`` cases.
    gpu_visibility: ClassVar[Sequence[tuple[Sequence[str], Mapping[str, str]]]] = ()
    #: ``(LaunchSpec, expected mpi_command_line)`` cases.
    launch_lines: ClassVar[Sequence[tuple[LaunchSpec, str]]] = ()
    #: The expected serial-worker start line on ``expected_hostnames`` (None: only checked loosely).
    serial_worker_line: ClassVar[Optional[str]] = None
    #: The same line with ``unbound_serial_worker_params()`` (None: only checked loosely).
    unbound_serial_worker_line: ClassVar[Optional[str]] = None
    #: ``(assigned cpu ids, threads_per_core, ids the task is pinned to)`` cases of ``task_cpu_ids``.
    task_cpu_cases: ClassVar[Sequence[tuple[Sequence[int], int, Sequence[int]]]] = ()

    # -- fixtures ---------------------------------------------------------------------------------
    @pytest.fixture
    def platform(self) -> Platform:
        return self.platform_class(options=self.platform_options)

    @pytest.fixture
    def allocation(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
        """The faked allocation environment (the fake programs are put first on PATH)."""
        nodefile = tmp_path / "nodefile"
        if self.nodefile_text is not None:
            nodefile.write_text(self.nodefile_text)
        env = {key: str(value).replace("{nodefile}", str(nodefile)) for key, value in self.allocation_env.items()}
        if self.fake_programs:
            bin_dir = write_fake_programs(tmp_path / "fake-bin", self.fake_programs)
            path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
            monkeypatch.setenv("PATH", path)
            env.setdefault("PATH", path)
        return env

    def discovered(self, platform: Platform, env: Mapping[str, str]) -> list[NodeInfo]:
        nodes = platform.discover_nodes(env)
        assert isinstance(nodes, list) and all(isinstance(n, NodeInfo) for n in nodes), \
            "discover_nodes must return a list of balsam.platform.NodeInfo"
        return nodes

    # -- identity and options -------------------------------------------------------------------
    def test_name_and_description(self):
        assert self.platform_class.name, "set the platform's `name` (used in settings.yml)"
        assert self.platform_class.description, "set a one-line `description` (shown by site init)"

    def test_entry_point_loads_this_class(self):
        points = [ep for ep in entry_points(group="balsam.platforms") if ep.name == self.platform_class.name]
        if not points:
            pytest.skip(f"no installed balsam.platforms entry point named {self.platform_class.name!r}")
        assert points[0].load() is self.platform_class

    def test_options_defaults_and_help(self):
        schema = self.platform_class.options_schema
        assert attrs.has(schema), "options_schema must be an attrs class (see balsam.options)"
        schema()  # every option has a default
        for field in attrs.fields(schema):
            assert field.metadata.get("help"), f"option {field.name!r} has no help text (use balsam.options.option)"
        assert isinstance(self.platform_class().options, schema)
        if self.platform_options is not None:
            build_options(schema, self.platform_options, where="launcher.platform_options")

    def test_settings_defaults_pass_the_settings_loader(self, platform):
        if not any(ep.name == self.platform_class.name for ep in entry_points(group="balsam.platforms")):
            pytest.skip(f"platform {self.platform_class.name!r} is not installed (pip install -e .): "
                        "the settings loader accepts installed platforms only")
        defaults = platform.settings_defaults()
        assert isinstance(defaults, dict), "settings_defaults() returns a dict in settings.yml shape"
        text = render_settings_yaml(defaults, source=f"{self.platform_class.__name__}.settings_defaults()")
        import yaml

        settings = parse_settings(yaml.safe_load(text), source="settings.yml written by site init")
        assert settings.launcher.platform == self.platform_class.name, \
            "settings_defaults() must set launcher.platform to this platform's name"
        options = (defaults.get("launcher") or {}).get("platform_options")
        if options:
            build_options(self.platform_class.options_schema, options, where="launcher.platform_options")

    @pytest.mark.parametrize("job_mode", ["mpi", "serial"])
    def test_job_template_renders(self, platform, tmp_path, job_mode):
        template = platform.job_template()
        if template is None:
            pytest.skip("the platform uses its scheduler's job template")
        from balsam.site.job_template import build_context, render_job_script

        batch_job = {"id": 7, "project": "proj", "queue": "debug", "num_nodes": 2, "wall_time_min": 30,
                     "job_mode": job_mode, "filter_tags": {"wf": "a"}, "optional_params": {}, "partitions": []}
        script = render_job_script(template, build_context(batch_job, tmp_path, call_hook=False))
        assert script.startswith("#!"), "a job template starts with a #! line"
        assert f"-j {job_mode}" in script and "balsam.launcher" in script, "the script must start the launcher"
        checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
        assert checked.returncode == 0, f"bash -n rejects the rendered script: {checked.stderr.strip()}"

    # -- inside the allocation ------------------------------------------------------------------
    def test_discover_nodes(self, platform, allocation):
        assert self.expected_hostnames, "set expected_hostnames (and allocation_env / nodefile_text)"
        nodes = self.discovered(platform, allocation)
        assert [n.hostname for n in nodes] == list(self.expected_hostnames)
        assert len({n.node_id for n in nodes}) == len(nodes), "node ids must be unique"
        for node in nodes:
            assert node.cpu_ids, f"node {node.hostname} has no CPU ids"
            if self.expected_cpu_count is not None:
                assert len(node.cpu_ids) == self.expected_cpu_count
            if self.expected_gpu_ids is not None:
                assert list(node.gpu_ids) == list(self.expected_gpu_ids)
            assert all(isinstance(g, str) for g in node.gpu_ids), "GPU ids are strings"

    def test_scheduler_id(self, platform, allocation):
        assert platform.scheduler_id(allocation) == self.expected_scheduler_id

    def test_gpu_visibility(self, platform):
        for gpu_ids, expected in self.gpu_visibility:
            env = platform.gpu_environment(list(gpu_ids))
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()), \
                "gpu_environment returns str -> str"
            for key, value in expected.items():
                assert env.get(key) == value, f"gpu_environment({list(gpu_ids)}): {key}={env.get(key)!r}, expected {value!r}"

    def test_launch_lines(self, platform):
        for spec, expected in self.launch_lines:
            args = platform.mpi_launch_args(spec)
            assert args and all(isinstance(a, str) for a in args), "mpi_launch_args returns a list of str"
            line = platform.mpi_command_line(spec)
            assert line == expected
            assert line.endswith(spec.cmdline), "the app's command line comes last"

    def test_serial_workers_start_one_per_node(self, platform):
        hosts = list(self.expected_hostnames) or ["node0", "node1"]
        spec = LaunchSpec(cmdline=SERIAL_WORKER_CMDLINE, hostnames=hosts, ranks_per_node=1)
        line = platform.mpi_command_line(spec)
        assert line.endswith(SERIAL_WORKER_CMDLINE)
        if self.serial_worker_line is not None:
            assert line == self.serial_worker_line
        else:
            launch = line[: -len(SERIAL_WORKER_CMDLINE)]
            missing = [h for h in hosts if h not in launch]
            assert not missing, f"the serial-worker start line does not name hosts {missing}: {line}"

    def test_serial_workers_unbound(self, platform):
        params = platform.unbound_serial_worker_params()
        if params is None:  # the platform does not know: serial mode drops cpu_affinity: none
            assert self.unbound_serial_worker_line is None, "unbound_serial_worker_params() returned None"
            return
        assert isinstance(params, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), \
            "unbound_serial_worker_params() returns None or a dict of str -> str launch params"
        hosts = list(self.expected_hostnames) or ["node0", "node1"]
        line = platform.mpi_command_line(LaunchSpec(cmdline=SERIAL_WORKER_CMDLINE, hostnames=hosts, ranks_per_node=1,
                                                    launch_params=params))
        assert line.endswith(SERIAL_WORKER_CMDLINE)
        if self.unbound_serial_worker_line is not None:
            assert line == self.unbound_serial_worker_line

    def test_task_cpu_ids(self, platform):
        for threads_per_core in (1, 2):
            pinned = platform.task_cpu_ids((0, 1), threads_per_core)
            assert isinstance(pinned, tuple) and all(isinstance(c, int) for c in pinned), \
                "task_cpu_ids returns a tuple of int"
            assert pinned[:2] == (0, 1), "task_cpu_ids keeps the assigned ids first"
            if threads_per_core == 1:
                assert pinned == (0, 1), "one thread per core: the task is pinned to its assigned ids only"
            elif pinned != (0, 1):
                # Sibling threads added: the ids are cores, and the node manager must count a job's
                # threads per core against them (else a 2-thread rank would get two whole cores).
                assert platform.cpu_ids_are_cores, "task_cpu_ids adds sibling threads: set cpu_ids_are_cores = True"
            else:
                assert not platform.cpu_ids_are_cores, \
                    "cpu_ids_are_cores is True but task_cpu_ids adds no sibling thread at 2 threads per core"
        for cpu_ids, threads_per_core, expected in self.task_cpu_cases:
            assert platform.task_cpu_ids(tuple(cpu_ids), threads_per_core) == tuple(expected)

    def test_signal_runs_without_runs_delivers_nothing(self, platform):
        # The base class and every driver: an empty list (no run left to signal) is no error.
        delivered = platform.signal_runs([], signal.SIGTERM)
        assert isinstance(delivered, set) and not delivered, "signal_runs([]) returns an empty set"
