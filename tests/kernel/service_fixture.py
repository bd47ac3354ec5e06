"""Run a real nvmetd process for kernel tests, with its own state, socket, keys and pools."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Daemon:
    base: Path
    proc: subprocess.Popen | None = None
    log: list[Path] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)  # more nvmetd options, e.g. --vhost-dir
    env: dict[str, str] = field(default_factory=dict)  # extra environment (NOTIFY_SOCKET, WATCHDOG_USEC)

    @property
    def socket(self) -> Path:
        return self.base / "nvmetd.sock"

    @property
    def pools_root(self) -> Path:
        return self.base / "pools"

    @property
    def state(self) -> Path:
        return self.base / "state.json"

    def start(self, restore_timeout: float = 5.0, deadline: float = 300.0) -> None:
        logfile = self.base / f"nvmetd-{len(self.log)}.log"
        self.log.append(logfile)
        env = {**os.environ, "NVMETD_BACKENDS_DIR": str(self.pools_root), **self.env}
        with open(logfile, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nvmetd.service", "--state", str(self.state), "--socket", str(self.socket),
                 "--pools-root", str(self.pools_root), "--keys-dir", str(self.base / "keys"),
                 "--drift-interval", "3600", "--restore-timeout", str(restore_timeout),
                 "--config", str(self.base / "nvmetd.toml"), *self.extra_args],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        limit = deadline
        deadline = time.monotonic() + limit  # Python start-up of a FastAPI app under TCG on a busy host
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nvmetd exited: {logfile.read_text()}")
            try:
                self.request("GET", "/v1/status")
                return
            except (httpx.HTTPError, OSError):
                time.sleep(0.2)
        raise AssertionError(f"nvmetd did not answer within {limit:g} s: {logfile.read_text()}")

    def wait_converged(self, timeout: float = 600.0) -> dict:
        """The start-up restore runs beside the API, which answers first: its result, once there (converged, or
        the assertion says what is not). The bound only stops a hung restore."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.request("GET", "/v1/status").json()
            if status["reconcile"] is not None:
                assert status["reconcile"]["converged"], status["reconcile"]
                return status
            # a failed restore leaves no result to wait for (nvmetd stays NOT READY until a drift tick converges)
            assert 'msg="restore failed"' not in self.log_text(), f"nvmetd's restore failed:\n{self.log_text()[-4000:]}"
            assert time.monotonic() < deadline, (f"nvmetd's start-up restore did not finish within {timeout:g} s; "
                                                 f"its children: {self._children()}; its log ends:\n"
                                                 f"{self.log_text()[-4000:]}")
            time.sleep(0.5)

    def _children(self) -> list[str]:
        """What the daemon is waiting on: its child processes' command lines and states."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
                fields = text[text.rindex(")") + 2:].split()
                if self.proc is None or int(fields[1]) != self.proc.pid:
                    continue
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError):
                continue
            found.append(f"{stat.parent.name} [{fields[0]}] {cmd.strip()}")
        return found

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def log_text(self) -> str:
        return self.log[-1].read_text() if self.log else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 300) -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), timeout=timeout) as client:
            return client.request(method, f"http://nvmetd{path}", json=body)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "nvmetd.cli", "--socket", str(self.socket),
                               "--state", str(self.state), *args], capture_output=True, text=True, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"nvmetctl {' '.join(args)}: exit {proc.returncode}: {proc.stderr}")
        return proc

    def ctl_json(self, *args: str) -> dict:
        return json.loads(self.ctl("--json", *args).stdout)
