"""Data staging faults an audit found outside the transfers module:

- ``local``: a destination that could not be written (permission denied) was named by the hidden
  temporary the copy goes to first (``[Errno 13] Permission denied: '/sys/kernel/.a.txt.balsam-
  partial-vm-15709-...'``), a name the job never gave. Now the error names the job's destination;
- ``local``: a directory stage-in whose destination is a symbolic link to a directory failed with
  ``[Errno 20] Not a directory: '.dir.balsam-partial-...' -> 'dir'``, where rsync writes into the
  link's target. Now ``local`` does as rsync does (the link stays a link);
- app registration refused an absolute ``local_path`` but took ``../esc.txt`` and ``a/../../x``
  (their jobs were then created and failed at stage time). Now a path with a ``..`` part is
  refused with a 422 naming the slot (its ``loc``) and the path, as the agent refuses it at stage
  time (even ``ok/../in.txt``, which stays inside: the agent and the destination checks compare
  paths as written). An app stored before this rule keeps working: its jobs are created and such
  an item fails at stage time with the agent's reason, as before.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import pytest
import sqlalchemy as sa

from balsam.builtin.local_transfer import PARTIAL_MARK, LocalTransfer
from balsam.builtin.rsync_transfer import RsyncTransfer
from balsam.site.modules.transfers import item_transfer_paths
from balsam.states import TransferDirection
from balsam.testing import wait_for_tasks
from balsam.transfer import TaskState, TransferError, TransferFile, TransferLocation, build_backend

FAKE_SSH = Path(__file__).with_name("fake_ssh")
BACKENDS = {
    "local": (LocalTransfer, "local", {"threads": 1}, "local://"),
    "rsync-local": (RsyncTransfer, "rsync", {"threads": 1}, "rsync:///"),
    "rsync-ssh": (RsyncTransfer, "rsync", {"threads": 1, "ssh_command": f"{sys.executable} {FAKE_SSH}"}, "rsync://me@dtn"),
}


def run(kind: str, files: list[TransferFile], direction: TransferDirection = TransferDirection.stage_in):
    cls, name, options, url = BACKENDS[kind]
    backend = build_backend(cls, name, options)
    try:
        task = backend.submit(TransferLocation.parse("x", url), direction, files)
        return wait_for_tasks(backend, [task], timeout=60)[task]
    finally:
        backend.close()


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ------------------------------------------------------------------------- the local backend's errors
@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory in which no file can be created: a 0555 one, or for root (whom modes do not
    stop) /sys/kernel, where creating a file is refused with EACCES."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        yield locked
        locked.chmod(0o755)
        return
    probe = Path("/sys/kernel") / f".balsam-probe-{os.getpid()}"
    try:
        probe.open("wb").close()
    except PermissionError:
        yield Path("/sys/kernel")
        return
    except OSError:
        pass
    else:
        probe.unlink()
    pytest.skip("no directory refuses root's writes here (/sys/kernel is writable or absent)")


@pytest.mark.parametrize("recursive", [False, True], ids=["file", "directory"])
def test_a_permission_denied_destination_is_named_as_the_job_gave_it(tmp_path: Path, unwritable_dir: Path,
                                                                     recursive: bool) -> None:
    src = tmp_path / "src"
    if recursive:
        src.mkdir()
        (src / "a.txt").write_text("a\n")
    else:
        src = tmp_path / "a.txt"
        src.write_text("a\n")
    dest = unwritable_dir / "a.txt"
    status = run("local", [TransferFile(str(src), str(dest), recursive=recursive)])
    assert status.state == TaskState.done, status
    error = status.file_errors[str(dest)]
    # (sysfs refuses a new directory with EPERM)
    assert error in (f"[Errno {errno.EACCES}] Permission denied: '{dest}'",
                     f"[Errno {errno.EPERM}] Operation not permitted: '{dest}'"), error
    assert PARTIAL_MARK not in error
    assert not dest.exists()


def test_a_file_of_a_directory_copy_that_cannot_be_written_is_named_in_the_destination(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """copytree gathers its files' errors (shutil.Error, a list): each names the file at its place
    in the job's destination. (A file refused inside a directory being created: the refusal is
    stood in for, as root writes anywhere a directory could be made.)"""
    import balsam.builtin.local_transfer as lt

    real_copy = lt._copy_file

    def refusing_copy(src: Path, dst: Path, stop: Any) -> None:
        if dst.name == "b.txt":
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        real_copy(src, dst, stop)

    monkeypatch.setattr(lt, "_copy_file", refusing_copy)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a\n")
    (src / "sub" / "b.txt").write_text("b\n")
    dest = tmp_path / "w" / "out"
    status = run("local", [TransferFile(str(src), str(dest), recursive=True)])
    error = status.file_errors[str(dest)]
    assert PARTIAL_MARK not in error and f"'{dest}/sub/b.txt'" in error and "Permission denied" in error, error
    assert not (tmp_path / "w").exists() or tree(tmp_path / "w") == []


def test_a_failed_rename_of_a_directory_names_the_destination(tmp_path: Path) -> None:
    """A directory stage-in onto a link to a file: the rename of the copied directory fails
    (ENOTDIR); the error names the destination once, not the temporary and the destination."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "file").write_text("f\n")
    dest = tmp_path / "w" / "dir"
    dest.symlink_to("file")
    status = run("local", [TransferFile(str(src), str(dest), recursive=True)])
    assert status.file_errors == {str(dest): f"[Errno {errno.ENOTDIR}] Not a directory: '{dest}'"}, status
    assert tree(tmp_path / "w") == ["dir", "file"] and dest.is_symlink()


