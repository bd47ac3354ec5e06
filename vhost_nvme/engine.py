"""`python -m vhost_nvme.engine`: serve one vhost-nvme controller on a Unix socket."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from .controller import POLICIES, Controller, EngineError
from .namespace import NamespaceError, null_namespace, open_namespace
from .server import EngineServer

SIZE_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    t = text.strip().lower()
    mult = SIZE_SUFFIX.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in SIZE_SUFFIX else t
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 512M, 1G)")
    return int(digits) * mult


def parse_ns(spec: str) -> dict[str, object]:
    """PATH[,ro][,lba=4096][,iops=N][,bps=N] or null:SIZE[,lba=N]"""
    head, *opts = spec.split(",")
    out: dict[str, object] = {"path": head, "ro": False, "lba": 0, "iops": 0, "bps": 0}
    for opt in opts:
        key, _, val = opt.partition("=")
        if key == "ro" and not val:
            out["ro"] = True
        elif key in ("lba", "iops", "bps") and val:
            out[key] = parse_size(val)
        else:
            raise argparse.ArgumentTypeError(f"unknown namespace option {opt!r} in {spec!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vhost_nvme.engine", description=__doc__)
    ap.add_argument("--socket", required=True, help="Unix socket path the front-end connects to")
    ap.add_argument("--ns", action="append", default=[], type=parse_ns, metavar="SPEC",
                    help="PATH[,ro][,lba=4096][,iops=N][,bps=N] or null:SIZE (repeatable; NSIDs 1..)")
    ap.add_argument("--workers", type=int, default=1, help="data-plane threads (default 1)")
    ap.add_argument("--poll-us", type=int, default=1000,
                    help="cap of the busy-poll window before sleeping, which adapts to the guest's submission "
                         "gaps (default 1000)")
    ap.add_argument("--poll-fixed", action="store_true",
                    help="always busy-poll exactly --poll-us before sleeping (no adaptation)")
    ap.add_argument("--policy", choices=sorted(POLICIES), default="auto",
                    help="submission path: auto (measured at attach), psync or uring")
    ap.add_argument("--no-dbbuf", action="store_true",
                    help="do not advertise Doorbell Buffer Config (shadow doorbells): every doorbell traps")
    ap.add_argument("--name", default="vn0", help="controller name (serial number and NQN derive from it)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        ctrl = Controller(args.name, workers=args.workers, poll_us=args.poll_us, policy=args.policy,
                          dbbuf=not args.no_dbbuf, poll_adaptive=not args.poll_fixed)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        for nsid, ns in enumerate(args.ns, start=1):
            path = str(ns["path"])
            if path.startswith("null:"):
                obj = null_namespace(nsid, parse_size(path[5:]), int(ns["lba"]) or 4096)  # type: ignore[arg-type]
            else:
                obj = open_namespace(nsid, path, bool(ns["ro"]), int(ns["lba"]))  # type: ignore[arg-type]
            obj.iops_limit, obj.bps_limit = int(ns["iops"]), int(ns["bps"])  # type: ignore[arg-type]
            ctrl.attach_namespace(obj)
            if nsid in ctrl.probes:
                pr = ctrl.probes[nsid]
                print(f"probe nsid={nsid} psync={pr['psync_iops']:.0f} uring_qd1={pr['uring_iops_qd1']:.0f} "
                      f"uring_qd32={pr['uring_iops_qd32']:.0f} uring_min_batch={pr['uring_min_batch']:.0f}",
                      flush=True)
        server = EngineServer(args.socket, ctrl)
    except (EngineError, NamespaceError, OSError, argparse.ArgumentTypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        ctrl.close()
        return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    server.serve_in_thread()
    print(f"ready {args.socket}", flush=True)
    done.wait()
    server.close()
    ctrl.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
