"""``TransferContract``: the conformance tests every transfer backend runs against itself.

Subclass it in your plugin's tests (the class name must start with ``Test``) and say how to reach a
location whose files the test can see, e.g. a local directory behind your protocol::

    from balsam.testing import TransferContract
    from balsam_transfer_mine import MyBackend

    class TestMyBackend(TransferContract):
        backend_class = MyBackend
        backend_name = "mine"                      # the balsam.transfers entry-point name
        options = {"threads": 2}                   # transfers.backend_options.mine

        def location_url(self, tmp_path):
            return "mine://localhost"              # remote paths are then paths of this machine

What the contract checks:

- the ``balsam.transfers`` entry point of ``backend_name`` loads ``backend_class`` (skipped when
  the distribution is not installed); the options schema builds with its defaults and every
  option has a help text;
- a stage-in and a stage-out batch (files and a recursive directory) arrive complete, and one
  ``poll`` call answers for several tasks; a task's ``info`` is a mapping;
- a missing source file is reported for that file only (``file_errors`` of a ``done`` task, or a
  ``failed`` task), as one line, while the other files of the batch arrive;
- copying onto an existing destination replaces it and leaves nothing else behind;
- a source that is a symlink arrives as a readable file with the linked file's content, never as a
  (dangling) link; so does a link inside a recursive item that points out of its tree;
- a name holding wildcard characters (``*``, ``?``, ``[``, ``]``) or a backslash is that one file,
  in both directions, with decoys its pattern would match beside it (rsync over ssh fetched
  ``run1.h5`` for ``run[1].h5``: its remote side expands wildcards);
- an id the backend never issued polls as ``unknown``; an empty batch or a relative path raises
  :class:`~balsam.transfer.TransferError`, never anything else;
- a task its owner or an administrator cancelled outside balsam is not tried again: ``failed`` with
  ``retryable`` False, or ``done`` with ``file_errors_retryable`` False for the files it did not
  deliver (its jobs FAILED: someone meant it to stop). Only where the subclass says how to cancel a
  task that way (override :meth:`TransferContract.cancel_outside_balsam`); skipped otherwise;
- a task the agent cancels itself (``cancel_task``: its deadline) stays retryable: ``failed`` with
  ``retryable`` True, or ``done`` with ``file_errors_retryable`` True (skipped for a backend that
  cannot cancel). Both are skipped, with the reason, when the task delivered every file before the
  cancel reached it: nothing was cancelled to check.

Backends that cannot run for real in a test (a cloud service) test against that service's own
recorded responses instead (the Globus plugin uses globus-sdk's testing fixtures).
"""

from __future__ import annotations

import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional

import attrs
import pytest

from ..options import option_help
from ..states import TransferDirection
from ..transfer import TaskState, TaskStatus, TransferBackend, TransferError, TransferFile, TransferLocation, build_backend

__all__ = ["TransferContract", "wait_for_tasks"]


