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

from nvmetd.errors import EXIT_NOT_CONVERGED, EXIT_SYSTEM, EXIT_USAGE
from target.apply import ApplyResult, apply_state, diff
from target.configfs import NVMET_ROOT, ConfigFS, ConfigfsError
from target.features import FeatureError, load_modules, require
from target.live import read_state
from target.model import StateError, TargetState, parse_state
from target.nvmetcli import export_config, import_config
from target.restore import restore
from target.store import DEFAULT_PATH, StateStore, StoreError, set_target


class Context:
    def __init__(self, state: Path, configfs: Path, as_json: bool) -> None:
        self.store = StateStore(state)
        self.configfs_root = configfs
        self.as_json = as_json

    def cfs(self) -> ConfigFS:
        cfs = ConfigFS(self.configfs_root)
        if not cfs.exists() and self.configfs_root == NVMET_ROOT:
            load_modules(TargetState())
        if not cfs.exists():
            raise SystemExit(_fail(f"{self.configfs_root} does not exist: this kernel has no nvmet "
                                   "(modprobe nvmet failed or configfs is not mounted)", EXIT_SYSTEM))
        return cfs

    def emit(self, data: Any, text: str) -> None:
        click.echo(json.dumps(data, indent=2, sort_keys=True) if self.as_json else text)


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
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("-v", "--verbose", is_flag=True, help="log each configfs change")
@click.pass_context
def cli(ctx: click.Context, state_path: Path, configfs: Path, as_json: bool, verbose: bool) -> None:
    """Control the Linux in-kernel NVMe-oF target (nvmet) declaratively."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(name)s: %(message)s")
    ctx.obj = Context(state_path, configfs, as_json)


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
    with obj.store.transaction() as doc:
        set_target(doc, state)
        result = apply_state(state, cfs)
    obj.emit(result.to_dict(), _result_text(result))
    if not result.converged:
        sys.exit(EXIT_NOT_CONVERGED)


@cli.command(name="diff")
@click.pass_obj
def diff_cmd(obj: Context) -> None:
    """Show what differs between the desired state and the live kernel (exit 1 if anything does)."""
    changes = diff(obj.store.target(), obj.cfs())
    obj.emit({"drift": changes}, "\n".join(changes) or "no drift: the kernel matches the desired state")
    if changes:
        sys.exit(EXIT_NOT_CONVERGED)


@cli.command()
@click.pass_obj
def repair(obj: Context) -> None:
    """Re-apply the desired state, undoing hand edits of configfs."""
    result = apply_state(obj.store.target(), obj.cfs())
    obj.emit(result.to_dict(), _result_text(result))
    if not result.converged:
        sys.exit(EXIT_NOT_CONVERGED)


@cli.command(name="restore")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="seconds to wait for missing devices and addresses")
@click.pass_obj
def restore_cmd(obj: Context, timeout: float) -> None:
    """Boot-time restore: apply what is ready, wait for late devices and addresses, never wipe."""
    state = obj.store.target()
    load_modules(state)
    result = restore(state, obj.cfs(), timeout=timeout)
    obj.emit(result.to_dict(), _result_text(result))
    if not result.converged:
        sys.exit(EXIT_NOT_CONVERGED)


@cli.command()
@click.pass_obj
def status(obj: Context) -> None:
    """Summarise the desired state, the live tree and the drift between them."""
    desired = obj.store.target()
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
    state = read_state(obj.cfs()) if live else obj.store.target()
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
    result = apply_state(state, cfs)
    obj.emit(result.to_dict(), _result_text(result))
    if not result.converged:
        sys.exit(EXIT_NOT_CONVERGED)


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="nvmetctl", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE
    except click.exceptions.Abort:
        return _fail("aborted", EXIT_USAGE)
    except StateError as exc:
        return _fail(f"invalid state:\n{exc}", EXIT_USAGE)
    except FeatureError as exc:
        return _fail(str(exc), EXIT_SYSTEM)
    except StoreError as exc:
        return _fail(str(exc), EXIT_SYSTEM)
    except ConfigfsError as exc:
        return _fail(str(exc), EXIT_SYSTEM)
    except PermissionError as exc:
        return _fail(f"permission denied: {exc.filename} (nvmetctl needs root)", EXIT_SYSTEM)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
