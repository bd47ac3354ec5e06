"""The rig's emulated NVMe drives (rig/drives.py): the QEMU arguments, and the QMP relay that lets the guest pull
and re-plug its drives and nothing else. The relay is run against two real Unix sockets standing in for QEMU's
monitor and the guest's virtio-serial chardev; the guest side of it is proven in tests/kernel/test_drives.py."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from rig import vm
from rig.drives import DRIVES_ENV, Drives, check_command, device_arguments, for_run


def _opts(drives: Drives) -> list[tuple[str, str]]:
    opts = drives.qemu_opts()
    return list(zip(opts[::2], opts[1::2], strict=True))


def test_each_drive_is_a_hot_pluggable_nvme_controller_on_its_own_image(tmp_path: Path) -> None:
    drives = Drives(tmp_path / "d", count=3, size=64 << 20)
    drives.create()
    pairs = _opts(drives)
    nodes = [v for k, v in pairs if k == "-blockdev"]
    assert nodes == [f"driver=raw,node-name=nvmetd-node{i},file.driver=file,file.filename={drives.image(i)}"
                     for i in range(3)]
    ports = [v for k, v in pairs if k == "-device" and v.startswith("pcie-root-port,")]
    assert len({p.split("chassis=")[1].split(",")[0] for p in ports}) == 3  # unique chassis numbers
    nvmes = [v for k, v in pairs if k == "-device" and v.startswith("nvme,")]
    assert nvmes == ["nvme,id=nvmetd-drive0,serial=nvmetd-drive0,drive=nvmetd-node0,bus=nvmetd-rp0",
                     "nvme,id=nvmetd-drive1,serial=nvmetd-drive1,drive=nvmetd-node1,bus=nvmetd-rp1",
                     "nvme,id=nvmetd-drive2,serial=nvmetd-drive2,drive=nvmetd-node2,bus=nvmetd-rp2"]
    # a re-plug (device_add) uses exactly the boot's device arguments
    assert device_arguments(1) == {"driver": "nvme", "id": "nvmetd-drive1", "serial": "nvmetd-drive1",
                                   "drive": "nvmetd-node1", "bus": "nvmetd-rp1"}
    assert ("-qmp", f"unix:{drives.qmp_socket},server=on,wait=off") in pairs
    assert ("-device", "virtserialport,bus=nvmetd-ser.0,chardev=nvmetd-qmpg,name=nvmetd.qmp") in pairs
    # sparse images of the asked size, removed with the run
    assert all(drives.image(i).stat().st_size == 64 << 20 and drives.image(i).stat().st_blocks == 0
               for i in range(3))
    drives.remove()
    assert not drives.root.exists()


def test_vng_argv_carries_the_drives_last_and_tells_the_guest(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    monkeypatch.setattr(vm, "find_kernel", lambda: Path("/boot/vmlinuz-6.12.0-amd64"))
    monkeypatch.setattr(vm, "_vng", lambda: "vng")
    monkeypatch.setattr(vm.shutil, "which", lambda name: f"/usr/bin/{name}")
    drives = Drives(tmp_path, count=2)
    argv = vm.build_argv(["true"], "3G", 2, tmp_path, drives=drives)
    assert f"{DRIVES_ENV}=nvmetd-drive0,nvmetd-drive1" in argv[argv.index("--exec") + 1]
    tail = argv[-len(drives.qemu_opts()):]
    assert tail == [f"--qemu-opts={token}" for token in drives.qemu_opts()]
    assert not any(DRIVES_ENV in a for a in vm.build_argv(["true"], "3G", 2, tmp_path))


def test_a_count_of_zero_gives_no_drives(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NVMETD_RIG_DRIVE_COUNT", "0")
    assert for_run(tmp_path) is None
    monkeypatch.setenv("NVMETD_RIG_DRIVE_COUNT", "2")
    drives = for_run(tmp_path)
    assert drives is not None and drives.count == 2 and drives.root.parent == tmp_path / ".rig"
    drives.remove()


@pytest.mark.parametrize("line", [
    b'{"execute": "quit"}',
    b'{"execute": "device_del", "arguments": {"id": "virtio-disk0"}}',
    b'{"execute": "device_add", "arguments": {"driver": "virtio-net-pci", "id": "nvmetd-drive9"}}',
    b'{"execute": "device_add", "arguments": {"driver": "nvme", "id": "other"}}',
    b'not json',
    b'["device_del"]',
])
def test_relay_refuses_what_is_not_plugging_the_rigs_drives(line: bytes) -> None:
    reply = check_command(line)
    assert reply is not None and "error" in json.loads(reply)


def test_relay_passes_drive_plugging_and_queries() -> None:
    assert check_command(b'{"execute": "device_del", "arguments": {"id": "nvmetd-drive1"}, "id": 3}') is None
    add = {"execute": "device_add", "arguments": device_arguments(2)}
    assert check_command(json.dumps(add).encode()) is None
    assert check_command(b'{"execute": "query-pci"}') is None


def _server(path: Path) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    return srv


def test_relay_holds_the_qmp_session_and_forwards_only_allowed_commands(tmp_path: Path) -> None:
    drives = Drives(tmp_path, count=1)
    qmp_srv, guest_srv = _server(drives.qmp_socket), _server(drives.guest_socket)
    seen: list[dict] = []

    def fake_qemu() -> None:  # QEMU's monitor: greeting, capabilities, then a reply to each command, by id
        conn, _ = qmp_srv.accept()
        with conn, conn.makefile("rwb", buffering=0) as f:
            f.write(b'{"QMP": {"version": {}}}\n')
            for line in f:
                cmd = json.loads(line)
                seen.append(cmd)
                f.write(b'{"event": "DEVICE_DELETED"}\n')  # events are forwarded as they come
                f.write(json.dumps({"return": {}, "id": cmd.get("id")}).encode() + b"\n")

    threading.Thread(target=fake_qemu, daemon=True).start()
    drives.start_relay(timeout=10)
    guest, _ = guest_srv.accept()
    guest.settimeout(10)
    with guest, guest.makefile("rwb", buffering=0) as g:
        g.write(b'{"execute": "quit", "id": 1}\n')
        assert json.loads(g.readline()) == {"error": {"class": "GenericError", "desc": json.loads(
            check_command(b'{"execute": "quit"}'))["error"]["desc"]}, "id": 1}
        g.write(b'{"execute": "device_del", "arguments": {"id": "nvmetd-drive0"}, "id": 2}\n')
        lines = [json.loads(g.readline()) for _ in range(2)]
    assert {"return": {}, "id": 2} in lines
    assert [c["execute"] for c in seen] == ["qmp_capabilities", "device_del"]  # quit never reached QEMU
