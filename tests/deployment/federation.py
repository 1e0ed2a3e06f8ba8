"""A real federation on 127.0.0.1 for tests: SuperLink (TLS, node auth) + SuperNodes, stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedseg.common.credentials import write_node_key, write_server_certificates

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Federation:
    """Processes of one loopback federation; ``stop()`` ends every one of them."""

    work: Path
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.certs = self.work / "certs"
        write_server_certificates(self.certs, ["127.0.0.1"])
        self.home = self.work / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "fedseg"\n\n[superlink.fedseg]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs / "ca.crt"}"\n')
        self.env = {**os.environ, "FLWR_HOME": str(self.home),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, cwd=self.work, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        self._start("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(self.certs / "ca.crt"),
            "--ssl-certfile", str(self.certs / "server.pem"), "--ssl-keyfile", str(self.certs / "server.key"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port), "--database", str(self.work / "state.db")])
        self.wait_for(lambda: port_open(self.port), 60, "SuperLink to listen")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def start_run(self, run_config: str) -> subprocess.Popen:
        """`flwr run . fedseg --stream` in the background; its output goes to flwr-run.log."""
        proc = self._start("flwr-run", ["flwr", "run", str(ROOT), "fedseg", "--stream",
                                        "--run-config", run_config])
        return proc

    def restart_supernode(self, name: str, *args: Path, timeout: float = 240) -> float:
        """Start a SuperNode again, retrying while the SuperLink still holds its old session (as a
        container's restart policy would); returns seconds until the SuperLink activated it."""
        start, activated = time.monotonic(), self.log_of("superlink").count("Activated node_id")
        while time.monotonic() - start < timeout:
            proc = self.start_supernode(name, *args)
            while proc.poll() is None:
                if self.log_of("superlink").count("Activated node_id") > activated:
                    return time.monotonic() - start
                time.sleep(0.5)
            self.procs.pop(name)
            time.sleep(2)
        raise TimeoutError(f"{name} could not rejoin within {timeout:.0f}s\n{self.logs()}")

    def node_key(self, name: str, register: bool = True) -> Path:
        private, public = write_node_key(self.work / "keys", name)
        if register:
            out = self.flwr("supernode", "register", str(public), "fedseg", "--name", name)
            assert out.returncode == 0, out.stdout + out.stderr
        return private

    def start_supernode(self, name: str, key: Path, site_dir: Path, state_dir: Path,
                        extra_config: str = "", via_port: int | None = None) -> subprocess.Popen:
        """A SuperNode for ``site_dir``; ``via_port``: reach the SuperLink through a relay there."""
        node_config = f"site-dir='{site_dir}' state-dir='{state_dir}' {extra_config}".strip()
        return self._start(name, [
            "flower-supernode", "--root-certificates", str(self.certs / "ca.crt"),
            "--superlink", f"127.0.0.1:{via_port or self.port}", "--auth-supernode-private-key", str(key),
            "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", node_config])

    def log_of(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=15)

    def logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.work.glob("*.log")))

    def wait_for(self, check, timeout: float, what: str) -> None:
        """Poll ``check`` until true; on timeout fail with every process's log."""
        wait_until(check, timeout, what, self.logs)


def wait_until(check, timeout: float, what: str, details=lambda: "") -> None:
    """Poll ``check`` every 0.5 s until true; on timeout fail with ``details()``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f}s for {what}\n{details()}")
        time.sleep(0.5)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
