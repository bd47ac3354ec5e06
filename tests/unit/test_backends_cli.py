"""The CLI turns refusals into one clear line and exit status 1, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "backends", "--root", str(root), *args], capture_output=True,
                          text=True, check=False)


def test_cli_round_trip_and_clear_errors(tmp_path: Path) -> None:
    root = tmp_path / "state"
    assert cli(root, "pool-create", "file", "p", str(tmp_path / "files")).returncode == 0
    made = cli(root, "create", "p", "vm1-disk", "8M", "--tenant", "acme")
    assert made.returncode == 0 and json.loads(made.stdout)["logical_bytes"] == 8 << 20

    bad = cli(root, "create", "p", "../../etc/passwd", "8M")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: volume name '../../etc/passwd' may only use")

    assert cli(root, "quota", "p", "acme", "--max-disks", "1").returncode == 0
    over = cli(root, "create", "p", "vm1-disk2", "8M", "--tenant", "acme")
    assert over.returncode == 1 and "quota of 1 disks" in over.stderr and "Traceback" not in over.stderr

    shrink = cli(root, "grow", "p", "vm1-disk", "4M")
    assert shrink.returncode == 1 and "use force to shrink" in shrink.stderr
    missing = cli(root, "info", "p", "nope")
    assert missing.returncode == 1 and "has no volume 'nope'" in missing.stderr
    listed = json.loads(cli(root, "list", "p").stdout)
    assert [v["name"] for v in listed] == ["vm1-disk"]
