"""The default handle_timeout's RESTART_READY message.

RUN_TIMEOUT is what the launcher reports when its stop ended a run: its wall time, its idle
timeout, a stop signal, or the allocation's end (scancel, a requeue, a node failure, the
scheduler's wall time). The message said "timed out: re-queued ..." for all of them, which misled
users whose job had not run out of time. It now says it was re-queued, and the launcher's reason
where the caller has it, on one line.
"""

from __future__ import annotations

from pathlib import Path

from balsam.site.hooks_runner import default_update

BASE = "re-queued by the default handle_timeout (RESTART_READY)"


def _timeout_job() -> dict:
    return {"id": 7, "state": "RUN_TIMEOUT", "workdir": "w/7", "app_id": 1}


def test_the_message_does_not_say_timed_out_without_a_reason(tmp_path: Path) -> None:
    update = default_update(_timeout_job(), False, tmp_path)
    assert update["state"] == "RESTART_READY"
    message = update["state_data"]["message"]
    assert message.startswith(BASE) and "timed out" not in message
    assert "allocation" in message and "\n" not in message


def test_the_message_quotes_the_launchers_reason_on_one_line(tmp_path: Path) -> None:
    reason = "launcher stopped (signal 15); the job ended (exit code 0)\nas the launcher stopped: it runs again"
    update = default_update(_timeout_job(), False, tmp_path, timeout_reason=reason)
    message = update["state_data"]["message"]
    assert message == f"{BASE}: launcher stopped (signal 15); the job ended (exit code 0) as the launcher stopped: it runs again"


def test_a_long_reason_is_cut(tmp_path: Path) -> None:
    update = default_update(_timeout_job(), False, tmp_path, timeout_reason="node down " + "x" * 5000)
    message = update["state_data"]["message"]
    assert message.startswith(f"{BASE}: node down x") and message.endswith("...") and len(message) < 400
