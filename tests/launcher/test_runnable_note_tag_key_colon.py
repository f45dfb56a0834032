"""The launcher's end-of-run note (runnable jobs it could never run) reads the site's runnable jobs
by its filter tags through the listing's KEY:VALUE filter, which cuts at the first ':'. A filter tag
key holding ':' (``queue submit -tag a:b=c``) would count and name the jobs tagged ``a=b:c``: the
note is given up instead (no request), while keys without ':' are sent as before."""
import pytest

from balsam.launcher.job_mode import runnable_jobs_page


class RecordingClient:
    def __init__(self):
        self.calls = []

    def get(self, path, params=None, retry_count=None):
        self.calls.append((path, params))
        return {"count": 1, "results": [{"id": 7}]}


def test_a_filter_tag_key_holding_a_colon_sends_no_listing():
    client = RecordingClient()
    with pytest.raises(ValueError, match="'a:b'"):
        runnable_jobs_page(client, 3, {"a:b": "c", "x": "y"})
    assert client.calls == []


def test_plain_filter_tags_are_sent_as_key_value_pairs():
    client = RecordingClient()
    rows, total = runnable_jobs_page(client, 3, {"x": "y:z"})
    assert (rows, total) == ([{"id": 7}], 1)
    [(path, params)] = client.calls
    assert path == "/jobs/" and params["tags"] == ["x:y:z"] and params["site_id"] == 3
