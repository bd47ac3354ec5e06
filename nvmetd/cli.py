"""nvmetctl: the command line for nvmetd's desired state and the live nvmet tree.

Every command takes --json for machine-readable output, prints one clear line on error and exits with a code
that says what happened (0 done, 1 not converged / drift, 2 bad input, 3 the system cannot).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from nvmetd.errors import EXIT_NOT_CONVERGED, EXIT_SYSTEM, EXIT_USAGE, run_cli
from nvmetd.vms import SUBSYSTEM_PREFIX, vhost_device_id
from target.apply import ApplyResult, apply_state, diff
from target.configfs import NVMET_ROOT, ConfigFS
from target.features import load_modules, require
from target.live import read_state
from target.model import TargetState, parse_state
from target.nvmetcli import export_config, import_config
from target.restore import restore
from target.store import DEFAULT_PATH, StateStore, set_target


class Context:
    def __init__(self, state: Path, configfs: Path, as_json: bool, socket: Path,
                 pools_root: Path | None = None) -> None:
        self.store = StateStore(state)
        self.pools_root = pools_root
        self.configfs_root = configfs
        self.as_json = as_json
        self.socket = socket

    def call(self, method: str, path: tuple[str, ...], body: dict[str, Any] | None = None) -> Any:
        """One request to the nvmetd service; its errors come back as one line with the right exit code.

        `path` is a tuple of segments, user names among them: each is percent-encoded whole (see _api_path), so a
        name can never add a segment, a query or a fragment, nor be resolved away as `..` by the client."""
        import httpx

        if not self.socket.exists():
            raise SystemExit(_fail(f"nvmetd is not running (no socket {self.socket}); start it with "
                                   "`systemctl start nvmetd` or `nvmetd`", EXIT_SYSTEM))
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), timeout=600) as client:
                resp = client.request(method, httpx.URL("http://nvmetd").copy_with(raw_path=_api_path(path)),
                                      json=body)
        except httpx.HTTPError as exc:
            raise SystemExit(_fail(f"cannot reach nvmetd at {self.socket}: {exc}", EXIT_SYSTEM)) from None
        data = resp.json() if resp.content else None
        if resp.status_code >= 400:
            message = data.get("error") if isinstance(data, dict) else resp.text
            if isinstance(data, dict) and "detail" in data:
                message = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', [])[1:])}: {d.get('msg')}"
                                    for d in data["detail"]) if isinstance(data["detail"], list) else data["detail"]
            code = EXIT_USAGE if resp.status_code in (400, 404, 409, 422) else EXIT_SYSTEM
            raise SystemExit(_fail(str(message), code))
        return data

    def cfs(self) -> ConfigFS:
        cfs = ConfigFS(self.configfs_root)
        if not cfs.exists() and self.configfs_root == NVMET_ROOT:
            load_modules(TargetState())
        if not cfs.exists():
            raise SystemExit(_fail(f"{self.configfs_root} does not exist: this kernel has no nvmet "
                                   "(modprobe nvmet failed or configfs is not mounted)", EXIT_SYSTEM))
        return cfs

    def effective(self) -> TargetState:
        """What the kernel should hold: the declared tree plus the VMs' subsystems (as the daemon computes it)."""
        doc = self.store.load()
        if not any(vm.get("attachments") for vm in doc.get("vms", {}).values()):
            return parse_state(doc.get("target", {}))
        from nvmetd.manager import Manager

        return Manager(self.store, ConfigFS(self.configfs_root), pools_root=self.pools_root).effective(doc)

    def emit(self, data: Any, text: str) -> None:
        click.echo(json.dumps(data, indent=2, sort_keys=True) if self.as_json else text)


def _api_path(segments: tuple[str, ...]) -> bytes:
    """The request's raw path. `quote(safe="")` encodes `/ ? # %` and every control or non-ASCII character; the
    dots of a `.` or `..` segment are encoded too, since RFC 3986 clients remove dot segments before sending."""
    from urllib.parse import quote

    parts = [quote(seg, safe="") for seg in segments]
    return ("/" + "/".join(p.replace(".", "%2E") if p in (".", "..") else p for p in parts)).encode("ascii")


