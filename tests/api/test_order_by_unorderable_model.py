"""`Site.objects.order_by("id")` said "(orderings: none, '-' for descending)": the '-' advice for a
model that takes no ordering at all. The error now says Site queries take none (they come in id
order), and a model with orderings still lists them."""

from __future__ import annotations

import pytest

from balsam._api.models import Job, Site


def test_a_model_without_orderings_says_so():
    with pytest.raises(ValueError) as info:
        Site.objects.order_by("id")
    assert "take no ordering" in str(info.value) and "'-' for descending" not in str(info.value)


def test_a_model_with_orderings_lists_them():
    with pytest.raises(ValueError, match=r"orderings: id, last_update, state, workdir, '-' for descending"):
        Job.objects.order_by("num_nodes")
