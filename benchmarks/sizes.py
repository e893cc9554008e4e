"""Bench sections about size: the `maisi` preset (published network sizes, random weights)
exported, served by Triton and run end to end on one volume, with seconds and peak memory per
stage; and the cost curve of the client loop against volume size (1, 8, 27 sliding windows)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from diffugts.io import Volume
from diffugts.phantom import CATEGORIES, make_case
from diffugts.stages import ONNX_STAGES
from diffugts.windows import window_slices

from .real_size import peak_rss_mb


def phantom_volume(preset, shape, seed: int = 11, category: str = "kidney tumor") -> tuple[Volume, np.ndarray]:
    """A phantom on the preset's own grid (no resampling): `shape` model voxels."""
    spacing = preset.spacing[0]
    image, label, _ = make_case(np.random.default_rng(seed), CATEGORIES[category], tuple(shape), spacing)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    return Volume(image, affine), label.astype(bool)


def window_count(preset, shape) -> int:
    padded = [max(n, preset.patch) for n in shape]
    return sum(1 for _ in window_slices(tuple(padded), preset.patch, preset.window_overlap))


def shape_for_windows(preset, per_axis: int) -> tuple[int, int, int]:
    """The smallest cube that the sliding window covers with `per_axis` windows per axis."""
    interval = max(int(preset.patch * (1 - preset.window_overlap)), 1)
    side = preset.patch + (per_axis - 1) * interval
    return (side, side, side)


def stage_processes(server_pid: int) -> dict[str, int]:
    """Triton's Python-backend stub process of each stage model: {stage: pid}."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid != server_pid or "triton_python_backend_stub" not in cmdline:
            continue
        for stage in ONNX_STAGES:
            if f"/{stage}/" in cmdline:
                found[stage] = int(entry.name)
    return found


def peak_rss_of(pid: int) -> float:
    """VmHWM (peak resident set) of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def run_maisi(out: Path, preset_name: str = "maisi", shape=None, say=print) -> dict:
    """Export the preset (random weights where none are bundled), serve it, segment one volume
    (one sliding window) through the client loop: seconds per stage, peak RSS per stage model."""
    from diffugts.client.triton_executor import TritonExecutor
    from diffugts.config import get_preset
    from diffugts.export import build_repository
    from diffugts.metrics import dice
    from diffugts.pipeline import run_segmentation
    from diffugts.serve import TritonServer

    out = Path(out)
    preset = get_preset(preset_name)
    say(f"{preset_name}: exporting (random weights)")
    start = time.perf_counter()
    repo = build_repository(out / f"repo_{preset_name}", preset_name)
    export_s = time.perf_counter() - start
    export_rss = peak_rss_mb()
    shape = tuple(shape or (preset.patch, preset.patch, preset.patch * 3 // 4))
    volume, truth = phantom_volume(preset, shape)
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0,
                      log_path=out / f"tritonserver_{preset_name}.log") as server:
        say(f"{preset_name}: one volume {shape} through the client loop")
        client = TritonExecutor(server.grpc_url)
        start = time.perf_counter()
        seg = run_segmentation(client, volume, "kidney tumor", "CT")
        total = time.perf_counter() - start
        client.close()
        stubs = stage_processes(server.process.pid)
        stage_rss = {stage: peak_rss_of(pid) for stage, pid in sorted(stubs.items())}
        server_rss = peak_rss_of(server.process.pid)
    seconds = {k: float(v) for k, v in seg.timings.items() if k != "total"}
    seconds["total"] = total
    return {"preset": preset_name, "shape": list(shape), "windows": window_count(preset, shape),
            "export_s": export_s, "export_peak_rss_mb": export_rss, "seconds": seconds,
            "peak_rss_mb": {"stage_models": stage_rss, "tritonserver": server_rss, "client": peak_rss_mb()},
            "dice_random_weights": float(dice(seg.mask, truth)), "stage_runtime": _engines(repo)}


def _engines(repo: Path) -> dict[str, str]:
    import json

    report = json.loads((repo / "export_report.json").read_text())
    return {stage: entry["engine"] for stage, entry in report.get("stage_runtime", {}).items()}


def cost_curve(executor, preset, windows_per_axis=(1, 2, 3), repeats: int = 1) -> list[dict]:
    """End-to-end seconds of the loop on phantoms covered by 1, 8, 27 windows."""
    from diffugts.pipeline import run_segmentation

    rows = []
    for k in windows_per_axis:
        shape = shape_for_windows(preset, k)
        volume, _ = phantom_volume(preset, shape, seed=20 + k)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run_segmentation(executor, volume, "kidney tumor", "CT")
            times.append(time.perf_counter() - start)
        rows.append({"windows": window_count(preset, shape), "shape": list(shape), "seconds": float(np.median(times)),
                     "voxels": int(np.prod(shape))})
    return rows
