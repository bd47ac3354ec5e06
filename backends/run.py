"""Running the storage tools: always an argv list, never a shell string, with the tool's own words on failure.

Secrets never travel on argv (it is world-readable in /proc): callers pass key *files*. The command line is still
quoted in errors, so nothing secret may be put on it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from backends.errors import BackendError, ToolError

_TIMEOUT = 600


def require(tool: str) -> str:
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise BackendError(f"{tool} is not installed: run `make setup` (scripts/setup installs it)")
    return found


def run(argv: Sequence[str], check: bool = True, input_bytes: bytes | None = None,
        timeout: float = _TIMEOUT) -> subprocess.CompletedProcess[str]:
    argv = [require(argv[0]), *argv[1:]]
    try:
        proc = subprocess.run(argv, capture_output=True, check=False, timeout=timeout,
                              input=input_bytes.decode("latin-1") if input_bytes is not None else None, text=True)
    except subprocess.TimeoutExpired:
        raise ToolError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        tail = " / ".join(line.strip() for line in detail[-3:]) or f"exit status {proc.returncode}"
        raise ToolError(f"{' '.join(str(a) for a in argv[:4])}{' ...' if len(argv) > 4 else ''} failed: {tail}")
    return proc


def out(argv: Sequence[str]) -> str:
    return run(argv).stdout
