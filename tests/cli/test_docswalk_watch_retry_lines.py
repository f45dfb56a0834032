"""`job ls --watch` through a server outage prints one line per round it cannot draw, as docs/cli.md
says (docs walk: with the embedded server stopped, each round also printed the REST client's three
`GET /jobs/: LocalTransportError; retrying in N s` lines)."""

from __future__ import annotations

import logging
import socket

from cli_test_utils import balsam, fresh_api_state  # noqa: F401 (fresh_api_state: autouse)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_round_the_server_cannot_answer_is_one_line_without_the_clients_retry_lines(balsam_env, tmp_path,
                                                                                     monkeypatch, caplog):
    import balsam.cli.job as jobcli
    from balsam.api import Site
    from balsam.client import RESTClient

    path = tmp_path / "site-w"
    (path / "data").mkdir(parents=True)
    Site.objects.create(name="site-w", path=str(path))
    real = jobcli._list_jobs
    down = RESTClient(f"http://127.0.0.1:{_closed_port()}", "token", retry_count=1)  # a server that is gone
    calls = {"n": 0}

    def outage_in_round_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            down.get("/jobs/")  # real retries, real ServerUnavailable
        return real(*args, **kwargs)

    monkeypatch.setattr(jobcli, "_list_jobs", outage_in_round_two)
    with caplog.at_level(logging.WARNING, logger="balsam"):
        out = balsam("job", "ls", "--watch", "--interval", "0.1", "--rounds", "3", "--site", "all")
    assert out.exit_code == 0 and calls["n"] == 3, out.output
    assert out.output.count("API not answering") == 1, out.output
    assert not [r for r in caplog.records if "retrying in" in r.getMessage()], caplog.text
    # Outside the watch the client's retry lines are logged as before.
    caplog.clear()
    try:
        down.get("/jobs/")
    except Exception:
        pass
    assert [r for r in caplog.records if "retrying in" in r.getMessage()], caplog.text
