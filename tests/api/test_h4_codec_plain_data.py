"""Job parameters of plain data are pickled by the C pickler: they load to the same value as dill's
payload (so a Balsam 0.7 client, and every runner, reads them as before), in the same bytes except
for a few container sizes (dill's pure-Python pickler batches 1,000 items otherwise: see
``codec._PlainDataPickler``); anything else still goes to dill.
Pickling each job's parameters with dill was a third of building 100,000 jobs with
``App.submit(save=False)`` (120 us per small dict)."""

from __future__ import annotations

import base64
import pickle
from typing import Any

import dill
import pytest

from balsam._api import codec


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


PLAIN = [
    {"x": 5, "cfg": {"lr": 0.5, "layers": [1, 2, 3], "name": "resnet"}},
    {"text": "é\u2028", "raw": b"\x00\xff", "nested": (1, (2, [3])), "set": {1, 2}, "frozen": frozenset({3}),
     "none": None, "flag": True, "big": 10**40, "negative": -1, "nan": float("nan")},
    {}, [], "", 0,
]
OTHER = [{"point": Point(3)}, {"fn": lambda v: v + 1}, {"type": int}]


@pytest.mark.parametrize("value", PLAIN + OTHER, ids=lambda v: repr(v)[:30])
def test_payloads_are_dills_bytes(value: Any) -> None:
    assert codec.serialize(value) == base64.b64encode(dill.dumps(value, recurse=True)).decode()


def test_plain_data_never_goes_through_dill(monkeypatch: pytest.MonkeyPatch) -> None:
    used = []
    real = codec._dill

    def watched() -> Any:
        used.append(True)
        return real()

    monkeypatch.setattr(codec, "_dill", watched)
    for value in PLAIN:
        payload = codec.serialize(value)
        assert codec.serialize(codec.deserialize(payload)) == payload  # (NaN != NaN: compared as payloads)
    assert used == []
    point = codec.deserialize(codec.serialize({"point": Point(3)}))["point"]
    assert point.x == 3 and used  # an instance: dill's
    recursive: dict = {}
    recursive["self"] = recursive
    assert codec.deserialize(codec.serialize(recursive))["self"] is not None


def _sized(kind: str, n: int) -> Any:
    return {"dict": lambda: {i: i for i in range(n)}, "list": lambda: list(range(n)), "set": lambda: set(range(n)),
            "frozenset": lambda: frozenset(range(n)), "tuple": lambda: tuple(range(n)),
            "nested": lambda: {"x": [str(i) for i in range(n)]}}[kind]()


#: The sizes at which the bytes differ from dill's (documented in docs/api.md): 1 or 2 bytes of
#: batching; the loaded values are the same.
_NOT_DILLS_BYTES = {("dict", 1000), ("dict", 1001), ("dict", 2000), ("dict", 2001), ("list", 1001), ("list", 2001),
                    ("set", 1000), ("set", 2000), ("nested", 1001), ("nested", 2001)}


@pytest.mark.parametrize("kind", ["dict", "list", "set", "frozenset", "tuple", "nested"])
def test_containers_at_the_batch_sizes_load_to_dills_value(kind: str) -> None:
    """Always the same value as dill's payload, by every unpickler; the same bytes but at the sizes
    docs/api.md names."""
    differ = set()
    for n in (0, 1, 2, 999, 1000, 1001, 1002, 1999, 2000, 2001, 2002):
        value = _sized(kind, n)
        payload = codec.serialize(value)
        dills = dill.dumps(value, recurse=True)
        raw = base64.b64decode(payload)
        assert codec.deserialize(payload) == dill.loads(raw) == pickle.loads(raw) == pickle.loads(dills) == value
        if raw != dills:
            differ.add((kind, n))
            assert abs(len(raw) - len(dills)) <= 2
    assert differ == {case for case in _NOT_DILLS_BYTES if case[0] == kind}