# ------------------------------------------------------------- a directory onto a link to a directory
@pytest.mark.parametrize("kind", list(BACKENDS))
@pytest.mark.parametrize("direction", [TransferDirection.stage_in, TransferDirection.stage_out], ids=["in", "out"])
def test_a_directory_copied_onto_a_link_to_a_directory_lands_in_its_target(tmp_path: Path, kind: str,
                                                                          direction: TransferDirection) -> None:
    """As rsync does (it changes into its destination directory): the files land in the link's
    target, merged with what is there, and the link stays a link."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a\n")
    (src / "sub" / "b.txt").write_text("b\n")
    work = tmp_path / "w"
    (work / "real").mkdir(parents=True)
    (work / "real" / "kept.txt").write_text("k\n")
    dest = work / "dir"
    dest.symlink_to("real")
    status = run(kind, [TransferFile(str(src), str(dest), recursive=True)], direction)
    assert status.state == TaskState.done and not status.file_errors, status
    assert dest.is_symlink() and os.readlink(dest) == "real"
    assert tree(work / "real") == ["a.txt", "kept.txt", "sub", "sub/b.txt"]
    assert (work / "real" / "sub" / "b.txt").read_text() == "b\n"
    assert tree(work) == ["dir", "real", "real/a.txt", "real/kept.txt", "real/sub", "real/sub/b.txt"]


def test_a_link_to_a_directory_leading_out_of_the_workdir_is_still_refused_by_the_agent(tmp_path: Path) -> None:
    """Following the link is safe because the agent refuses, before any backend runs, a stage-in
    whose destination a link takes out of the job's workdir."""
    work = tmp_path / "job"
    work.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (work / "inputs").symlink_to(tmp_path / "elsewhere")
    item = {"direction": "in", "local_path": "inputs", "remote_path": "/data/in", "recursive": True}
    with pytest.raises(TransferError, match="leads outside the job's workdir"):
        item_transfer_paths(item, work)


# ------------------------------------------------------------------------- app registration's rule
@pytest.fixture
def server(database_url: str) -> Iterator[tuple[Any, str]]:
    """An in-process server on ``database_url`` and a client logged in as a fresh user."""
    from starlette.testclient import TestClient

    from balsam.server.app import create_app
    from balsam.server.settings import ServerSettings

    settings = ServerSettings(database_url=database_url, secret_key="k" * 32, registration="open")
    app = create_app(settings=settings, create_tables_now=True)
    password = "a long enough password"
    with TestClient(app) as client:
        client.post("/auth/password/register", json={"username": "u", "password": password}).raise_for_status()
        token = client.post("/auth/password/login", data={"username": "u", "password": password}).json()["access_token"]
        client.headers["Authorization"] = f"Bearer {token}"
        yield client, database_url


def app_body(site_id: int, local_path: str, name: str = "A") -> dict:
    return {"site_id": site_id, "name": name, "serialized_class": "", "source_code": "", "parameters": {},
            "transfers": {"inp": {"required": False, "direction": "in", "local_path": local_path}}}


def make_site(client: Any) -> int:
    resp = client.post("/sites/", json={"name": "s", "path": "/tmp/s", "transfer_locations": {"data": "local://"}})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


