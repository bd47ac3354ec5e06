"""nvmetctl: the command line for nvmetd's desired state and the live nvmet tree.

Every command takes --json for machine-readable output, prints one clear line on error and exits with a code
that says what happened (0 done, 1 not converged / drift, 2 bad input, 3 the system cannot).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import click

from nvmetd.errors import EXIT_NOT_CONVERGED, EXIT_SYSTEM, EXIT_USAGE, run_cli

# Kept free of the server's stack: `nvmetctl --help` and the API commands import click, the standard library's
# http.client and this package's small modules only; the offline paths import nvmetd's own code when they run.
DEFAULT_STATE = Path("/var/lib/nvmetd/state.json")  # target.store.DEFAULT_PATH
NVMET_ROOT = Path("/sys/kernel/config/nvmet")  # target.configfs.NVMET_ROOT
VM_PREFIX = "nqn.2026-11.io.nvmetd:vm:"  # nvmetd.vms.SUBSYSTEM_PREFIX

# the target commands: their API route, and (offline) the same TargetOps method in this process
TARGET_API: dict[str, tuple[str, tuple[str, ...]]] = {
    "apply": ("PUT", ("v1", "target")), "plan": ("POST", ("v1", "target", "plan")),
    "drift": ("GET", ("v1", "target", "drift")), "repair": ("POST", ("v1", "target", "repair")),
    "restore": ("POST", ("v1", "target", "restore")), "status": ("GET", ("v1", "target", "status")),
    "export": ("GET", ("v1", "target", "export")), "import": ("POST", ("v1", "target", "import")),
}


class Context:
    def __init__(self, state: Path, configfs: Path, as_json: bool, socket: Path,
                 pools_root: Path | None = None, offline: bool = False) -> None:
        self.state_path = state
        self.pools_root = pools_root
        self.configfs_root = configfs
        self.as_json = as_json
        self.socket = socket
        self.offline = offline

    def call(self, method: str, path: tuple[str, ...], body: Any = None, query: dict[str, Any] | None = None) -> Any:
        """One request to the nvmetd service; its errors come back as one line with the right exit code.

        `path` is a tuple of segments, user names among them: each is percent-encoded whole (see
        client.api_path), so a name can never add a segment, a query or a fragment."""
        from nvmetd import client

        if not self.socket.exists():
            raise SystemExit(_fail(f"nvmetd is not running (no socket {self.socket}); start it with "
                                   "`systemctl start nvmetd` or `nvmetd` (target commands also work with "
                                   "--offline while it is stopped)", EXIT_SYSTEM))
        try:
            return client.request(self.socket, method, path, body, query)
        except client.Unreachable as exc:
            raise SystemExit(_fail(str(exc), EXIT_SYSTEM)) from None
        except client.ApiError as exc:
            code = EXIT_USAGE if exc.status in (400, 404, 409, 422) else EXIT_SYSTEM
            raise SystemExit(_fail(str(exc), code)) from None

    def target(self, command: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        """A target command: through nvmetd (the one writer), or with --offline in this process. Warnings of the
        validation (names that are not NQNs of the spec's form) go to stderr."""
        if self.offline:
            from nvmetd import offline

            result = offline.run(self.state_path, self.socket, self.configfs_root, self.pools_root, command, body,
                                 query)
        else:
            method, path = TARGET_API[command]
            result = self.call(method, path, body, query)
        for warning in result.get("warnings", []) if isinstance(result, dict) else []:
            click.echo(f"nvmetctl: warning: {warning}", err=True)
        return result

    def emit(self, data: Any, text: str) -> None:
        click.echo(json.dumps(data, indent=2, sort_keys=True) if self.as_json else text)


def _api_path(segments: tuple[str, ...]) -> bytes:
    from nvmetd.client import api_path

    return api_path(segments).encode("ascii")


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


def _result_text(result: dict[str, Any]) -> str:
    """An apply result (ApplyResult.to_dict(), as the API sends it) for people."""
    from target.status import ORDER as STATUS_ORDER  # a bare StrEnum; here, not at start-up (no target/ at --help)
    from target.status import Status

    objects = result.get("objects", {})
    lines = [f"{st['status']:8} {st['object']}" + (f": {st['reason']}" if st.get("reason") else "")
             for _path, st in sorted(objects.items()) if st["status"] != Status.OK]
    counts = Counter(st["status"] for st in objects.values())
    summary = ", ".join(f"{counts[s]} {s}" for s in STATUS_ORDER if counts[s])
    lines.append(f"{'converged' if result['converged'] else 'NOT converged'}: {summary or 'nothing to do'}; "
                 f"{result['writes']} configfs changes")
    return "\n".join(lines)


def _emit_result(obj: Context, result: dict[str, Any]) -> None:
    obj.emit(result, _result_text(result))
    if not result["converged"]:
        sys.exit(EXIT_NOT_CONVERGED)


class _Group(click.Group):
    """Subcommands loaded when used: `nvmetctl bench` is the fio harness's own click group, which imports much
    that no other command needs, so `--help` lists it without importing it."""

    lazy: ClassVar[dict[str, tuple[str, str, str]]] = {
        "bench": ("bench.matrix.cli", "bench", "Run the fio matrix per backend x transport (see bench --help)."),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            import importlib

            module, attr, _help = self.lazy[name]

            self.add_command(getattr(importlib.import_module(module), attr), name=name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self.lazy[name][2] if name in self.lazy and name not in self.commands
                 else self.commands[name].get_short_help_str(formatter.width - 20 if formatter.width else 60))
                for name in self.list_commands(ctx) if name in self.lazy or not self.commands[name].hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and isinstance(ctx.obj, Context):
        ctx.obj.as_json = True


def _json_everywhere(group: click.Group) -> None:
    """`--json` after the subcommand too (`nvmetctl status --json`, `nvmetctl disk list --json`)."""
    for command in group.commands.values():
        if not any(p.name == "as_json" for p in command.params):
            command.params.append(click.Option(["--json", "as_json"], is_flag=True, expose_value=False,
                                               callback=_set_json, help="machine-readable output"))
        if isinstance(command, click.Group):
            _json_everywhere(command)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state", "state_path", type=click.Path(path_type=Path), envvar="NVMETD_STATE",
              default=DEFAULT_STATE, show_default=True, help="--offline: nvmetd's durable state file")
@click.option("--configfs", type=click.Path(path_type=Path), envvar="NVMETD_CONFIGFS", default=NVMET_ROOT,
              hidden=True)
@click.option("--socket", type=click.Path(path_type=Path), envvar="NVMETD_SOCKET",
              default=Path("/run/nvmetd/nvmetd.sock"), show_default=True, help="nvmetd's API socket")
@click.option("--pools-root", type=click.Path(path_type=Path), envvar="NVMETD_BACKENDS_DIR", default=None,
              help="--offline: the pools' state directory, as given to nvmetd (default /var/lib/nvmetd/backends)")
@click.option("--offline", is_flag=True,
              help="target commands without nvmetd: run its code here, under the store's lock (refused while "
              "nvmetd runs)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("-v", "--verbose", is_flag=True, help="log each configfs change")
@click.pass_context
def cli(ctx: click.Context, state_path: Path, configfs: Path, socket: Path, pools_root: Path | None, offline: bool,
        as_json: bool, verbose: bool) -> None:
    """Control the Linux in-kernel NVMe-oF target (nvmet): VMs, disks, pools and the declarative target tree.

    Every command goes through the nvmetd service, the one writer of configfs and of the state file. With
    --offline, apply/diff/repair/restore/status/import/export/shell run nvmetd's code here instead (as root),
    only while nvmetd is stopped.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(name)s: %(message)s")
    ctx.obj = Context(state_path, configfs, as_json, socket, pools_root, offline)


@cli.command()
@click.argument("file", type=click.Path(allow_dash=True))
@click.option("--dry-run", is_flag=True, help="only show the changes")
@click.pass_obj
def apply(obj: Context, file: str, dry_run: bool) -> None:
    """Make FILE (nvmetd target JSON) the desired state and apply it to the kernel."""
    state = _read_json(file)
    if isinstance(state, dict) and any(isinstance(s, dict) and str(s.get("nqn", "")).startswith(VM_PREFIX)
                                       for s in state.get("subsystems", []) or []):
        raise click.UsageError(f"subsystem names starting with {VM_PREFIX} are reserved for nvmetd's VMs")
    if dry_run:
        changes = obj.target("plan", state)["changes"]
        obj.emit({"changes": changes}, "\n".join(changes) or "nothing to do")
        return
    _emit_result(obj, obj.target("apply", state))


@cli.command(name="diff")
@click.pass_obj
def diff_cmd(obj: Context) -> None:
    """Show what differs between the desired state and the live kernel (exit 1 if anything does)."""
    changes = obj.target("drift")["drift"]
    obj.emit({"drift": changes}, "\n".join(changes) or "no drift: the kernel matches the desired state")
    if changes:
        sys.exit(EXIT_NOT_CONVERGED)


@cli.command()
@click.pass_obj
def repair(obj: Context) -> None:
    """Re-apply the desired state, undoing hand edits of configfs."""
    _emit_result(obj, obj.target("repair"))


@cli.command(name="restore")
@click.option("--timeout", type=click.FloatRange(0, 3600), default=120.0, show_default=True,
              help="seconds to wait for missing devices and addresses")
@click.pass_obj
def restore_cmd(obj: Context, timeout: float) -> None:
    """Boot-time restore: apply what is ready, wait for late devices and addresses, never wipe."""
    _emit_result(obj, obj.target("restore", {"timeout": timeout}))


@cli.command()
@click.pass_obj
def status(obj: Context) -> None:
    """Summarise the desired state, the live tree and the drift between them."""
    data = obj.target("status")
    d, live = data["desired"], data["live"]
    text = (f"desired: {d['subsystems']} subsystems, {d['namespaces']} namespaces, "
            f"{d['ports']} ports, {d['hosts']} hosts (generation {data['generation']})\n"
            f"live:    {live['subsystems']} subsystems, {live['namespaces']} namespaces "
            f"({live['enabled_namespaces']} enabled), {live['ports']} ports, {live['hosts']} hosts\n"
            f"drift:   {data['drift']} change(s) needed" + (" — run `nvmetctl diff`" if data["drift"] else "")
            + _health_text(data.get("health", [])))
    obj.emit(data, text)


def _health_text(rows: list[dict]) -> str:
    bad = [r for r in rows if r["state"] != "ok"]
    text = f"\nhealth:  {len(rows) - len(bad)} of {len(rows)} enabled namespaces answer"
    for r in bad:
        text += f"\n  {r['subsystem']} nsid {r['nsid']}: {r['state']}: {r['detail']}"
    return text


@cli.command(name="export")
@click.option("--nvmetcli", "nvmetcli_fmt", is_flag=True, help="nvmetcli config.json format")
@click.option("--live", is_flag=True, help="export the live kernel tree instead of the desired state")
@click.option("--with-secrets", is_flag=True, help="include the DH-CHAP keys (with -o, the file is made 0600)")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="write to this file")
@click.pass_obj
def export_cmd(obj: Context, nvmetcli_fmt: bool, live: bool, with_secrets: bool, output: Path | None) -> None:
    """Print the desired (or live) state as nvmetd JSON or nvmetcli JSON, without DH-CHAP keys unless
    --with-secrets."""
    result = obj.target("export", query={"live": live, "nvmetcli": nvmetcli_fmt, "with_secrets": with_secrets})
    text = json.dumps(result["config"], indent=2, sort_keys=True) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps no wider mode
        with os.fdopen(fd, "w") as f:
            f.write(text)
    if result["secrets_omitted"]:
        click.echo(f"nvmetctl: {result['secrets_omitted']} DH-CHAP key(s) left out; --with-secrets includes "
                   "them", err=True)
    elif with_secrets:
        click.echo("nvmetctl: the output holds the DH-CHAP keys" + (f" ({output} is 0600)" if output else ""),
                   err=True)


@cli.command(name="import")
@click.argument("file", type=click.Path(allow_dash=True))
@click.option("--nvmetcli", "nvmetcli_fmt", is_flag=True, required=True, help="FILE is nvmetcli config.json")
@click.option("--no-apply", is_flag=True, help="only store it as the desired state")
@click.pass_obj
def import_cmd(obj: Context, file: str, nvmetcli_fmt: bool, no_apply: bool) -> None:
    """Take an nvmetcli config.json as the desired state (and apply it)."""
    result = obj.target("import", _read_json(file), {"apply": not no_apply})
    if no_apply:
        obj.emit(result, f"imported {result['subsystems']} subsystems as the desired state")
        return
    _emit_result(obj, result)


class _ApiTree:
    """The shell's view of the target through nvmetd's API."""

    def __init__(self, obj: Context) -> None:
        self.obj = obj

    def live(self):  # a TargetState, imported only here
        from target.model import parse_state

        return parse_state(self.obj.target("export", query={"live": True})["config"])

    def drift(self) -> list[str]:
        return self.obj.target("drift")["drift"]

    def repair(self) -> dict[str, Any]:
        return self.obj.target("repair")


@cli.command()
@click.option("-c", "--command", "commands", multiple=True, help="run these shell commands and exit")
@click.pass_obj
def shell(obj: Context, commands: tuple[str, ...]) -> None:
    """Interactive tree of the live target (ls, cd, info, diff, repair), like nvmetcli's."""
    from nvmetd import shell as shell_mod

    if not obj.offline:
        shell_mod.run(_ApiTree(obj), list(commands) or None)
        return
    from nvmetd import offline

    with offline.session(obj.state_path, obj.socket, obj.configfs_root, obj.pools_root) as ops:
        shell_mod.run(shell_mod.Local(ops._cfs(), ops.desired), list(commands) or None)


def _kv(data: dict[str, Any]) -> str:
    return "\n".join(f"{k}: {' '.join(map(_item, v)) if isinstance(v, list) else v}" for k, v in data.items())


def _item(value: Any) -> str:
    """A list entry on one line: multipath's paths are dicts (address, port, ANA state)."""
    return ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value)


@cli.command()
@click.argument("vm")
@click.argument("disk")
@click.option("--transport", type=click.Choice(["auto", "tcp", "rdma", "loop", "vhost", "dpu"]), default="auto",
              show_default=True)
@click.option("--dpu", help="dpu: the DPU's OPI endpoint (unix:/path or address:port); default [dpu] endpoint")
@click.option("--vm-uuid", help="the VM's UUID (its host NQN derives from it); new VMs get a random one")
@click.option("--qmp", "qmp_socket", type=click.Path(), help="hot-plug into this running QEMU (QMP socket)")
@click.option("--qmp-bus", help="with --qmp: the PCIe root port to plug into (a q35 root bus is not hot-pluggable)")
@click.option("--memory", help="vhost: the VM's RAM size (512M, 4G), to include the shared memory backend "
              "in the QEMU arguments")
@click.option("--tls", is_flag=True, help="tcp: export on the TLS port (TLS 1.3 PSK required, DH-CHAP as well); "
              "the answer names the PSK file for the host")
@click.option("--multipath", is_flag=True, help="tcp: two ports, ANA optimized and non-optimized, for the "
              "host's native NVMe multipath (the paths are printed)")
@click.pass_obj
def attach(obj: Context, vm: str, disk: str, transport: str, dpu: str | None, vm_uuid: str | None,
           qmp_socket: str | None, qmp_bus: str | None, memory: str | None, tls: bool, multipath: bool) -> None:
    """Give VM the disk DISK (safe to repeat). Prints how to hand it to QEMU.

    With --transport vhost the disk becomes a namespace of the VM's vhost-user-nvme controller, served by
    nvmetd's engine from the VM's shared memory, or (when nvmet-vhost loads, `[vhost] backend`) by the kernel's
    NVMe target itself, QEMU opening /dev/vhost-nvme: the output says which and why, with the QEMU arguments."""
    result = obj.call("PUT", ("v1", "vms", vm, "disks", disk),
                      {"transport": transport, "vm_uuid": vm_uuid, "memory": memory, "dpu": dpu, "tls": tls,
                       "multipath": multipath})
    if qmp_socket and result.get("vhost_backend") == "kernel":
        raise SystemExit(_fail("--qmp does not hot-plug the kernel back-end's device yet (the disk is attached): "
                               "start QEMU with the printed -device, or detach and use [vhost] backend = engine",
                               EXIT_USAGE))
    if qmp_socket and result["transport"] in ("vhost", "dpu"):
        from nvmetd import qmp

        try:
            from nvmetd.vms import vhost_device_id

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
                from nvmetd.vms import vhost_device_id

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


@disk.command("snapshot-delete")
@click.argument("name")
@click.argument("snapshot")
@click.pass_obj
def disk_snapshot_delete(obj: Context, name: str, snapshot: str) -> None:
    """Delete a snapshot of a disk (refused while a clone depends on it)."""
    result = obj.call("DELETE", ("v1", "disks", name, "snapshots", snapshot))
    obj.emit(result, f"deleted {name}@{snapshot}")


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


@disk.command("limits")
@click.argument("name")
@click.option("--riops", type=click.IntRange(min=0), help="read IOPS (0 removes the limit)")
@click.option("--wiops", type=click.IntRange(min=0), help="write IOPS (0 removes the limit)")
@click.option("--rmbps", type=click.IntRange(min=0), help="read MB/s, 10^6 bytes (0 removes the limit)")
@click.option("--wmbps", type=click.IntRange(min=0), help="write MB/s, 10^6 bytes (0 removes the limit)")
@click.option("--rwiops", type=click.IntRange(min=0), help="reads + writes IOPS: disks the vhost engine serves")
@click.option("--rwmbps", type=click.IntRange(min=0), help="reads + writes MB/s: disks the vhost engine serves")
@click.pass_obj
def disk_limits(obj: Context, name: str, **limits: int | None) -> None:
    """Set I/O limits of disk NAME, enforced at once on the running disk (options not given are kept)."""
    result = obj.call("PUT", ("v1", "disks", name, "limits"), limits)
    obj.emit(result, _kv({"disk": name, **result["limits"]}) if result["limits"] else f"{name}: no limits")


@cli.group()
def pool() -> None:
    """Create, list, show and destroy the pools disks live in."""


@pool.command("create")
@click.argument("name")
@click.argument("devices", nargs=-1)
@click.option("--kind", type=click.Choice(["file", "lvm", "zfs", "nullblk"]), required=True,
              help="file: DEVICES is one empty directory; lvm, zfs: block devices; nullblk: none (RAM)")
@click.option("--fill-threshold", type=click.FloatRange(0, 100, min_open=True), default=90.0, show_default=True,
              help="percent full at which new allocations are refused")
@click.option("--capacity", help="file, nullblk: a budget, e.g. 10G")
@click.option("--thin-pool-percent", type=click.IntRange(1, 95), help="lvm: the VG's share for thin LVs")
@click.option("--layout", type=click.Choice(["stripe", "mirror"]),
              help="zfs, lvm: stripe (default) or mirror (the pool survives the loss of all but one device)")
@click.pass_obj
def pool_create(obj: Context, name: str, devices: tuple[str, ...], kind: str, fill_threshold: float,
                capacity: str | None, thin_pool_percent: int | None, layout: str | None) -> None:
    body: dict[str, Any] = {"name": name, "kind": kind, "devices": [os.path.abspath(d) for d in devices],
                            "fill_threshold": fill_threshold}
    if capacity is not None:
        body["capacity"] = capacity
    if thin_pool_percent is not None:
        body["thin_pool_percent"] = thin_pool_percent
    if layout is not None:
        body["layout"] = layout
    result = obj.call("POST", ("v1", "pools"), body)
    obj.emit(result, _kv(result))


@pool.command("list")
@click.pass_obj
def pool_list(obj: Context) -> None:
    pools = obj.call("GET", ("v1", "pools"))
    rows = [f"{p['name']:16} {p['kind']:8} {p['fill_percent']:>6}% {p['volumes']:>7}  {','.join(p['disks']) or '-'}"
            for p in pools]
    obj.emit(pools, "\n".join([f"{'NAME':16} {'KIND':8} {'FULL':>7} {'VOLUMES':>7}  DISKS", *rows]))


@pool.command("show")
@click.argument("name")
@click.pass_obj
def pool_show(obj: Context, name: str) -> None:
    result = obj.call("GET", ("v1", "pools", name))
    obj.emit(result, _kv(result))


@pool.command("repair")
@click.argument("name")
@click.pass_obj
def pool_repair(obj: Context, name: str) -> None:
    """Put a mirror's drives that are back (re-plugged) online again; ZFS resilvers them."""
    result = obj.call("POST", ("v1", "pools", name, "repair"))
    obj.emit(result, _kv(result))


@pool.command("destroy")
@click.argument("name")
@click.pass_obj
def pool_destroy(obj: Context, name: str) -> None:
    """Destroy a pool that holds no disks."""
    obj.emit(obj.call("DELETE", ("v1", "pools", name)), f"destroyed pool {name}")


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


@vm.command("rotate-psk")
@click.argument("name")
@click.pass_obj
def vm_rotate_psk(obj: Context, name: str) -> None:
    """A new TLS PSK for VM NAME (connected hosts stay up; new connections need the new key file)."""
    result = obj.call("POST", ("v1", "vms", name, "tls-key"))
    obj.emit(result, _kv(result))


_json_everywhere(cli)


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, argv, "nvmetctl", "nvmetctl")


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
