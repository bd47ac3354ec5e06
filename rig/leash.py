"""`leash.py PARENT_PID -- ARGV...`: run ARGV and take its whole process group down when the rig process dies.

The rig kills the VM's group on timeout and on every exit it lives to see, but a rig killed with SIGKILL (a CI
job cancelled, a helper's run killed by hand) runs no code: vng's child QEMU then ran its VM on to the end, once
82 minutes. This file is the group's leader, run by path with the standard library only: the kernel sends it
SIGTERM when its parent dies (PR_SET_PDEATHSIG), and it answers by SIGKILLing the group, QEMU included."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def kill_own_group(*_: object) -> None:
    os.killpg(0, signal.SIGKILL)  # this process too: nothing of the VM outlives the rig


def main(argv: list[str]) -> int:
    parent, sep, command = argv[0], argv[1], argv[2:]
    if sep != "--" or not command:
        print("usage: leash.py PARENT_PID -- ARGV...", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, kill_own_group)
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        print(f"leash: prctl failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 2
    if os.getppid() != int(parent):  # the rig died before the death signal was armed
        kill_own_group()
    status = subprocess.call(command)
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
