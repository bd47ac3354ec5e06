"""A real one-host Ceph cluster for the RBD tests: 1 mon, 1 mgr, 3 BlueStore OSDs on sparse files, cephx on,
loopback only, failure domain OSD (`osd crush chooseleaf type = 0`, as nixpkgs' ceph-single-node test deploys it).

Started by hand from the Debian packages (no cephadm, no systemd): every daemon runs in the foreground as our child,
so a test can stop and restart single OSDs by their pid. BlueStore, not memstore: a stopped memstore OSD loses its
store, so it could neither come back with its data nor be corrupted and repaired with ceph-objectstore-tool.
Memory is kept small for a 3 GiB rig VM (cache autotune off, small caches, one op shard).

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

OSDS = 3
MON_ADDR = "127.0.0.1"

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
mon_warn_on_pool_no_redundancy = false
mon_osd_min_down_reporters = 1
mon_osd_down_out_interval = 0
osd_heartbeat_interval = 2
osd_heartbeat_grace = 8
mon_osd_adjust_heartbeat_grace = false
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = 1073741824
bluestore_fsck_on_mkfs = false
bluestore_fsck_on_mount = false
bluestore_cache_autotune = false
bluestore_cache_size = 33554432
osd_memory_target = 402653184
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
osd_recovery_sleep = 0
osd_scrub_auto_repair = false
osd_scrub_begin_hour = 0
osd_scrub_end_hour = 0
osd_scrub_during_recovery = true
osd_max_scrubs = 3
mgr_stats_period = 1
mon_pg_warn_min_per_osd = 0
mon_data_avail_warn = 1
auth_allow_insecure_global_id_reclaim = false
debug_ms = 0
"""
"""`mon_osd_down_out_interval = 0`: a stopped OSD stays `in` (its PGs go degraded, not remapped), which is the
outage the tests model; `osd_scrub_*_hour` equal: scrubs only when asked."""


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
        self.started_in = 0.0

    # ------------------------------------------------------------------ helpers
    def ceph(self, *args: str, timeout: float = 120) -> str:
        return subprocess.run(["ceph", "-c", str(self.conf), "--connect-timeout", "30", *args], check=True,
                              capture_output=True, text=True, timeout=timeout).stdout

    def ceph_json(self, *args: str) -> Any:
        return json.loads(self.ceph(*args, "--format", "json"))

    def _tool(self, *argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=300)

    def _daemon(self, name: str, argv: list[str]) -> None:
        log = open(self.base / "log" / f"{name}.out", "ab")  # noqa: SIM115 (lives as long as the daemon)
        self.procs[name] = subprocess.Popen([*argv, "-f", "-c", str(self.conf)], stdout=log, stderr=log,
                                            start_new_session=True)

    # ------------------------------------------------------------------ start-up
    def start(self) -> Cluster:
        t0 = time.monotonic()
        for sub in ("run", "log", "mon", "mgr", "osd", "keys"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.base / "keys", 0o700)
        fsid = str(uuid.uuid4())
        conf = CONF.format(fsid=fsid, mon=MON_ADDR, d=self.base)
        for osd_id, dev in enumerate(self.block_devices):
            conf += f"\n[osd.{osd_id}]\nbluestore_block_path = {dev}\n"
        self.conf.write_text(conf)
        keys = self.base / "keys"
        mon_kr = keys / "mon.a.keyring"
        self._tool("ceph-authtool", "--create-keyring", str(mon_kr), "--gen-key", "-n", "mon.",
                   "--cap", "mon", "allow *")
        self._tool("ceph-authtool", "--create-keyring", str(self.keyring), "--gen-key", "-n", "client.admin",
                   "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *",
                   "--cap", "mds", "allow *")
        os.chmod(self.keyring, 0o600)
        self._tool("ceph-authtool", str(mon_kr), "--import-keyring", str(self.keyring))
        monmap = self.base / "monmap"
        self._tool("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                   f"[v2:{MON_ADDR}:3300,v1:{MON_ADDR}:6789]", str(monmap))
        self._tool("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(monmap),
                   "--keyring", str(mon_kr))
        self._daemon("mon.a", ["ceph-mon", "-i", "a"])
        self._wait(lambda: self.ceph_json("mon", "stat") is not None, "the monitor to answer", 120)
        mgr_dir = self.base / "mgr" / "x"
        mgr_dir.mkdir(exist_ok=True)
        (keys / "mgr.x.keyring").write_text(self.ceph("auth", "get-or-create", "mgr.x", "mon", "allow profile mgr",
                                                      "osd", "allow *", "mds", "allow *"))
        self._daemon("mgr.x", ["ceph-mgr", "-i", "x"])
        mkfs = []
        for _ in range(OSDS):
            osd_uuid = str(uuid.uuid4())
            osd_id = self.ceph("osd", "new", osd_uuid).strip()
            (self.base / "osd" / osd_id).mkdir(exist_ok=True)
            mkfs.append((osd_id, subprocess.Popen(
                ["ceph-osd", "-c", str(self.conf), "-i", osd_id, "--mkfs", "--mkkey", "--no-mon-config",
                 "--osd-uuid", osd_uuid],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        for osd_id, proc in mkfs:
            output, _ = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"ceph-osd --mkfs of osd.{osd_id} failed: {output.decode()[-500:]}")
            self.ceph("auth", "add", f"osd.{osd_id}", "osd", "allow *", "mon", "allow profile osd",
                      "mgr", "allow profile osd", "-i", str(keys / f"osd.{osd_id}.keyring"))
            self.start_osd(int(osd_id))
        self.wait_osds_up(OSDS)
        self._wait(lambda: self.ceph_json("mgr", "stat").get("available"), "the manager to be available", 300)
        self.started_in = time.monotonic() - t0
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
        return int(self.ceph_json("osd", "stat")["num_up_osds"])

    def wait_osds_up(self, count: int, timeout: float = 600) -> None:
        self._wait(lambda: self.osds_up() == count, f"{count} OSDs up", timeout)

    def pg_states(self) -> dict[str, int]:
        summary = self.ceph_json("pg", "stat")
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

    def _wait(self, ready: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, json.JSONDecodeError,
                    KeyError) as exc:
                last = exc
            time.sleep(1)
        detail = getattr(last, "stderr", None) or last
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what} (last: {detail}); logs in "
                           f"{self.base / 'log'}")

    def stop(self) -> None:
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
