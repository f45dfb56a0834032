"""elastic_queue sends the site's filter_tags to the backlog route (and its BatchJob reads) as the
API's KEY:VALUE tags, split at the first ':': a key holding one (``a:b: c``, read as tag ``a`` =
``"b:c"``) would size its BatchJobs by other jobs. With elastic_queue on, such a key is one settings
error naming the key and elastic_queue; with it off the file loads (the launchers' acquire sends
the tags as JSON: not affected)."""

from __future__ import annotations

from pathlib import Path

import pytest

from balsam.config.settings import SettingsError, load_settings


def test_elastic_queue_refuses_a_colon_filter_tag_key(tmp_path: Path) -> None:
    path = tmp_path / "settings.yml"
    path.write_text("filter_tags:\n  \"proj:exp\": \"1\"\n  workflow: w1\nelastic_queue:\n  submit_queue: local\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(path)
    assert str(caught.value) == (
        f"{path}:4 elastic_queue: filter_tags key 'proj:exp' holds ':', which elastic_queue cannot send "
        "(its backlog queries take KEY:VALUE tags, split at the first ':'): rename the key, or disable "
        "elastic_queue (elastic_queue: null)")
    path.write_text("filter_tags:\n  \"proj:exp\": \"1\"\nelastic_queue: null\n")
    assert load_settings(path).filter_tags == {"proj:exp": "1"}
    path.write_text("filter_tags:\n  proj: \"exp:1\"\nelastic_queue: {}\n")  # a ':' in a value is sent as it is
    assert load_settings(path).filter_tags == {"proj": "exp:1"}
