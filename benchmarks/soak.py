"""Soak: 1, 2, 4, 8, 16 concurrent batch clients against one local tritonserver, on loopback.

Each client is a thread with its own `TritonExecutor` running the client loop on phantom
volumes back to back for a fixed time per level (the volume in flight at the deadline finishes).
Reported per level: volumes, errors, p50/p95/p99 volume latency, volumes/min, and the server's
RSS (tritonserver and its Python-backend stubs: its process group) before and after; overall,
the RSS growth from the end of a warm-up to the end of the last level. A benchmark, not a test:
it asserts nothing; `errors` should be 0. Linux only (reads /proc)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np

LEVELS = (1, 2, 4, 8, 16)


def group_rss_bytes(pgid: int) -> int:
    """Resident memory of every process in a process group (the server and its backend stubs)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:  # field 5: process group
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):  # the process ended while we looked
            continue
    return total


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    return {f"p{q}": round(float(np.percentile(values, q)), 4) for q in (50, 95, 99)}


def run_level(url: str, clients: int, seconds: float, volumes: list, prompts: list[str],
              at_least: int = 0) -> dict:
    from diffugts.client.triton_executor import TritonExecutor
    from diffugts.pipeline import run_segmentation

    latencies, errors, lock = [], [], threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        executor = TritonExecutor(url)
        n = index
        try:
            while time.monotonic() < deadline or n - index < at_least:
                volume, prompt = volumes[n % len(volumes)], prompts[n % len(prompts)]
                start = time.perf_counter()
                try:
                    run_segmentation(executor, volume, prompt)
                except Exception as exc:  # counted and reported: the soak's pass criterion is zero
                    with lock:
                        errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                else:
                    with lock:
                        latencies.append(time.perf_counter() - start)
                n += 1
        finally:
            executor.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), name=f"soak-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    return {"clients": clients, "seconds": round(wall, 2), "volumes": len(latencies), "errors": len(errors),
            "error_samples": sorted(set(errors))[:5], "volumes_per_min": round(60 * len(latencies) / wall, 2),
            "latency_s": percentiles(latencies)}


def run_soak(out: str | Path = "soak_out", preset: str = "tiny", seconds: float = 60.0,
             levels: tuple[int, ...] = LEVELS, say=print) -> dict:
    from diffugts.export import build_repository, is_repository
    from diffugts.io import read_volume
    from diffugts.phantom import write_dataset
    from diffugts.serve import TritonServer

    out = Path(out)
    repository = out / f"repository_{preset}"
    if not is_repository(repository):
        say(f"exporting the {preset} preset to {repository}")
        build_repository(repository, preset)
    data = write_dataset(out / "phantoms", 4, seed=5, categories=["kidney tumor", "liver cyst", "lung nodule",
                                                                  "brain tumor"], shape=(40, 36, 32), spacing=4.0)
    cases = json.loads((data / "dataset.json").read_text())["test"]
    volumes = [read_volume(data / c["image"]) for c in cases]
    prompts = [c["prompt"] for c in cases]
    result = {"preset": preset, "seconds_per_level": seconds, "cpus": os.cpu_count(), "levels": []}
    with TritonServer(repository, grpc_port=0, http_port=0, metrics_port=0,
                      log_path=out / "tritonserver.log") as server:
        pgid = server.process.pid
        result["rss_start_mb"] = round(group_rss_bytes(pgid) / 2**20, 1)
        say(f"warm-up: one client, {len(volumes)} volumes")
        warmup = run_level(server.grpc_url, 1, 0.0, volumes, prompts, at_least=len(volumes))
        result["warmup_errors"] = warmup["errors"]
        warm = group_rss_bytes(pgid)
        result["rss_after_warmup_mb"] = round(warm / 2**20, 1)
        for clients in levels:
            before = group_rss_bytes(pgid)
            level = run_level(server.grpc_url, clients, seconds, volumes, prompts)
            after = group_rss_bytes(pgid)
            level.update(rss_before_mb=round(before / 2**20, 1), rss_after_mb=round(after / 2**20, 1))
            result["levels"].append(level)
            lat = level["latency_s"]
            say(f"{clients:2d} clients: {level['volumes']} volumes, {level['errors']} errors, "
                f"p50 {lat['p50']} s p95 {lat['p95']} s p99 {lat['p99']} s, "
                f"RSS {level['rss_before_mb']} -> {level['rss_after_mb']} MB")
        end = group_rss_bytes(pgid)
    result["rss_end_mb"] = round(end / 2**20, 1)
    result["rss_growth_after_warmup_mb"] = round((end - warm) / 2**20, 1)
    result["errors"] = sum(level["errors"] for level in result["levels"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    return result
