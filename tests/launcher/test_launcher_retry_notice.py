"""The launcher's notice of a server that does not answer (``_RetryNotice``): a call's first failure
is one WARNING naming the server and the retry budget, its later retries INFO. A first retry that
waits for the server's ``Retry-After`` (503, 429) is longer than the client's first backoff: it was
taken for a later retry by its delay, demoted to INFO, and no WARNING was ever printed."""

from __future__ import annotations

import http.server
import logging
import threading

import pytest

from balsam.cli.launcher import _RetryNotice
from balsam.client import RESTClient, rest


class _BusyOnce(http.server.BaseHTTPRequestHandler):
    """503 with Retry-After: 1 (longer than the client's first backoff, 0.5 s) twice, then 200."""

    answered = 0

    def do_GET(self) -> None:
        type(self).answered += 1
        if type(self).answered <= 2:
            self.send_response(503)
            self.send_header("Retry-After", "1")
            body = b'{"detail": "busy"}'
        else:
            self.send_response(200)
            body = b"{}"
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def busy_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BusyOnce)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def notice():
    notice = _RetryNotice()
    rest.logger.addFilter(notice)
    yield notice
    rest.logger.removeFilter(notice)


def test_first_retry_after_a_retry_after_wait_is_the_warning(busy_server, notice, caplog) -> None:
    caplog.set_level(logging.INFO, logger=rest.logger.name)
    RESTClient(busy_server, "tok", retry_count=3).get("/jobs/")
    retries = [r for r in caplog.records if r.name == rest.logger.name and "retrying" in r.getMessage()]
    assert [r.levelno for r in retries] == [logging.WARNING, logging.INFO]
    assert "HTTP 503 from the Balsam server at" in retries[0].getMessage()


def test_record_without_an_attempt_number_is_read_by_its_delay(notice) -> None:
    def record(delay: float) -> logging.LogRecord:
        return logging.LogRecord(rest.logger.name, logging.WARNING, __file__, 1, "%s %s: HTTP %d; retrying in %.1f s",
                                 ("GET", "/jobs/", 503, delay), None)

    first, later = record(0.5), record(4.0)
    assert notice.filter(first) and notice.filter(later)
    assert first.levelno == logging.WARNING and "retrying up to" in first.getMessage()
    assert later.levelno == logging.INFO


def test_a_retry_after_answer_names_the_retries_it_really_gets(notice) -> None:
    # A Retry-After (a database outage's 503) is retried within the backoff's time budget, more often
    # than retry_count (30 waits of 5 s for 10): the first warning said "up to 10 times".
    record = logging.LogRecord(rest.logger.name, logging.WARNING, __file__, 1, "%s %s: HTTP %d; retrying in %.1f s",
                               ("POST", "/sessions/", 503, 5.2), None)
    record.attempt, record.retries, record.retry_after_waits = 1, 10, 30
    assert notice.filter(record)
    assert record.levelno == logging.WARNING and "retrying up to 30 times over up to about" in record.getMessage()