LEAVING = ["../esc.txt", "..", "./..", "a/../../esc.txt", "a/b/../../..", "ok/../../x", "/abs/in.txt", "//in.txt",
           "ok/../in.txt", "a/b/../c.txt", "ok/.."]
STAYING = ["in.txt", ".", "./in.txt", "sub/dir/", "a//b.txt", "x..y/..z"]


def test_a_slot_leaving_the_workdir_is_refused_naming_slot_and_path(server: tuple[Any, str]) -> None:
    client, _ = server
    site_id = make_site(client)
    app = client.post("/apps/", json=app_body(site_id, "in.txt", name="Kept")).json()
    for local_path in LEAVING:
        resp = client.post("/apps/", json=app_body(site_id, local_path))
        assert resp.status_code == 422, (local_path, resp.text)
        [item] = resp.json()["detail"]
        assert item["loc"] == ["body", "transfers", "inp", "local_path"]
        msg = item["msg"]
        # (named as stored: an App's local_path is a Path, "./.." is "..")
        assert "\n" not in msg and msg.startswith(repr(str(PurePosixPath(local_path)))), msg
        # An update is held to the same rule.
        resp = client.put(f"/apps/{app['id']}", json={"transfers": app_body(site_id, local_path)["transfers"]})
        assert resp.status_code == 422 and resp.json()["detail"][0]["msg"] == msg, resp.text
    assert [a["name"] for a in client.get("/apps/").json()["results"]] == ["Kept"]
    assert client.get(f"/apps/{app['id']}").json()["transfers"]["inp"]["local_path"] == "in.txt"
    msgs = {path: client.post("/apps/", json=app_body(site_id, path)).json()["detail"][0]["msg"]
            for path in ("../esc.txt", "ok/../in.txt", "/abs/in.txt")}
    assert msgs == {
        "../esc.txt": "'../esc.txt' has a '..' part: a transfer slot's local_path stays inside the job's workdir, "
                      "written without '..'",
        "ok/../in.txt": "'ok/../in.txt' has a '..' part: a transfer slot's local_path stays inside the job's workdir, "
                        "written without '..'",
        "/abs/in.txt": "'/abs/in.txt' is absolute: a transfer slot's local_path is relative to the job's workdir",
    }


def test_a_slot_staying_inside_the_workdir_is_taken(server: tuple[Any, str]) -> None:
    client, _ = server
    site_id = make_site(client)
    for i, local_path in enumerate(STAYING):
        resp = client.post("/apps/", json=app_body(site_id, local_path, name=f"A{i}"))
        assert resp.status_code == 201, (local_path, resp.text)


def test_an_app_stored_before_the_rule_still_works_and_its_item_fails_at_stage_time(server: tuple[Any, str],
                                                                                   tmp_path: Path) -> None:
    """An app registered with ``../x`` before the rule: it is read, its other fields can be
    updated, its jobs are created; such an item fails at stage time with the agent's reason (what
    its jobs did before), never charged a retry."""
    from balsam.server.tables import apps

    client, database_url = server
    site_id = make_site(client)
    app = client.post("/apps/", json=app_body(site_id, "in.txt")).json()
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            slot = {"required": False, "direction": "in", "local_path": "../x", "description": "", "recursive": False}
            conn.execute(sa.update(apps).where(apps.c.id == app["id"]).values(transfers={"inp": slot}))
    finally:
        engine.dispose()
    assert client.get(f"/apps/{app['id']}").json()["transfers"]["inp"]["local_path"] == "../x"
    resp = client.put(f"/apps/{app['id']}", json={"description": "still editable"})
    assert resp.status_code == 200 and resp.json()["description"] == "still editable", resp.text

    resp = client.post("/jobs/", json=[{"workdir": "j/1", "app_id": app["id"],
                                        "transfers": {"inp": {"location_alias": "data", "path": "/data/x"}}}])
    assert resp.status_code == 201, resp.text
    job_id = resp.json()[0]["id"]
    [item] = client.get("/transfers/", params={"job_id": job_id}).json()["results"]
    assert item["local_path"] == "../x"
    (tmp_path / "data" / "j" / "1").mkdir(parents=True)
    with pytest.raises(TransferError) as raised:
        item_transfer_paths(item, tmp_path / "data" / "j" / "1")
    assert str(raised.value) == "local_path '../x' must be relative and stay inside the job's workdir"
    assert raised.value.retryable is False
