"""`python -m backends ...`: the volume layer by hand, for operators and scripts. Output is JSON; a refused or failed
operation prints one line saying why and exits 1, or 3 when the storage system itself cannot be used (never a
traceback)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from backends import names
from backends.errors import BackendError, UnavailableError
from backends.pools import create_pool, destroy_pool, list_pools, open_pool


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backends", description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, help="state directory (default /var/lib/nvmetd/backends)")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("pool-create", help="create a pool")
    c.add_argument("kind", choices=["file", "lvm", "zfs", "nullblk", "rbd"])
    c.add_argument("pool")
    c.add_argument("devices", nargs="*", help="block devices (lvm, zfs) or one directory (file)")
    c.add_argument("--fill-threshold", type=float, default=90.0)
    c.add_argument("--capacity", help="file/nullblk: budget in bytes (e.g. 10G)")
    c.add_argument("--thin-pool-percent", type=int, help="lvm: share of the VG for the thin pool")
    for opt, text in (("--conf", "the cluster's ceph.conf"), ("--keyring", "client keyring, 0600"),
                      ("--user", "cephx user (default admin)"), ("--ceph-pool", "Ceph pool to create"),
                      ("--failure-domain", "CRUSH type holding each copy (default host)"),
                      ("--pool-compression", "BlueStore compression of the Ceph pool")):
        c.add_argument(opt, help=f"rbd: {text}")
    for opt in ("--size", "--min-size", "--pg-num"):
        c.add_argument(opt, type=int, help="rbd: copies (default 3), copies needed for I/O (default 1), PGs")
    c.add_argument("--connect-timeout", type=int, help="rbd: seconds to reach a monitor before a command gives up "
                   "(default 60)")
    for name in ("pool-destroy", "pool-status", "recover", "list"):
        s = sub.add_parser(name)
        s.add_argument("pool")
        if name == "pool-destroy":
            s.add_argument("--force", action="store_true", help="also destroy its volumes")
    sub.add_parser("pools")

    v = sub.add_parser("create", help="create a volume")
    v.add_argument("pool")
    v.add_argument("name")
    v.add_argument("size", help="bytes or 512M, 10G, ...")
    v.add_argument("--tenant", default="default")
    v.add_argument("--thick", action="store_true")
    v.add_argument("--encrypt", action="store_true")
    v.add_argument("--compression", default="off")
    v.add_argument("--volblocksize", help="zfs: 4K..128K")
    for name in ("delete", "attach", "detach", "info"):
        s = sub.add_parser(name)
        s.add_argument("pool")
        s.add_argument("name")
    g = sub.add_parser("grow")
    g.add_argument("pool")
    g.add_argument("name")
    g.add_argument("size")
    g.add_argument("--force", action="store_true", help="allow shrinking (cuts data off the end)")
    for name in ("snapshot", "delete-snapshot"):
        s = sub.add_parser(name)
        s.add_argument("pool")
        s.add_argument("name")
        s.add_argument("snapshot")
    k = sub.add_parser("clone")
    k.add_argument("pool")
    k.add_argument("name")
    k.add_argument("snapshot")
    k.add_argument("new_name")
    k.add_argument("--tenant")
    q = sub.add_parser("quota", help="set a tenant's quota on a pool")
    q.add_argument("pool")
    q.add_argument("tenant")
    q.add_argument("--max-bytes")
    q.add_argument("--max-disks", type=int)
    return p


def run(args: argparse.Namespace) -> Any:
    root = args.root
    if args.cmd == "pools":
        return list_pools(root)
    if args.cmd == "pool-create":
        opts: dict[str, Any] = {}
        if args.capacity:
            opts["capacity"] = names.size(args.capacity, "capacity")
        if args.thin_pool_percent:
            opts["thin_pool_percent"] = args.thin_pool_percent
        rbd = {"conf": args.conf, "keyring": args.keyring, "user": args.user, "ceph_pool": args.ceph_pool,
               "failure_domain": args.failure_domain, "compression": args.pool_compression, "size": args.size,
               "min_size": args.min_size, "pg_num": args.pg_num, "connect_timeout": args.connect_timeout}
        opts.update({k: v for k, v in rbd.items() if v is not None})
        return create_pool(args.kind, args.pool, args.devices, root=root, fill_threshold=args.fill_threshold,
                           **opts).status().to_dict()
    if args.cmd == "pool-destroy":
        destroy_pool(args.pool, root=root, force=args.force)
        return {"destroyed": args.pool}
    pool = open_pool(args.pool, root)
    if args.cmd == "pool-status":
        return pool.status().to_dict()
    if args.cmd == "recover":
        return pool.recover()
    if args.cmd == "list":
        return [v.to_dict() for v in pool.list()]
    if args.cmd == "create":
        opts = {"volblocksize": args.volblocksize} if args.volblocksize else {}
        return pool.create(args.name, args.size, tenant=args.tenant, thin=not args.thick, encrypted=args.encrypt,
                           compression=args.compression, **opts).to_dict()
    if args.cmd == "delete":
        pool.delete(args.name)
        return {"deleted": args.name}
    if args.cmd == "attach":
        return {"device_path": pool.attach(args.name)}
    if args.cmd == "detach":
        pool.detach(args.name)
        return {"detached": args.name}
    if args.cmd == "info":
        return pool.info(args.name).to_dict()
    if args.cmd == "grow":
        return pool.grow(args.name, args.size, force=args.force).to_dict()
    if args.cmd == "snapshot":
        pool.snapshot(args.name, args.snapshot)
        return pool.info(args.name).to_dict()
    if args.cmd == "delete-snapshot":
        pool.delete_snapshot(args.name, args.snapshot)
        return pool.info(args.name).to_dict()
    if args.cmd == "clone":
        return pool.clone(args.name, args.snapshot, args.new_name, tenant=args.tenant).to_dict()
    if args.cmd == "quota":
        pool.set_quota(args.tenant, args.max_bytes, args.max_disks)
        return pool.status().tenants.get(args.tenant)
    raise BackendError(f"unknown command {args.cmd}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = run(args)
    except UnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"error: {exc.strerror}: {exc.filename} (volume operations need root)", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0