def _fail(message: str, code: int) -> int:
    click.echo(f"nvmetctl: error: {message}", err=True)
    return code


def _read_json(path: str) -> Any:
    try:
        with click.open_file(path) as f:
            return json.load(f)
    except OSError as exc:
        raise click.UsageError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise click.UsageError(f"{path} is not JSON: {exc}") from None


def _result_text(result: ApplyResult) -> str:
    lines = []
    for _path, st in sorted(result.objects.items()):
        if st.status != "ok":
            lines.append(f"{st.status:8} {st.label}" + (f": {st.reason}" if st.reason else ""))
    counts = {s: len(result.by_status(s)) for s in ("ok", "changed", "removed", "pending", "failed", "skipped")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines.append(f"{'converged' if result.converged else 'NOT converged'}: {summary or 'nothing to do'}; "
                 f"{result.writes} configfs changes")
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state", "state_path", type=click.Path(path_type=Path), envvar="NVMETD_STATE",
              default=DEFAULT_PATH, show_default=True, help="nvmetd's durable state file")
@click.option("--configfs", type=click.Path(path_type=Path), envvar="NVMETD_CONFIGFS", default=NVMET_ROOT,
              hidden=True)
@click.option("--socket", type=click.Path(path_type=Path), envvar="NVMETD_SOCKET",
              default=Path("/run/nvmetd/nvmetd.sock"), show_default=True, help="nvmetd's API socket")