def wait_for_tasks(backend: TransferBackend, task_ids: list[str], timeout: float = 60.0) -> dict[str, TaskStatus]:
    """Poll ``task_ids`` together until none is active; return their last statuses."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = backend.poll(task_ids)
        if all(s.state not in (TaskState.active, TaskState.inactive) for s in statuses.values()):
            return statuses
        if time.monotonic() > deadline:
            raise AssertionError(f"tasks still running after {timeout:.0f} s: {statuses}")
        time.sleep(0.05)


def _skip_if_done_before_the_cancel(status: TaskStatus, backend: TransferBackend) -> None:
    """A cancel check whose task delivered every file before the cancel reached it has nothing to
    look at: say so (skipped, with why), never pass without checking anything."""
    if status.state == TaskState.done and not status.file_errors:
        pytest.skip(f"{backend.name}: the task delivered every file before the cancel reached it; nothing to "
                    "check (a larger or slower task in _cancellable_task would be cancelled in time)")


class TransferContract:
    backend_class: ClassVar[Optional[type]] = None
    backend_name: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Any]] = {}

    def location_url(self, tmp_path: Path) -> str:
        """A location URL of this backend whose remote paths are paths of this machine."""
        raise NotImplementedError("set location_url() in your TransferContract subclass")

    def cancel_outside_balsam(self, backend: TransferBackend, task_id: str) -> None:
        """Cancel ``task_id`` as its owner or an administrator would, outside balsam (the service's
        web app or API, not ``backend.cancel_task``), preferably before it delivered every file.
        Override where your test can; the default skips the check that uses it."""
        pytest.skip(f"{type(self).__name__} does not say how a task is cancelled outside balsam")

    # -- helpers ---------------------------------------------------------------------------------

    def _cancellable_task(self, backend: TransferBackend, location: TransferLocation, tmp_path: Path) -> str:
        remote = tmp_path / "remote"
        remote.mkdir(parents=True, exist_ok=True)
        files = []
        for i in range(4):
            (remote / f"f{i}.bin").write_bytes(bytes(range(256)) * 4096)
            files.append(TransferFile(str(remote / f"f{i}.bin"), str(tmp_path / "site" / f"f{i}.bin")))
        return backend.submit(location, TransferDirection.stage_in, files)

    @pytest.fixture
    def backend(self) -> Any:
        assert self.backend_class is not None and self.backend_name, "set backend_class and backend_name"
        backend = build_backend(self.backend_class, self.backend_name, dict(self.options))
        yield backend
        backend.close()

    @pytest.fixture
    def location(self, tmp_path: Path) -> TransferLocation:
        return TransferLocation.parse("contract", self.location_url(tmp_path))

    # -- the contract ----------------------------------------------------------------------------

    def test_entry_point_and_options(self) -> None:
        assert self.backend_class is not None and issubclass(self.backend_class, TransferBackend)
        schema = self.backend_class.options_schema
        schema()  # every option has a default
        assert all(option_help(schema).values()), f"{schema.__name__}: every option needs a help text"
        found = [ep for ep in entry_points(group="balsam.transfers") if ep.name == self.backend_name]
        if not found:
            pytest.skip(f"no balsam.transfers entry point {self.backend_name!r} installed")
        assert found[0].load() is self.backend_class

    def test_stage_in_and_out(self, backend: TransferBackend, location: TransferLocation, tmp_path: Path) -> None:
        remote, site = tmp_path / "remote", tmp_path / "site"
        (remote / "tree" / "deep").mkdir(parents=True)
        (remote / "a.txt").write_text("alpha\n")
        (remote / "tree" / "deep" / "b.bin").write_bytes(bytes(range(256)) * 64)
        stage_in = backend.submit(location, TransferDirection.stage_in, [
            TransferFile(str(remote / "a.txt"), str(site / "job1" / "a.txt")),
            TransferFile(str(remote / "tree"), str(site / "job2" / "tree"), recursive=True),
        ])
        (site / "job3").mkdir(parents=True)
        (site / "job3" / "out.txt").write_text("result\n")
        stage_out = backend.submit(location, TransferDirection.stage_out, [
            TransferFile(str(site / "job3" / "out.txt"), str(remote / "results" / "job3.txt")),
        ])
        assert stage_in != stage_out
        statuses = wait_for_tasks(backend, [stage_in, stage_out])
        for status in statuses.values():
            assert status.state == TaskState.done and not status.file_errors, status
            assert isinstance(status.info, Mapping)
        assert (site / "job1" / "a.txt").read_text() == "alpha\n"
        assert (site / "job2" / "tree" / "deep" / "b.bin").read_bytes() == bytes(range(256)) * 64
        assert (remote / "results" / "job3.txt").read_text() == "result\n"

    def test_missing_source_fails_only_that_file(self, backend: TransferBackend, location: TransferLocation,
                                                 tmp_path: Path) -> None:
        (tmp_path / "here.txt").write_text("here")
        good, bad = str(tmp_path / "site" / "good.txt"), str(tmp_path / "site" / "bad.txt")
        task = backend.submit(location, TransferDirection.stage_in, [
            TransferFile(str(tmp_path / "here.txt"), good),
            TransferFile(str(tmp_path / "not-there.txt"), bad),
        ])
        status = wait_for_tasks(backend, [task])[task]
        if status.state == TaskState.failed:
            assert status.error and "\n" not in status.error
        else:
            assert status.state == TaskState.done
            assert set(status.file_errors) == {bad}, status.file_errors
            assert "\n" not in status.file_errors[bad] and status.file_errors[bad]
            assert Path(good).read_text() == "here"
        assert not Path(bad).exists()

    def test_replacing_a_destination_leaves_nothing_else(self, backend: TransferBackend, location: TransferLocation,
                                                        tmp_path: Path) -> None:
        src, dest = tmp_path / "src.txt", tmp_path / "out" / "dest.txt"
        dest.parent.mkdir()
        dest.write_text("old")
        for text in ("new 1", "new 2"):
            src.write_text(text)
            task = backend.submit(location, TransferDirection.stage_in, [TransferFile(str(src), str(dest))])
            assert wait_for_tasks(backend, [task])[task].state == TaskState.done
            assert dest.read_text() == text
        assert sorted(p.name for p in dest.parent.iterdir()) == ["dest.txt"]

    def test_symlinked_sources_arrive_as_their_files(self, backend: TransferBackend, location: TransferLocation,
                                                     tmp_path: Path) -> None:
        remote, site = tmp_path / "remote", tmp_path / "site"
        (remote / "runs").mkdir(parents=True)
        (remote / "runs" / "run42.h5").write_bytes(b"run 42 data\n")
        (remote / "latest.h5").symlink_to("runs/run42.h5")  # relative: dangles anywhere else
        (remote / "tree").mkdir()
        (remote / "tree" / "own.txt").write_text("own\n")
        (remote / "tree" / "shared.h5").symlink_to("../runs/run42.h5")  # points out of the tree
        task = backend.submit(location, TransferDirection.stage_in, [
            TransferFile(str(remote / "latest.h5"), str(site / "job1" / "raw.h5")),
            TransferFile(str(remote / "tree"), str(site / "job2" / "tree"), recursive=True),
        ])
        status = wait_for_tasks(backend, [task])[task]
        assert status.state == TaskState.done and not status.file_errors, status
        for path in (site / "job1" / "raw.h5", site / "job2" / "tree" / "shared.h5"):
            assert not path.is_symlink(), f"{path} arrived as a link to {path.readlink()}"
            assert path.read_bytes() == b"run 42 data\n"
        assert (site / "job2" / "tree" / "own.txt").read_text() == "own\n"

    def test_names_with_wildcard_characters_are_taken_literally(self, backend: TransferBackend,
                                                                location: TransferLocation, tmp_path: Path) -> None:
        remote, site = tmp_path / "remote", tmp_path / "site"
        # {name: a decoy its pattern matches}: the name must arrive, the decoy stay where it is.
        names = {"run[1].h5": "run1.h5", "*.dat": "a.dat", "q?.txt": "qa.txt", "back\\slash": "backslash"}
        (remote / "d[1]").mkdir(parents=True)
        (remote / "d1").mkdir()
        for name, decoy in names.items():
            (remote / name).write_text(f"right {name}\n")
            (remote / decoy).write_text(f"WRONG {decoy}\n")
        (remote / "d[1]" / "f.txt").write_text("right d[1]\n")
        (remote / "d1" / "f.txt").write_text("WRONG d1\n")
        stage_in = backend.submit(location, TransferDirection.stage_in, [
            *(TransferFile(str(remote / name), str(site / "in" / name)) for name in names),
            TransferFile(str(remote / "d[1]"), str(site / "in" / "tree"), recursive=True),
        ])
        outputs = {"res[1].h5": "res1.h5", "*.out": "b.out", "r?.txt": "ra.txt"}
        (site / "out").mkdir(parents=True)
        (remote / "results").mkdir()
        for name, decoy in outputs.items():
            (site / "out" / name).write_text(f"result {name}\n")
            (remote / "results" / decoy).write_text(f"keep {decoy}\n")
        stage_out = backend.submit(location, TransferDirection.stage_out, [
            TransferFile(str(site / "out" / name), str(remote / "results" / name)) for name in outputs
        ])
        statuses = wait_for_tasks(backend, [stage_in, stage_out])
        for status in statuses.values():
            assert status.state == TaskState.done and not status.file_errors, status
        got = {p.relative_to(site / "in").as_posix(): p.read_text() for p in (site / "in").rglob("*") if p.is_file()}
        assert got == {**{name: f"right {name}\n" for name in names}, "tree/f.txt": "right d[1]\n"}, f"arrived: {got}"
        results = {p.name: p.read_text() for p in (remote / "results").iterdir()}
        assert results == {**{name: f"result {name}\n" for name in outputs},
                           **{decoy: f"keep {decoy}\n" for decoy in outputs.values()}}, f"results: {results}"
        for decoy in names.values():
            assert (remote / decoy).read_text() == f"WRONG {decoy}\n"

    def test_unknown_ids_and_bad_requests(self, backend: TransferBackend, location: TransferLocation) -> None:
        assert backend.poll(["never-issued"])["never-issued"].state == TaskState.unknown
        assert backend.poll([]) == {}
        with pytest.raises(TransferError) as empty:
            backend.submit(location, TransferDirection.stage_in, [])
        assert not empty.value.retryable
        with pytest.raises(TransferError) as relative:
            backend.submit(location, TransferDirection.stage_in, [TransferFile("relative/path", "/tmp/x")])
        assert "\n" not in str(relative.value)

    def test_a_task_cancelled_outside_balsam_is_not_retried(self, backend: TransferBackend, location: TransferLocation,
                                                            tmp_path: Path) -> None:
        """The files of a task its owner or an administrator cancelled fail for good (the agent
        reads ``retryable`` of a failed task and ``file_errors_retryable`` of a done one): retried,
        they would be copied again against someone's will."""
        task = self._cancellable_task(backend, location, tmp_path)
        self.cancel_outside_balsam(backend, task)
        status = wait_for_tasks(backend, [task])[task]
        if status.state == TaskState.failed:
            assert not status.retryable, f"a task cancelled outside balsam must not be retryable: {status}"
            assert status.error and "\n" not in status.error
        else:
            assert status.state == TaskState.done, status
            _skip_if_done_before_the_cancel(status, backend)
            assert not status.file_errors_retryable, (
                f"the undelivered files of a task cancelled outside balsam must not be retried "
                f"(file_errors_retryable False): {status}")
            assert all(e and "\n" not in e for e in status.file_errors.values()), status.file_errors

    def test_a_task_the_agent_cancelled_stays_retryable(self, backend: TransferBackend, location: TransferLocation,
                                                       tmp_path: Path) -> None:
        """The agent's own cancel (its deadline) costs each undelivered file one try, never its job."""
        task = self._cancellable_task(backend, location, tmp_path)
        try:
            backend.cancel_task(task)
        except TransferError as exc:
            pytest.skip(f"{backend.name} cannot cancel a task: {exc}")
        status = wait_for_tasks(backend, [task])[task]
        if status.state == TaskState.failed:
            assert status.retryable, f"a task the agent cancelled must stay retryable: {status}"
        else:
            assert status.state == TaskState.done, status
            _skip_if_done_before_the_cancel(status, backend)
            assert status.file_errors_retryable, (
                f"the undelivered files of a task the agent cancelled must stay retryable: {status}")

    def test_status_is_frozen(self) -> None:
        status = TaskStatus(TaskState.done)
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            status.state = TaskState.failed  # type: ignore[misc]
