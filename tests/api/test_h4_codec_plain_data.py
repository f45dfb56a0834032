"""Job parameters of plain data are pickled by the C pickler, to the very bytes dill writes for them
(so a Balsam 0.7 client, and every runner, reads them as before); anything else still goes to dill.
Pickling each job's parameters with dill was a third of building 100,000 jobs with
``App.submit(save=False)`` (120 us per small dict)."""

from __future__ import annotations

import base64
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