@click.option("--pools-root", type=click.Path(path_type=Path), envvar="NVMETD_BACKENDS_DIR", default=None,
              help="the pools' state directory, as given to nvmetd (default /var/lib/nvmetd/backends)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("-v", "--verbose", is_flag=True, help="log each configfs change")
@click.pass_context
def cli(ctx: click.Context, state_path: Path, configfs: Path, socket: Path, pools_root: Path | None, as_json: bool,
        verbose: bool) -> None:
    """Control the Linux in-kernel NVMe-oF target (nvmet): VMs, disks and the declarative target tree.

    attach/detach/disk/vm talk to the nvmetd service; apply/diff/repair/restore/import/export work on the
    state file and configfs directly (as root).
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(name)s: %(message)s")
    ctx.obj = Context(state_path, configfs, as_json, socket, pools_root)


@cli.command()
@click.argument("file", type=click.Path(allow_dash=True))
@click.option("--dry-run", is_flag=True, help="only show the changes")
@click.pass_obj
def apply(obj: Context, file: str, dry_run: bool) -> None:
    """Make FILE (nvmetd target JSON) the desired state and apply it to the kernel."""
    state = parse_state(_read_json(file))
    cfs = obj.cfs()
    require(state, cfs)
    if dry_run:
        changes = diff(state, cfs)
        obj.emit({"changes": changes}, "\n".join(changes) or "nothing to do")
        return
    if any(s.nqn.startswith(SUBSYSTEM_PREFIX) for s in state.subsystems):
        raise click.UsageError(f"subsystem names starting with {SUBSYSTEM_PREFIX} are reserved for nvmetd's VMs")
    with obj.store.transaction() as doc:
        set_target(doc, state)
    result = apply_state(obj.effective(), cfs)
    obj.emit(result.to_dict(), _result_text(result))
    if not result.converged:
        sys.exit(EXIT_NOT_CONVERGED)


@cli.command(name="diff")
@click.pass_obj
def diff_cmd(obj: Context) -> None:
    """Show what differs between the desired state and the live kernel (exit 1 if anything does)."""
    changes = diff(obj.effective(), obj.cfs())
    obj.emit({"drift": changes}, "\n".join(changes) or "no drift: the kernel matches the desired state")
    if changes:
        sys.exit(EXIT_NOT_CONVERGED)


@cli.command()
@click.pass_obj
def repair(obj: Context) -> None:
    """Re-apply the desired state, undoing hand edits of configfs."""
    result = apply_state(obj.effective(), obj.cfs())
    obj.emit(result.to_dict(), _result_text(result))
    if not result.converged:
        sys.exit(EXIT_NOT_CONVERGED)


@cli.command(name="restore")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="seconds to wait for missing devices and addresses")
@click.pass_obj
def restore_cmd(obj: Context, timeout: float) -> None:
    """Boot-time restore: apply what is ready, wait for late devices and addresses, never wipe."""
    state = obj.effective()
    load_modules(state)
    result = restore(state, obj.cfs(), timeout=timeout)
    obj.emit(result.to_dict(), _result_text(result))
    if not result.converged:
        sys.exit(EXIT_NOT_CONVERGED)


@cli.command()
@click.pass_obj
def status(obj: Context) -> None:
    """Summarise the desired state, the live tree and the drift between them."""
    desired = obj.effective()
    cfs = obj.cfs()
    live = read_state(cfs)
    drift = diff(desired, cfs)
    data = {
        "state_file": str(obj.store.path), "generation": obj.store.load()["generation"],
        "desired": {"subsystems": len(desired.subsystems), "ports": len(desired.ports), "hosts": len(desired.hosts),
                    "namespaces": sum(len(s.namespaces) for s in desired.subsystems)},
        "live": {"subsystems": len(live.subsystems), "ports": len(live.ports), "hosts": len(live.hosts),
                 "namespaces": sum(len(s.namespaces) for s in live.subsystems),
                 "enabled_namespaces": sum(1 for s in live.subsystems for n in s.namespaces if n.enable)},
        "drift": len(drift),
    }
    text = (f"desired: {data['desired']['subsystems']} subsystems, {data['desired']['namespaces']} namespaces, "
            f"{data['desired']['ports']} ports, {data['desired']['hosts']} hosts (generation {data['generation']})\n"
            f"live:    {data['live']['subsystems']} subsystems, {data['live']['namespaces']} namespaces "
            f"({data['live']['enabled_namespaces']} enabled), {data['live']['ports']} ports, "
            f"{data['live']['hosts']} hosts\n"
            f"drift:   {len(drift)} change(s) needed" + (" — run `nvmetctl diff`" if drift else ""))
    obj.emit(data, text)


@cli.command(name="export")
@click.option("--nvmetcli", "nvmetcli_fmt", is_flag=True, help="nvmetcli config.json format")
@click.option("--live", is_flag=True, help="export the live kernel tree instead of the desired state")
@click.pass_obj
def export_cmd(obj: Context, nvmetcli_fmt: bool, live: bool) -> None:
    """Print the desired (or live) state as nvmetd JSON or nvmetcli JSON. Contains DH-CHAP keys."""
    state = read_state(obj.cfs()) if live else obj.effective()
    data = export_config(state) if nvmetcli_fmt else state.canonical().model_dump(mode="json", exclude_none=True)
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@cli.command(name="import")
@click.argument("file", type=click.Path(allow_dash=True))
@click.option("--nvmetcli", "nvmetcli_fmt", is_flag=True, required=True, help="FILE is nvmetcli config.json")
@click.option("--no-apply", is_flag=True, help="only store it as the desired state")
@click.pass_obj
def import_cmd(obj: Context, file: str, nvmetcli_fmt: bool, no_apply: bool) -> None:
    """Take an nvmetcli config.json as the desired state (and apply it)."""
    state = import_config(_read_json(file))
    with obj.store.transaction() as doc:
        set_target(doc, state)
    if no_apply:
        obj.emit({"imported": True}, f"imported {len(state.subsystems)} subsystems into {obj.store.path}")
        return
    cfs = obj.cfs()
    require(state, cfs)
    result = apply_state(obj.effective(), cfs)
    obj.emit(result.to_dict(), _result_text(result))
    if not result.converged:
        sys.exit(EXIT_NOT_CONVERGED)


@cli.command()
@click.option("-c", "--command", "commands", multiple=True, help="run these shell commands and exit")
@click.pass_obj
def shell(obj: Context, commands: tuple[str, ...]) -> None:
    """Interactive tree of the live target (ls, cd, info, diff, repair), like nvmetcli's."""
    from nvmetd import shell as shell_mod

    shell_mod.run(obj.cfs(), obj.effective, list(commands) or None)


def _kv(data: dict[str, Any]) -> str:
    return "\n".join(f"{k}: {' '.join(v) if isinstance(v, list) else v}" for k, v in data.items())


@cli.command()
@click.argument("vm")
@click.argument("disk")
@click.option("--transport", type=click.Choice(["auto", "tcp", "rdma", "loop", "vhost"]), default="auto",
              show_default=True)
@click.option("--vm-uuid", help="the VM's UUID (its host NQN derives from it); new VMs get a random one")
@click.option("--qmp", "qmp_socket", type=click.Path(), help="hot-plug into this running QEMU (QMP socket)")
@click.option("--qmp-bus", help="with --qmp: the PCIe root port to plug into (a q35 root bus is not hot-pluggable)")
@click.option("--memory", help="vhost: the VM's RAM size (512M, 4G), to include the shared memory backend "
              "in the QEMU arguments")
@click.pass_obj
def attach(obj: Context, vm: str, disk: str, transport: str, vm_uuid: str | None, qmp_socket: str | None,
           qmp_bus: str | None, memory: str | None) -> None:
    """Give VM the disk DISK (safe to repeat). Prints how to hand it to QEMU.

    With --transport vhost the disk becomes a namespace of the VM's vhost-user-nvme controller, served by
    nvmetd's engine from the VM's shared memory: the output has the engine socket and the QEMU arguments."""
    result = obj.call("PUT", ("v1", "vms", vm, "disks", disk),
                      {"transport": transport, "vm_uuid": vm_uuid, "memory": memory})
    if qmp_socket and result["transport"] == "vhost":
        from nvmetd import qmp

        try:
            result["hotplugged"] = qmp.hotplug_vhost(qmp_socket, vhost_device_id(vm), result["vhost_socket"],
                                                     result["subsystem_nqn"], bus=qmp_bus)
        except qmp.QmpError as exc:
            raise SystemExit(_fail(str(exc), EXIT_SYSTEM)) from None
    elif qmp_socket:
        from nvmetd import qmp

        if not result.get("device"):
            raise SystemExit(_fail(f"--qmp needs a host-side block device; {result['transport']} gives none",
                                   EXIT_USAGE))
        try:
            result["hotplugged"] = qmp.hotplug(qmp_socket, disk, result["device"])
        except qmp.QmpError as exc:
            raise SystemExit(_fail(str(exc), EXIT_SYSTEM)) from None
    obj.emit(result, _kv(result))


@cli.command()
@click.argument("vm")
@click.argument("disk")
@click.option("--qmp", "qmp_socket", type=click.Path(), help="hot-unplug from this running QEMU first")
@click.pass_obj
def detach(obj: Context, vm: str, disk: str, qmp_socket: str | None) -> None:
    """Take DISK away from VM (safe to repeat)."""
    if qmp_socket:
        from nvmetd import qmp

        disks = obj.call("GET", ("v1", "vms", vm))["disks"]
        transport = disks.get(disk, {}).get("transport")
        try:
            if transport != "vhost":
                qmp.unplug(qmp_socket, disk)
            elif not any(d != disk and a["transport"] == "vhost" for d, a in disks.items()):
                qmp.unplug_vhost(qmp_socket, vhost_device_id(vm))  # its last vhost disk: the controller goes
        except qmp.QmpError as exc:
            raise SystemExit(_fail(str(exc), EXIT_SYSTEM)) from None
    result = obj.call("DELETE", ("v1", "vms", vm, "disks", disk))
    obj.emit(result, _kv(result))


@cli.group()
def disk() -> None:
    """Create, delete, resize, snapshot, clone and list disks."""


@disk.command("create")
@click.argument("name")
@click.option("--pool", required=True)
@click.option("--size", required=True, help="e.g. 10G")
@click.option("--tenant", default="default", show_default=True)
@click.option("--thick", is_flag=True, help="allocate everything now")
@click.option("--encrypted", is_flag=True)
@click.option("--compression", default="off", show_default=True)
@click.pass_obj
def disk_create(obj: Context, name: str, pool: str, size: str, tenant: str, thick: bool, encrypted: bool,
                compression: str) -> None:
    result = obj.call("POST", ("v1", "disks"), {"name": name, "pool": pool, "size": size, "tenant": tenant,
                                            "thin": not thick, "encrypted": encrypted, "compression": compression})
    obj.emit(result, _kv(result))


@disk.command("delete")
@click.argument("name")
@click.pass_obj
def disk_delete(obj: Context, name: str) -> None:
    """Delete a disk and destroy its data."""
    obj.emit(obj.call("DELETE", ("v1", "disks", name)), f"deleted {name}")


@disk.command("resize")
@click.argument("name")
@click.option("--size", required=True)
@click.option("--force", is_flag=True, help="allow shrinking (destroys data past the new end)")
@click.pass_obj
def disk_resize(obj: Context, name: str, size: str, force: bool) -> None:
    result = obj.call("POST", ("v1", "disks", name, "resize"), {"size": size, "force": force})
    obj.emit(result, _kv(result))


@disk.command("snapshot")
@click.argument("name")
@click.argument("snapshot")
@click.pass_obj
def disk_snapshot(obj: Context, name: str, snapshot: str) -> None:
    result = obj.call("POST", ("v1", "disks", name, "snapshots"), {"snapshot": snapshot})
    obj.emit(result, _kv(result))


@disk.command("clone")
@click.argument("name")
@click.argument("snapshot")
@click.argument("new_name")
@click.pass_obj
def disk_clone(obj: Context, name: str, snapshot: str, new_name: str) -> None:
    result = obj.call("POST", ("v1", "disks", name, "clones"), {"snapshot": snapshot, "name": new_name})
    obj.emit(result, _kv(result))


@disk.command("list")
@click.pass_obj
def disk_list(obj: Context) -> None:
    disks = obj.call("GET", ("v1", "disks"))
    rows = [f"{d['name']:24} {d['pool']:12} {d.get('logical_bytes', '?'):>14} {','.join(d['attached_to']) or '-'}"
            for d in disks]
    obj.emit(disks, "\n".join([f"{'NAME':24} {'POOL':12} {'SIZE':>14} ATTACHED TO", *rows]))


@disk.command("show")
@click.argument("name")
@click.pass_obj
def disk_show(obj: Context, name: str) -> None:
    result = obj.call("GET", ("v1", "disks", name))
    obj.emit(result, _kv(result))


@cli.group()
def vm() -> None:
    """List VMs and show their disks."""


@vm.command("list")
@click.pass_obj
def vm_list(obj: Context) -> None:
    vms = obj.call("GET", ("v1", "vms"))
    obj.emit(vms, "\n".join(f"{v['name']:24} {v['uuid']} {len(v['disks'])} disk(s)" for v in vms) or "no VMs")


@vm.command("show")
@click.argument("name")
@click.pass_obj
def vm_show(obj: Context, name: str) -> None:
    result = obj.call("GET", ("v1", "vms", name))
    obj.emit(result, json.dumps(result, indent=2))


def _mount_bench() -> None:
    """`nvmetctl bench ...` is the fio harness's own click group (python -m bench.matrix), mounted as it is."""
    from bench.matrix.cli import bench

    cli.add_command(bench, name="bench")


_mount_bench()


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, argv, "nvmetctl", "nvmetctl")


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
