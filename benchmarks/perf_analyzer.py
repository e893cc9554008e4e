"""Triton's perf_analyzer on the served UNet: installed from package registries, run by the bench.

The binary ships inside the `tritonclient==2.40.0` manylinux wheel (built for glibc <= 2.34;
newer wheels need 2.38). It links two libraries that the wheel does not carry:
`libb64.so.0d` (Debian's libb64-0d) and `libcudart.so.12` (PyPI's nvidia-cuda-runtime-cu12,
only loaded, never used on a CPU). `python -m diffugts.benchmarks.perf_analyzer install`
(`make perf-analyzer`) puts all three under `.tools/perf_analyzer/`.
"""

from __future__ import annotations

import csv
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

TOOLS = Path(".tools") / "perf_analyzer"
WHEEL_MEMBER = "tritonclient-2.40.0.data/data/bin/perf_analyzer"
LIBB64 = "libb64.so.0d"


def binary_path(tools: Path = TOOLS) -> Path:
    return Path(tools) / "bin" / "perf_analyzer"


def library_dirs(tools: Path = TOOLS) -> list[str]:
    """Where libb64 and libcudart are: the tools folder, its pip target, the system's."""
    tools = Path(tools)
    dirs = [str(tools / "lib")]
    dirs += sorted(glob.glob(str(tools / "cuda" / "nvidia" / "*" / "lib")))
    return [d for d in dirs if Path(d).is_dir()]


def environment(tools: Path = TOOLS) -> dict[str, str]:
    env = os.environ.copy()
    env["LD_LIBRARY_PATH"] = ":".join(library_dirs(tools) + [p for p in [env.get("LD_LIBRARY_PATH", "")] if p])
    return env


def missing_reason(tools: Path = TOOLS) -> str | None:
    """None when perf_analyzer starts here; else why not, in one line."""
    binary = binary_path(tools)
    if not binary.is_file():
        return f"{binary} is missing: run `make perf-analyzer`"
    try:
        proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60,
                              env=environment(tools))
    except OSError as exc:
        return f"{binary} cannot start: {exc}"
    text = (proc.stdout + proc.stderr).strip()
    if "error while loading shared libraries" in text or "GLIBC" in text:
        return text.splitlines()[0]
    return None


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def install(tools: Path = TOOLS) -> Path:
    tools = Path(tools)
    (tools / "bin").mkdir(parents=True, exist_ok=True)
    (tools / "lib").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
              "--platform", "manylinux1_x86_64", "--platform", "manylinux2014_x86_64",
              "tritonclient==2.40.0", "-d", tmp])
        wheel = next(Path(tmp).glob("tritonclient-2.40.0-*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(WHEEL_MEMBER) as src, open(binary_path(tools), "wb") as dst:
            shutil.copyfileobj(src, dst)
    binary_path(tools).chmod(0o755)
    if not _system_has(LIBB64):
        # Debian's package, unpacked into the tools folder (no system change beyond apt's cache)
        with tempfile.TemporaryDirectory() as tmp:
            fetch = ["apt-get", "download", "-q", "libb64-0d"]
            if subprocess.run(fetch, cwd=tmp).returncode != 0:  # no package lists yet
                _run(["apt-get", "update", "-qq"])
                subprocess.run(fetch, cwd=tmp, check=True)
            deb = next(Path(tmp).glob("libb64-0d_*.deb"))
            _run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "root")])
            for lib in Path(tmp, "root").rglob(LIBB64 + "*"):
                shutil.copy2(lib, tools / "lib" / LIBB64, follow_symlinks=True)
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tools / "cuda"),
          "nvidia-cuda-runtime-cu12"])
    reason = missing_reason(tools)
    if reason:
        raise RuntimeError(f"perf_analyzer installed but does not start: {reason}")
    return binary_path(tools)


def _system_has(library: str) -> bool:
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    return library in out


def run_unet(url: str, preset, out: Path, concurrency: tuple[int, ...], tools: Path = TOOLS,
             measurement_ms: int = 5000, stability: int = 10, token: str | None = None) -> dict:
    """perf_analyzer against `unet`, zero-filled inputs (its random bytes include NaN, which the
    stage models refuse); the CSV is kept beside the results. perf_analyzer reads the server's
    statistics, which `diffugts serve` restricts: with `token` (and `url` the HTTP address) it goes
    over HTTP with the `diffugts-token` header, since its -H is ignored for gRPC."""
    reason = missing_reason(tools)
    if reason:
        return {"status": "unavailable", "reason": reason}
    lat = preset.latent_patch
    csv_path = Path(out) / "perf_analyzer_unet.csv"
    rows = []
    for c in concurrency:  # one run per level: perf_analyzer's range steps linearly, 1:8 would run 8
        part = csv_path.with_name(f"perf_analyzer_unet_c{c}.csv")
        protocol = ["-i", "http", "-H", f"diffugts-token:{token}"] if token else ["-i", "grpc"]
        cmd = [str(binary_path(tools)), "-m", "unet", "-u", url, *protocol, "--concurrency-range", str(c),
               "--shape", f"latent:{preset.latent_channels},{lat},{lat},{lat}", "--shape", "timestep:1",
               "--input-data", "zero", "--stability-percentage", str(stability), "--max-trials", "20",
               "-f", str(part),
               "--measurement-interval", str(measurement_ms)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=environment(tools))
        if proc.returncode != 0:
            shown = " ".join(cmd).replace(token, "<token>") if token else " ".join(cmd)
            return {"status": "failed", "command": shown, "stderr": (proc.stdout + proc.stderr)[-2000:]}
        rows += parse_csv(part)
        part.unlink()
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"status": "ok", "csv": csv_path.name, "rows": [summary(r) for r in rows]}


def parse_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summary(row: dict) -> dict:
    """A perf_analyzer CSV row -> {concurrency, throughput, p50_us, p95_us}."""
    return {"concurrency": int(row["Concurrency"]), "throughput": float(row["Inferences/Second"]),
            "p50_us": float(row["p50 latency"]), "p95_us": float(row["p95 latency"])}


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m diffugts.benchmarks.perf_analyzer install")
    if missing_reason() is None:
        print(f"{binary_path()} is installed")
        sys.exit(0)
    try:
        print(install())
    except (subprocess.CalledProcessError, RuntimeError, StopIteration, OSError) as exc:
        sys.exit(f"perf_analyzer: not installed: {exc}")
