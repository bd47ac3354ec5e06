"""nvmetd.toml is checked whole before any of it is used: a broken [vhost] table is refused with its field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvmetd.service import load_config


@pytest.mark.parametrize(("text", "error"), [
    ('[vhost]\nauto = "yes"\n', "vhost.auto"),
    ("[vhost]\nbogus = 1\n", "vhost.bogus"),
    ("[vhost]\npoll_us = 0\n", "vhost.poll_us"),
    ('[vhost]\nbackend = "kernal"\n', "vhost.backend"),
    ('vhost = "on"\n', "[vhost] must be a table"),
])
def test_bad_vhost_table_is_refused(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "nvmetd.toml").write_text(text)
    with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("]", r"\]")):
        load_config(tmp_path / "nvmetd.toml")


def test_example_config_in_packaging_loads() -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "packaging" / "nvmetd.toml")
    assert config["vhost"] == {"auto": False, "backend": "auto"} and config["ports"]["tcp_port"] == "4420"
