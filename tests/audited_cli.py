"""Run nvmetctl with a Python audit hook that records every file it opens, lists or changes under given roots.

How a test proves "the CLI never touched configfs or the store" without strace: CPython raises an audit event
for every open() / os.open(), os.listdir, os.scandir, os.mkdir, os.rmdir, os.symlink, os.remove and os.rename, in
this process and whatever it imports. Usage: python -m tests.audited_cli REPORT ROOT[:ROOT...] -- NVMETCTL-ARGS...
"""

from __future__ import annotations

import json
import os
import sys

EVENTS = ("open", "os.listdir", "os.scandir", "os.mkdir", "os.rmdir", "os.symlink", "os.remove", "os.rename",
          "os.chmod", "os.truncate")


def main() -> int:
    report, roots, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: REPORT ROOTS -- ARGS"
    watched = [os.path.realpath(r) for r in roots.split(":")]
    touched: list[list[str]] = []

    def hook(event: str, args: tuple) -> None:
        if event in EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            if any(path == r or path.startswith(r + os.sep) for r in watched):
                touched.append([event, path])

    sys.addaudithook(hook)
    from nvmetd.cli import main as nvmetctl

    code = nvmetctl(argv)
    with open(report, "w") as f:
        json.dump({"touched": touched, "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                                                         ("target", "backends", "pydantic", "fastapi", "httpx"))}, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
