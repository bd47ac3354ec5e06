"""`python -m rig [--memory 3G] [--cpus 2] [--timeout S] -- COMMAND...`: run COMMAND in the 6.12 rig VM."""

from __future__ import annotations

import argparse
import sys

from rig.vm import RigError, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rig", description=__doc__)
    parser.add_argument("--memory", default="3G", help="guest memory (qemu -m), default 3G")
    parser.add_argument("--cpus", type=int, default=2, help="guest vCPUs, default 2")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the VM is killed")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command to run inside the VM")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    try:
        return run(command, memory=args.memory, cpus=args.cpus, timeout=args.timeout)
    except RigError as exc:
        print(f"rig: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
