"""An id option past its API column (``--id 99999999999999999999``; 64-bit job and scheduler ids,
32-bit BatchJob ids) is a usage error naming the option, before any request. It was
sent, and the server's answer named a query parameter the user never wrote (``query.id: integer
out of range``), after the command had read the sites; ``server set-start-time`` past 64 bits said
``OverflowError: Python int too large to convert to SQLite INTEGER``. (``server revoke --id`` answers
"no credential N" for any id it cannot hold: docs/security.md.)"""

from __future__ import annotations

from typing import Any

import pytest
from cli_test_utils import balsam, fresh_api_state, record_requests  # noqa: F401 (autouse)

BIG = str(10**20)
PAST_32 = str(2**31)
JOB_IDS = "job ids are 64-bit integers (-9223372036854775808 to 9223372036854775807)"
BATCH_JOB_IDS = "BatchJob ids are 32-bit integers (-2147483648 to 2147483647)"


@pytest.mark.parametrize(("args", "hint", "what"), [
    (["job", "ls", "--site", "all", "--id", BIG], "'--id'", JOB_IDS),
    (["job", "modify", "--site", "all", "-i", BIG, "-s", "FAILED", "-y"], "'-i' / '--id'", JOB_IDS),
    (["job", "rm", "--site", "all", "-i", BIG, "-y"], "'-i' / '--id'", JOB_IDS),
    (["job", "show", BIG], "'ID...'", JOB_IDS),
    (["job", "create", "-w", "w", "-a", "Hello", "-pid", BIG, "-y"], "'-pid' / '--parent-id'", JOB_IDS),
    (["transfer", "ls", "--job", BIG], "'--job'", JOB_IDS),
    (["queue", "ls", "--scheduler-id", BIG], "'--scheduler-id'", "scheduler ids are 64-bit integers"),
    (["queue", "term", BIG], "'[SCHEDULER_ID]'", "scheduler ids are 64-bit integers"),
    (["queue", "term", "--id", PAST_32], "'--id'", BATCH_JOB_IDS),
    (["server", "set-start-time", PAST_32, "--clear"], "'BATCH_JOB_ID'", BATCH_JOB_IDS),
])
def test_an_id_past_its_column_is_a_usage_error_naming_the_option(balsam_env: Any, monkeypatch: pytest.MonkeyPatch,
                                                                  args: list[str], hint: str, what: str) -> None:
    sent = record_requests(monkeypatch)
    out = balsam(*args)
    assert out.exit_code == 2, out.output
    value = BIG if BIG in args else PAST_32
    assert f"Error: Invalid value for {hint}: {value}: {what}" in out.stderr, out.output
    assert sent == []


def test_the_largest_job_id_is_taken(balsam_env: Any) -> None:
    out = balsam("job", "ls", "--site", "all", "--id", str(2**63 - 1))
    assert out.exit_code == 0 and out.stderr.strip() == "No matching jobs.", out.output
