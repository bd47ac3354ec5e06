"""A real one-host Ceph cluster for the RBD tests: 1 mon, 1 mgr, 3 BlueStore OSDs on sparse files, cephx on,
loopback only, failure domain OSD (`osd crush chooseleaf type = 0`, as nixpkgs' ceph-single-node test deploys it).

Started by hand from the Debian packages (no cephadm, no systemd): every daemon runs in the foreground as our child,
so a test can stop and restart single OSDs by their pid. BlueStore, not memstore: a stopped memstore OSD loses its
store, so it could neither come back with its data nor be corrupted and repaired with ceph-objectstore-tool.
Memory is kept small for a 3 GiB rig VM (cache autotune off, small caches, one op shard).

The harness asks the cluster through one in-process librados connection (`command`), not the `ceph` CLI: under TCG
each CLI call is a Python start-up plus a cephx handshake, seconds of CPU taken from the daemons it waits for, and
the waits poll.

`python -m tests.kernel.ceph_cluster DIR` starts one and waits for a signal (for benchmarks and by-hand checks).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from backends.ceph_session import binding
from backends.errors import UnavailableError

OSDS = 3
MON_ADDR = "127.0.0.1"
MGR_MODULES = Path("/usr/share/ceph/mgr")


class CommandError(Exception):
    """A monitor or manager command failed (or the connection did)."""


def _rados() -> Any:
    try:
        return binding("rados")
    except UnavailableError as exc:
        raise CommandError(str(exc)) from None


CONF = """[global]
fsid = {fsid}
mon_host = v2:{mon}:3300,v1:{mon}:6789
public_addr = {mon}
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
pid_file = {d}/run/$name.pid
log_file = {d}/log/$name.log
mon_data = {d}/mon/$id
mgr_data = {d}/mgr/$id
osd_data = {d}/osd/$id
keyring = {d}/keys/$name.keyring
osd_crush_chooseleaf_type = 0
osd_pool_default_size = 3
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_delete = true
paxos_propose_interval = 0.1
paxos_min_wait = 0.01
mon_warn_on_pool_no_redundancy = false
mon_osd_min_down_reporters = 1
mon_osd_down_out_interval = 0
osd_heartbeat_interval = 2
osd_heartbeat_grace = 8
mon_osd_adjust_heartbeat_grace = false
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = 1073741824
bdev_enable_discard = true
bdev_async_discard = true
bluestore_fsck_on_mkfs = false
bluestore_fsck_on_mount = false
bluestore_cache_autotune = false
bluestore_cache_size = 33554432
osd_memory_target = 402653184
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
osd_recovery_sleep = 0
osd_scrub_auto_repair = false
osd_scrub_min_interval = 1000000
osd_scrub_max_interval = 2000000
osd_deep_scrub_interval = 2000000
osd_scrub_during_recovery = true
osd_max_scrubs = 3
mgr_stats_period = 1
mgr_module_path = {d}/mgr-modules
mon_pg_warn_min_per_osd = 0
mon_data_avail_warn = 1
auth_allow_insecure_global_id_reclaim = false
debug_ms = 0
"""
"""`mon_osd_down_out_interval = 0`: a stopped OSD stays `in` (its PGs go degraded, not remapped), which is the
outage the tests model; long scrub intervals: scrubs only when a test asks for one. `bdev_enable_discard`: BlueStore
discards the extents it frees (off by default), without which a deleted image's objects stay on the OSDs' devices
(in the rig ~99% of a deleted image's blocks did); async, so a delete does not wait for the device."""


class Cluster:
    """The daemons and files of one test cluster under `base`; `admin` argv prefix for the `ceph`/`rbd` CLIs."""

    def __init__(self, base: Path, block_devices: list[str] | None = None) -> None:
        """`block_devices`: one per OSD (loop devices in the rig: BlueStore opens its block with O_DIRECT, which
        tmpfs refuses); without them each OSD makes a sparse file in its data directory."""
        self.base = Path(base)
        self.block_devices = block_devices or []
        self.conf = self.base / "ceph.conf"
        self.keyring = self.base / "keys" / "client.admin.keyring"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.phases: dict[str, float] = {}  # seconds from the start to each step, printed by the test fixture
        self.started_in = 0.0
        self._conn: Any = None

    # ------------------------------------------------------------------ helpers
    def ceph(self, *args: str, timeout: float = 120) -> str:
        return subprocess.run(["ceph", "-c", str(self.conf), "--connect-timeout", "30", *args], check=True,
                              capture_output=True, text=True, timeout=timeout).stdout

    def command(self, prefix: str, **args: Any) -> Any:
        """A monitor command (`pg ...`: a manager command) as JSON, over the harness's librados connection."""
        if self._conn is None:
            rados = _rados()
            conn = rados.Rados(conffile=str(self.conf), rados_id="admin",
                              conf={"keyring": str(self.keyring), "admin_socket": ""})  # the CLIs use client.admin's
            try:
                conn.connect(timeout=60)
            except rados.Error as exc:
                raise CommandError(f"cannot connect to the test cluster: {exc}") from None
            self._conn = conn
        call = self._conn.mgr_command if prefix.startswith("pg ") else self._conn.mon_command
        try:
            ret, out, err = call(json.dumps({"prefix": prefix, "format": "json", **args}), b"", timeout=60)
        except Exception as exc:  # rados.Error (a timeout, a lost session): the caller's wait retries
            raise CommandError(f"{prefix}: {exc}") from None
        if ret != 0:
            raise CommandError(f"{prefix}: {err} (error {ret})")
        return json.loads(out) if out else None

    def _tool(self, *argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=300)

    def _daemon(self, name: str, argv: list[str]) -> None:
        log = open(self.base / "log" / f"{name}.out", "ab")  # noqa: SIM115 (lives as long as the daemon)
        self.procs[name] = subprocess.Popen([*argv, "-f", "-c", str(self.conf)], stdout=log, stderr=log,
                                            start_new_session=True)

    # ------------------------------------------------------------------ start-up
    def _key(self, name: str, *caps: str) -> Path:
        path = self.base / "keys" / f"{name}.keyring"
        argv = ["ceph-authtool", "--create-keyring", str(path), "--gen-key", "-n", name]
        for i in range(0, len(caps), 2):
            argv += ["--cap", caps[i], caps[i + 1]]
        self._tool(*argv)
        os.chmod(path, 0o600)
        return path

    def start(self) -> Cluster:
        """Every key is made offline and handed to the monitor at its mkfs, and the OSDs' mkfs runs while the
        monitor starts: under emulation each `ceph` CLI call costs seconds, so start-up makes as few as it can."""
        t0 = time.monotonic()
        for sub in ("run", "log", "mon", "mgr/x", "osd", "keys", "mgr-modules"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.base / "keys", 0o700)
        fsid = str(uuid.uuid4())
        self.conf.write_text(CONF.format(fsid=fsid, mon=MON_ADDR, d=self.base))
        mon_kr = self._key("mon.", "mon", "allow *")
        keyrings = [self._key("client.admin", "mon", "allow *", "osd", "allow *", "mgr", "allow *", "mds", "allow *"),
                    self._key("mgr.x", "mon", "allow profile mgr", "osd", "allow *", "mds", "allow *")]
        keyrings += [self._key(f"osd.{i}", "mon", "allow profile osd", "mgr", "allow profile osd", "osd", "allow *")
                     for i in range(OSDS)]
        for keyring in keyrings:
            self._tool("ceph-authtool", str(mon_kr), "--import-keyring", str(keyring))
        osd_uuids = [str(uuid.uuid4()) for _ in range(OSDS)]
        mkfs = []
        for osd_id, osd_uuid in enumerate(osd_uuids):
            (self.base / "osd" / str(osd_id)).mkdir(exist_ok=True)
            if self.block_devices:  # BlueStore's default block path (`<osd_data>/block`), as ceph-volume links it
                (self.base / "osd" / str(osd_id) / "block").symlink_to(self.block_devices[osd_id])
            mkfs.append(subprocess.Popen(
                ["ceph-osd", "-c", str(self.conf), "-i", str(osd_id), "--mkfs", "--no-mon-config",
                 "--osd-uuid", osd_uuid], stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        monmap = self.base / "monmap"
        self._tool("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                   f"[v2:{MON_ADDR}:3300,v1:{MON_ADDR}:6789]", str(monmap))
        self._tool("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(monmap),
                   "--keyring", str(mon_kr))
        self._daemon("mon.a", ["ceph-mon", "-i", "a"])
        # the manager's C++ core collects the PG and pool statistics the tests read; its Python modules only cost
        # minutes of start-up under emulation, so it gets a module directory holding just the runtime's helpers
        for helper in ("mgr_module.py", "mgr_util.py"):
            (self.base / "mgr-modules" / helper).symlink_to(MGR_MODULES / helper)
        self._daemon("mgr.x", ["ceph-mgr", "-i", "x"])
        # one `ceph` process for the three OSD ids (it runs the commands it reads on stdin)
        self._wait(lambda: subprocess.run(
            ["ceph", "-c", str(self.conf), "--connect-timeout", "30"], check=True, capture_output=True, timeout=300,
            input="".join(f"osd new {u} {i}\n" for i, u in enumerate(osd_uuids)).encode()) is not None,
            "the monitor to register the OSDs", 300)
        self.phases["mon up, OSDs registered"] = time.monotonic() - t0
        for osd_id, proc in enumerate(mkfs):
            output, _ = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"ceph-osd --mkfs of osd.{osd_id} failed: {output.decode()[-500:]}")
            self.start_osd(osd_id)
        self.phases["OSD mkfs done"] = time.monotonic() - t0
        self.wait_osds_up(OSDS)
        self.phases["OSDs up"] = time.monotonic() - t0
        self._wait(lambda: self.command("mgr stat").get("available"), "the manager to be available", 300)
        self.started_in = time.monotonic() - t0
        self.phases["manager available"] = self.started_in
        return self

    def start_osd(self, osd_id: int) -> None:
        self._daemon(f"osd.{osd_id}", ["ceph-osd", "-i", str(osd_id)])

    def stop_osd(self, osd_id: int) -> None:
        """SIGTERM: the OSD tells the monitor it is going down, so its peers do not wait for heartbeats to fail."""
        proc = self.procs.pop(f"osd.{osd_id}")
        proc.terminate()
        proc.wait(timeout=120)

    def osd_data(self, osd_id: int) -> Path:
        return self.base / "osd" / str(osd_id)

    def osds_up(self) -> int:
        return int(self.command("osd stat")["num_up_osds"])

    def wait_osds_up(self, count: int, timeout: float = 600) -> None:
        self._wait(lambda: self.osds_up() == count, f"{count} OSDs up", timeout)

    def pg_states(self) -> dict[str, int]:
        summary = self.command("pg stat")
        pg_summary = summary.get("pg_summary", summary)
        return {s["name"]: int(s["num"]) for s in pg_summary.get("num_pg_by_state", [])}

    def wait_clean(self, timeout: float = 600) -> float:
        """Wait until every PG is active+clean; return the seconds it took."""
        t0 = time.monotonic()

        def clean() -> bool:
            states = self.pg_states()
            return bool(states) and set(states) == {"active+clean"}

        self._wait(clean, "all placement groups active+clean", timeout)
        return time.monotonic() - t0

    def wait_pgs(self, ready: Any, what: str, timeout: float = 600) -> None:
        """Wait until `ready(states)` holds for the cluster's PG state counts (`pg_states`)."""
        self._wait(lambda: ready(self.pg_states()), what, timeout)

    def wait_pg(self, pgid: str, ready: Any, what: str, timeout: float = 600) -> None:
        def state() -> bool:
            doc = self.command("pg ls")
            pgs = doc.get("pg_stats", []) if isinstance(doc, dict) else doc
            return any(pg["pgid"] == pgid and ready(pg["state"]) for pg in pgs)

        self._wait(state, f"{what} (pg {pgid})", timeout)

    def _wait(self, ready: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, json.JSONDecodeError,
                    KeyError, CommandError) as exc:
                last = exc
            time.sleep(1)
        detail = getattr(last, "stderr", None) or last
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what} (last: {detail}); logs in "
                           f"{self.base / 'log'}")

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.shutdown()
            self._conn = None
        for name in sorted(self.procs, key=lambda n: (n.startswith("mon"), n.startswith("mgr"))):
            proc = self.procs[name]
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def main() -> int:
    cluster = Cluster(Path(sys.argv[1]))
    try:
        cluster.start()
        print(json.dumps({"conf": str(cluster.conf), "keyring": str(cluster.keyring),
                          "started_in_s": round(cluster.started_in, 1)}), flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
