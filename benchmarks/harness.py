"""`diffugts bench`: every executor on the same phantom volumes, in one run, on this machine.

Latency (p50/p95 per stage and end to end, after warm-up) for torch eager, ONNX Runtime in
process, Triton with the client loop, and Triton BLS; throughput at 1-8 concurrent clients
with dynamic batching on and off; shared memory on and off; latent cropping on and off with
its Dice change; inpainting steps against Dice; perf_analyzer on the UNet; FLOPs per stage
against the machine's matmul peak. Numbers come from here, never from timed unit tests.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffugts.io import read_volume
from diffugts.metrics import dice
from diffugts.pipeline import LoopOptions, run_segmentation

STAGES = ("preprocess", "encode", "attention", "inpaint", "score", "postprocess")


@dataclass(frozen=True)
class Plan:
    volumes: int
    repeats: int
    concurrency: tuple[int, ...]
    per_client: int
    steps: tuple[int, ...]
    unet_requests: int
    windows_per_axis: tuple[int, ...] = (1, 2, 3)  # cost curve: 1, 8, 27 sliding windows
    real_size_shape: tuple[int, int, int] = (512, 512, 300)
    int8: bool = True
    maisi: bool = True
    flops_rounds: int = 5  # per stage: a peak read, then its timed calls


FULL = Plan(volumes=4, repeats=5, concurrency=(1, 2, 4, 8), per_client=2, steps=(2, 5, 10, 20), unet_requests=20)
QUICK = Plan(volumes=1, repeats=1, concurrency=(1, 2), per_client=1, steps=(2, 4), unet_requests=4,
             windows_per_axis=(1,), real_size_shape=(96, 96, 60), int8=False, maisi=False, flops_rounds=1)


def percentiles(values) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)), "n": int(arr.size)}


def describe_machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "system": f"{platform.system()} {platform.release()}",
            "model_name": next((line.split(":", 1)[1].strip() for line in
                                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                               "unknown") if Path("/proc/cpuinfo").exists() else "unknown"}


def interleaved(names: list[str], cases, repeats: int):
    """(name, case) in the order the executors run: each case on every executor in turn, the one
    that goes first rotating from run to run."""
    for run in range(repeats * len(cases)):
        first = run % len(names)
        for name in names[first:] + names[:first]:
            yield name, cases[run % len(cases)]


def measure_latencies(executors: dict, cases, repeats: int, options: LoopOptions | None = None) -> dict:
    """Latency of several executors on the same cases, interleaved: every case runs on every
    executor in turn, the executor that goes first rotating from run to run.

    The host's speed drifts by tens of percent between minutes (torch eager's end to end read
    1.71 and 2.47 s within the same hour, same code). Timed one executor after another, minutes
    apart, that drift lands in their ratios; interleaved, it hits every executor alike."""
    for executor in executors.values():  # warm-up
        run_segmentation(executor, cases[0][0], cases[0][2], cases[0][3], options)
    names = list(executors)
    end_to_end = {n: [] for n in names}
    stages = {n: {s: [] for s in STAGES} for n in names}
    for name, (volume, _, prompt, modality) in interleaved(names, cases, repeats):
        start = time.perf_counter()
        seg = run_segmentation(executors[name], volume, prompt, modality, options)
        end_to_end[name].append(time.perf_counter() - start)
        for s in STAGES:
            stages[name][s].append(seg.timings.get(s, 0.0))
    report = {}
    for name in names:
        e2e = percentiles(end_to_end[name])
        report[name] = {"end_to_end_p50_s": e2e["p50"], "end_to_end_p95_s": e2e["p95"], "runs": e2e["n"],
                        "end_to_end_s": end_to_end[name],  # run by run, the same volume at the same index
                        "stages": {s: percentiles(v) for s, v in stages[name].items()}}
    return report


def paired_ratio(report: dict, numerator: str, denominator: str) -> float:
    """Median over runs of one executor's seconds over another's on the same volume in the same
    run: unlike a ratio of p50s, it cannot fall between volumes of different cost."""
    pairs = zip(report[numerator]["end_to_end_s"], report[denominator]["end_to_end_s"])
    return float(np.median([a / b for a, b in pairs]))


def measure_latency(executor, cases, repeats: int, options: LoopOptions | None = None) -> dict:
    return measure_latencies({"executor": executor}, cases, repeats, options)["executor"]


def run_concurrently(client, concurrency: int) -> float:
    """Run `client` in `concurrency` threads at once; wall seconds until the last one ends."""
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def measure_throughput(make_executor, cases, concurrency: int, per_client: int) -> dict:
    errors = []

    def client():
        executor = make_executor()
        try:
            for i in range(per_client):
                volume, _, prompt, modality = cases[i % len(cases)]
                run_segmentation(executor, volume, prompt, modality)
        except Exception as exc:  # recorded, not raised: one failed client must not hide the others
            errors.append(str(exc))
        finally:
            executor.close()

    wall = run_concurrently(client, concurrency)
    return {"concurrency": concurrency, "volumes": concurrency * per_client, "seconds": wall,
            "volumes_per_minute": 60.0 * concurrency * per_client / wall, "errors": errors}


def unet_load(url: str, preset, concurrency: int, requests: int) -> dict:
    """Our own load generator on the UNet (perf_analyzer's view, when it cannot run here)."""
    from diffugts.client.triton_executor import TritonExecutor

    latencies, lock = [], threading.Lock()
    latent = np.random.default_rng(0).standard_normal(
        (1, preset.latent_channels) + (preset.latent_patch,) * 3).astype(np.float32)

    def client():
        ex = TritonExecutor(url)
        for _ in range(requests):
            start = time.perf_counter()
            ex.unet(latent, 500.0)
            with lock:
                latencies.append(time.perf_counter() - start)
        ex.close()

    wall = run_concurrently(client, concurrency)
    return {"concurrency": concurrency, "inferences_per_s": len(latencies) / wall,
            "latency_p50_ms": 1e3 * float(np.percentile(latencies, 50)),
            "latency_p95_ms": 1e3 * float(np.percentile(latencies, 95))}


def run_perf_analyzer(repository: Path, preset, out: Path, concurrency: tuple[int, ...], say=print) -> dict:
    """perf_analyzer on the UNet (`make perf-analyzer` installs it), against a server of its own
    with a token: perf_analyzer reads the statistics, which `diffugts serve` keeps behind the token.
    Where it cannot run, one line says why and the bench's own load generator (`unet_load`) stands in."""
    from diffugts.serve import TritonServer
    from diffugts.server_security import ServerSecurity

    from .perf_analyzer import missing_reason, run_unet

    if missing_reason() is not None:
        result = run_unet("", preset, out, concurrency)
    else:
        security = ServerSecurity.from_files(Path(out) / "perf_analyzer.token")
        with TritonServer(repository, grpc_port=0, http_port=0, metrics_port=0,
                          log_path=Path(out) / "tritonserver_perf_analyzer.log", security=security) as server:
            result = run_unet(f"{server.host}:{server.http_port}", preset, out, concurrency, token=security.token)
    if result["status"] != "ok":
        why = result.get("reason") or (result.get("stderr", "").strip().splitlines() or ["no output"])[-1]
        say(f"perf_analyzer {result['status']}: {why}; the UNet load figures come from the bench's own load generator")
    return result


def stage_flops(repository: Path, preset, rounds: int = 5, repeats: int = 5) -> dict:
    """FLOPs per ONNX graph at the loop's shapes, timed in the engine Triton serves the stage with
    (the export's choice; ONNX Runtime where the report names none): fraction of peak.

    The host's speed drifts by up to ~40% between minutes (the same UNet read 38 and 54 ms a call
    within one quarter of an hour), so each stage is timed in `rounds` short rounds, each right
    after its own peak read, and its share is the median of the per-round ratios: the stage and
    the machine measured in the same minute."""
    import json

    from diffugts.export.onnx_export import example_inputs
    from diffugts.export.runtime_choice import median_call_seconds, serving_session
    from diffugts.stages import ONNX_STAGES, stage_specs

    from .flops import graph_flops, machine_peak_gflops

    chosen = json.loads((repository / "export_report.json").read_text()).get("stage_runtime", {})
    specs = stage_specs(preset)
    report = {}
    for stage in ONNX_STAGES:
        path = repository / stage / "1" / "model.onnx"
        inputs = example_inputs(preset, stage)
        flops = graph_flops(str(path), {k: v.shape for k, v in inputs.items()})
        engine = chosen.get(stage, {}).get("engine", "onnxruntime")
        session = serving_session(path.parent, engine, inputs)
        # the calls the loop makes: the stage with all its outputs, and for the UNet also the
        # inpainting steps' call, which reads the prediction alone (the same multiply-adds)
        calls = {stage: [t.name for t in specs[stage].outputs]}
        if stage == "unet":
            calls["unet:prediction"] = ["prediction"]
        for name, outputs in calls.items():
            peaks, seconds = [], []
            for _ in range(rounds):
                peaks.append(machine_peak_gflops(repeats=3))
                seconds.append(median_call_seconds(session, inputs, outputs, repeats))
            shares = [flops / s / 1e9 / p for s, p in zip(seconds, peaks)]
            median_s = float(np.median(seconds))
            report[name] = {"engine": engine, "gflop": flops / 1e9, "median_s": median_s,
                            "gflops": flops / median_s / 1e9, "peak_gflops": float(np.median(peaks)),
                            "fraction_of_peak": float(np.median(shares)),
                            "rounds": [{"peak_gflops": p, "seconds": s} for p, s in zip(peaks, seconds)]}
    return report


def quality_sweeps(executor, cases, steps: tuple[int, ...]) -> tuple[dict, list]:
    """Cropping on/off (inpainting time, Dice) and inpainting steps against Dice.

    The speedup is total inpainting time off / on, over the volumes whose mask is not empty
    (elsewhere both skip the stage in ~2 ms, which says nothing about cropping)."""
    crop = {"per_case": []}
    for enabled in (True, False):
        times, dices = [], []
        for i, (volume, label, prompt, modality) in enumerate(cases):
            seg = run_segmentation(executor, volume, prompt, modality, LoopOptions(crop=enabled))
            times.append(seg.timings.get("inpaint", 0.0))
            dices.append(dice(seg.mask, label))
            if enabled:
                crop["per_case"].append({"prompt": prompt, "inpainted_fraction": seg.inpainted_fraction})
            crop["per_case"][i]["inpaint_s_crop_" + ("on" if enabled else "off")] = times[-1]
        crop["on" if enabled else "off"] = {"inpaint_p50_s": float(np.median(times)), "dice": float(np.mean(dices))}
    ran = [c for c in crop["per_case"] if c["inpainted_fraction"] > 0]
    crop["cases_inpainted"] = len(ran)
    crop["inpaint_speedup"] = (sum(c["inpaint_s_crop_off"] for c in ran) / max(sum(c["inpaint_s_crop_on"] for c in ran), 1e-9)
                               if ran else float("nan"))
    crop["dice_change"] = crop["on"]["dice"] - crop["off"]["dice"]
    sweep = []
    for n in steps:
        dices, times = [], []
        for volume, label, prompt, modality in cases:
            seg = run_segmentation(executor, volume, prompt, modality, LoopOptions(steps=n))
            dices.append(dice(seg.mask, label))
            times.append(seg.timings.get("inpaint", 0.0))
        sweep.append({"steps": n, "dice": float(np.mean(dices)), "inpaint_p50_s": float(np.median(times))})
    return crop, sweep


def load_cases(dataset: Path, n: int):
    manifest = json.loads((dataset / "dataset.json").read_text())["test"][:n]
    return [(read_volume(dataset / e["image"]), read_volume(dataset / e["label"]).array > 0, e["prompt"],
             e["modality"]) for e in manifest]
