"""The CLI puts user names into URL paths: each must stay exactly one segment whatever it contains."""

from __future__ import annotations

from urllib.parse import unquote

import pytest

from nvmetd.cli import _api_path


@pytest.mark.parametrize("name", ["victim#x", "victim?force=1", "nothere/../victim", "..", ".", "a\nb", "a\tb",
                                  "vm2/disks/victim#", "%2e%2e", "x;y&z=+", "ünï", "a" * 300, "\x00"])
def test_a_name_is_one_segment_that_decodes_to_itself(name: str) -> None:
    raw = _api_path(("v1", "disks", name, "resize")).decode("ascii")
    segments = raw.split("/")
    assert segments[:3] == ["", "v1", "disks"] and segments[4] == "resize" and len(segments) == 5
    assert unquote(segments[3]) == name
    assert segments[3] not in (".", "..") and not set(segments[3]) & set("?#/\n\t\x00")
