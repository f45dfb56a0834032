"""BulkStatusUpdater's ``on_refused``: a refused update may be replaced, once per job."""

from __future__ import annotations

from typing import Any

from balsam.client.status_updater import BulkStatusUpdater


class _Refused(Exception):
    status_code = 422


def test_a_refused_update_is_replaced_once_and_flush_waits_for_the_replacement() -> None:
    calls: list[list[dict[str, Any]]] = []

    def send(chunk: list[dict[str, Any]]) -> None:
        calls.append([dict(u) for u in chunk])
        if any(u.get("bad") for u in chunk):
            raise _Refused("num_nodes: must be >= 1")

    seen: list[tuple[int, str]] = []

    def on_refused(update: dict[str, Any], error: BaseException) -> dict[str, Any]:
        seen.append((update["id"], str(error)))
        return {"id": update["id"], "state": "FAILED", "bad": update["id"] == 2}  # job 2's replacement is refused too

    updater = BulkStatusUpdater(send=send, max_wait_sec=0.01, on_refused=on_refused)
    updater.put_update({"id": 1, "state": "PREPROCESSED", "bad": True})
    updater.put_update({"id": 2, "state": "PREPROCESSED", "bad": True})
    updater.put_update({"id": 3, "state": "PREPROCESSED"})
    assert updater.flush(10)
    updater.close()
    sent = [u for call in calls for u in call if not u.get("bad")]
    assert {(u["id"], u["state"]) for u in sent} >= {(1, "FAILED"), (3, "PREPROCESSED")}
    # Job 2's replacement was refused in its turn: dropped, not replaced again.
    assert seen == [(1, "num_nodes: must be >= 1"), (2, "num_nodes: must be >= 1")]
    assert [u["id"] for u, _ in updater.dropped] == [1, 2, 2]
    assert updater.pending == 0  # the replacements were counted as puts and as sent


def test_a_422_naming_items_by_place_costs_one_call_per_invalid_item() -> None:
    """The server stops at the first invalid item of a PATCH and names its place (``loc: ["body",
    i, field]``): the updater refuses that item with its own error and resends the others at once.
    Halving cost about 2k log2(n/k) calls for k invalid items among n."""
    from balsam.client.rest import APIError

    calls: list[int] = []

    def server(chunk: list[dict[str, Any]]) -> None:
        calls.append(len(chunk))
        for index, update in enumerate(chunk):
            if update.get("num_nodes") == 0:
                raise APIError("PATCH", "http://api/jobs/", 422,
                               [{"loc": ["body", index, "num_nodes"], "msg": "must be >= 1, got 0", "type": "value_error"}])

    updates = [{"id": i, "state": "RUN_DONE", **({"num_nodes": 0} if i in (17, 400, 999) else {})} for i in range(1000)]
    updater = BulkStatusUpdater(send=server, max_wait_sec=0.01)
    updater.put_updates(updates)
    assert updater.flush(10)
    updater.close()
    assert len(calls) == 4  # 3 invalid items: 3 refusals, then the 997 others in one call
    assert sorted(u["id"] for u, _ in updater.dropped) == [17, 400, 999]
    assert updater.sent == 997
    # Each refused item carries its own error, as if it had been sent alone.
    assert {reason for _, reason in updater.dropped} == {"PATCH http://api/jobs/ failed with HTTP 422: 0.num_nodes: must be >= 1, got 0"}


def test_a_job_refused_again_later_gets_a_replacement_again() -> None:
    """The replacement was once per job id for the updater's life (the agent's): a re-run job whose
    hook left a bad value again stayed leased, never processed again."""
    def send(chunk: list[dict[str, Any]]) -> None:
        if any(u.get("bad") for u in chunk):
            raise _Refused("bad value")

    replaced: list[str] = []

    def on_refused(update: dict[str, Any], error: BaseException) -> dict[str, Any]:
        replaced.append(update["state"])
        return {"id": update["id"], "state": "FAILED"}

    updater = BulkStatusUpdater(send=send, max_wait_sec=0.01, on_refused=on_refused)
    updater.put_update({"id": 7, "state": "PREPROCESSED", "bad": True})
    assert updater.flush(10)
    updater.put_update({"id": 7, "state": "POSTPROCESSED", "bad": True})  # the re-run's hook
    assert updater.flush(10)
    updater.close()
    assert replaced == ["PREPROCESSED", "POSTPROCESSED"]


def test_every_try_of_one_patch_carries_the_same_idempotency_key(monkeypatch) -> None:
    """A try the server applied whose answer was lost, sent again under a new key, was applied again."""
    from balsam.client.rest import RESTClient

    keys: list[Any] = []

    class LostAnswer(Exception):
        pass

    def patch(self, path, json=None, params=None, **kw):  # noqa: A002 - the client's own signature
        keys.append(kw.get("idempotency_key"))
        if len(keys) == 1:
            raise LostAnswer("read timeout")  # not a refusal: the updater retries

    monkeypatch.setattr(RESTClient, "patch", patch)
    client = RESTClient("http://127.0.0.1:9")
    updater = BulkStatusUpdater(client, max_wait_sec=0.01)
    updater.put_update({"id": 1, "state": "RUNNING"})
    assert updater.flush(10)
    updater.close()
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1]
