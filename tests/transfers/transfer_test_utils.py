"""What the tests of the ``transfers`` agent module share: an in-memory stand-in for the few routes of
balsam's API the module calls, so that those tests need no server."""

from __future__ import annotations

import json
from typing import Optional


class FakeAPI:
    """The routes the transfers module uses: GET /transfers/ (filtered by ``state`` and ``id``,
    ``ordering=state``, paged by ``offset``/``limit``), GET /jobs/ (by ``id``), PATCH /transfers/.

    Each GET answers deep copies, made as the wire makes them (JSON, ``transfer_info`` and its
    nested values included): what the module does to a row it read changes nothing here until it
    PATCHes it. The rows of each PATCH
    are counted in ``patched``."""

    def __init__(self, items: list[dict], jobs: list[dict]) -> None:
        self.items = {it["id"]: it for it in items}
        self.jobs = {j["id"]: j for j in jobs}
        self.patched: list[int] = []

    def get(self, path: str, params: Optional[dict] = None) -> dict:
        params = dict(params or {})
        if path == "/jobs/":
            rows = [dict(self.jobs[i]) for i in params.get("id", []) if i in self.jobs]
        else:
            assert path == "/transfers/", path
            rows = [json.loads(json.dumps(it)) for it in self.items.values()]  # as on the wire
            if "state" in params:
                rows = [r for r in rows if r["state"] in params["state"]]
            if "id" in params:
                rows = [r for r in rows if r["id"] in params["id"]]
            rows.sort(key=lambda r: (r["state"], r["id"]) if params.get("ordering") == "state" else r["id"])
        offset, limit = int(params.get("offset", 0)), params.get("limit")
        page = rows[offset:] if limit is None else rows[offset:offset + int(limit)]
        return {"count": len(rows), "results": page}

    def patch(self, path: str, json: list[dict]) -> list[dict]:
        assert path == "/transfers/", path
        self.patched.append(len(json))
        for update in json:
            self.items[update["id"]].update({k: v for k, v in update.items() if k != "id"})
        return json

    def states(self, alias: Optional[str] = None) -> dict[str, int]:
        """{state: how many items} of every item, or of those of location ``alias``."""
        counts: dict[str, int] = {}
        for item in self.items.values():
            if alias is None or item["location_alias"] == alias:
                counts[item["state"]] = counts.get(item["state"], 0) + 1
        return counts
