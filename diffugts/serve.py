"""Run the real `tritonserver` shipped in the `nvidia-pytriton` wheel on a model repository.

The wheel carries the server binary, the Python backend and one backend stub per Python
version; we assemble a backend directory for this interpreter, bind to 127.0.0.1 unless told
otherwise, stream the server log to a file, and stop cleanly.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .server_security import ServerSecurity


class ServerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pytriton_dist() -> Path:
    try:
        import pytriton
    except ImportError:
        raise ServerError("the Triton server needs `pip install diffugts[serve]` (nvidia-pytriton)") from None
    return Path(pytriton.__file__).parent / "tritonserver"


def prepare_backends(workdir: Path) -> Path:
    """backends/python with the stub built for this Python next to libtriton_python.so."""
    dist = pytriton_dist()
    target = workdir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for f in (dist / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, target / f.name)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    shutil.copy2(stub, target / stub.name)
    return workdir / "backends"


def server_env() -> dict[str, str]:
    env = os.environ.copy()
    libs = pytriton_dist().parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    # the stub's embedded interpreter finds this venv (and its packages) through PATH
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


class TritonServer:
    def __init__(self, repository: str | Path, host: str = "127.0.0.1", grpc_port: int = 8001,
                 http_port: int = 8000, metrics_port: int = 8002, log_path: str | Path | None = None,
                 extra_args: list[str] | tuple[str, ...] = (), security: ServerSecurity | None = None):
        self.repository = Path(repository).resolve()
        self.extra_args = list(extra_args)  # passed to tritonserver as they are (after ours)
        self.host = host
        # without a token: loopback only, admin APIs locked (see server_security)
        self.security = security or ServerSecurity()
        self.security.check_bind(host)
        self.grpc_port = grpc_port or free_port(host)
        self.http_port = http_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.log_path = Path(log_path or self.repository.parent / "tritonserver.log").resolve()
        self.process: subprocess.Popen | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self, backends: Path) -> list[str]:
        return [
            str(pytriton_dist() / "bin" / "tritonserver"),
            f"--model-repository={self.repository}", f"--backend-directory={backends}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false",
            "--exit-timeout-secs=10", "--log-verbose=0",
        ] + self.security.triton_flags() + self.extra_args

    def start(self, timeout_s: float = 180.0) -> "TritonServer":
        if not (self.repository / "diffugts_pipeline" / "config.pbtxt").is_file():
            raise ServerError(f"{self.repository}: not a diffugts model repository (run `diffugts export`)")
        self._workdir = tempfile.TemporaryDirectory(prefix="diffugts-triton-")
        backends = prepare_backends(Path(self._workdir.name))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command(backends), stdout=log, stderr=subprocess.STDOUT,
                                        env=server_env(), start_new_session=True)
        log.close()
        self.wait_ready(timeout_s)
        return self

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        errors = [line for line in text if line.startswith("E") or "error" in line.lower()]
        return "\n".join((errors or text)[-lines:])

    @property
    def health_url(self) -> str:
        """Plain HTTP health (never restricted; gRPC may be TLS-only with a certificate we cannot verify)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else "[::1]" if self.host == "::" else self.host
        return f"http://{host}:{self.http_port}/v2/health/ready"

    def wait_ready(self, timeout_s: float) -> None:
        import urllib.request

        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode}; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with direct.open(self.health_url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:  # not listening yet, or not ready (400)
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s; log {self.log_path}:\n{self.log_tail()}")

    def rss_bytes(self) -> int:
        """Resident memory of the server and its backend stub processes (Linux /proc), 0 when stopped."""
        if not self.process or self.process.poll() is not None:
            return 0
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
            children.setdefault(parent, []).append(int(stat.parent.name))
        total, todo = 0, [self.process.pid]
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += sum(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
        return total

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._workdir:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
