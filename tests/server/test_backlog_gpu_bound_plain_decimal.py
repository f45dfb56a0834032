"""``GET /sites/{id}/backlog?max_gpus_per_node=``: a plain decimal number, as the route's integer
parameters are read (``http.int_from_text``: ASCII digits, no sign, no spaces). ``float()`` took
``1_0``, `` 2 ``, ``+1``, ``-0``, ``1e0`` and other scripts' digits (``١``), where
``max_nodes_per_job=1_0`` of the same route is refused; and a value that was only too long was
refused as "expected a number between 0 and 1e9"."""

from __future__ import annotations

from server_testlib import runnable

ODD = ["1_0", " 2 ", "+1", "\u0661", "-0", "1e0", "0x1", "1.5.0", ".", "inf", "nan", "\uff11"]


def _get(api, site_id: int, raw: str):
    return api.http.request("GET", f"/sites/{site_id}/backlog", params={"state": ["PREPROCESSED"], "max_gpus_per_node": raw})


def test_the_gpu_bound_takes_plain_decimals_only(api, site_app) -> None:
    site, app = site_app
    runnable(api, app["id"], 1, gpus_per_rank=1)
    for raw, expected in (("0", 0), ("0.5", 0), (".5", 0), ("1.", 1), ("1", 1), ("000002", 1), ("1000000000", 1)):
        answer = _get(api, site["id"], raw)
        assert answer.status_code == 200, (raw, answer.text)
        assert answer.json()["states"].get("PREPROCESSED", {}).get("count", 0) == expected, raw
    for raw in ODD:
        answer = _get(api, site["id"], raw)
        # Before: 200 for all but 0x1, 1.5.0, ., inf and nan ('-0' counting as 0).
        assert answer.status_code == 422, (raw, answer.text)
        [item] = answer.json()["detail"]
        assert item["loc"] == ["query", "max_gpus_per_node"] and "plain decimal" in item["msg"], (raw, item)
    answer = _get(api, site["id"], "1000000000.5")
    assert answer.status_code == 422 and "must be between 0 and 1e+09" in answer.text, answer.text
    # A number that is only too long is told so (before: "expected a number between 0 and 1e9").
    answer = _get(api, site["id"], "0." + "0" * 40)
    [item] = answer.json()["detail"]
    assert answer.status_code == 422 and item["msg"] == "at most 32 characters, got 42", answer.text
