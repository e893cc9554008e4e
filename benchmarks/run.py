"""Orchestration of `diffugts bench`: one run, one machine, every executor; JSON, PNG, markdown."""

from __future__ import annotations

import json
import time
from pathlib import Path

from diffugts.config import get_preset
from diffugts.phantom import write_dataset
from diffugts.report import write_json

from .flops import machine_peak_gflops
from .harness import (FULL, QUICK, describe_machine, load_cases, measure_latency, measure_throughput,
                      quality_sweeps, run_perf_analyzer, stage_flops, unet_load)

CATEGORIES = ["liver cyst", "pancreas tumor", "spleen lesion", "kidney tumor"]


def run_bench(preset_name: str = "demo", out: str | Path = "bench_out", quick: bool = False,
              say=print, theta: float | None = None) -> dict:
    """`theta` overrides the inpainting threshold for every executor (server side included), so
    the inpainting loop runs even where the weights' anomaly maps stay below the preset's."""
    from diffugts.client.triton_executor import BlsClient, TritonExecutor
    from diffugts.executors.onnx_executor import OnnxExecutor
    from diffugts.executors.torch_executor import TorchExecutor
    from diffugts.export import build_repository
    from diffugts.export.repository import write_repository
    from diffugts.serve import TritonServer

    plan = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    preset = get_preset(preset_name)
    shape = (preset.patch, preset.patch, preset.patch * 3 // 4)
    data = write_dataset(out / "data", plan.volumes, seed=123, categories=CATEGORIES[: plan.volumes],
                         shape=shape, spacing=preset.spacing[0])
    cases = load_cases(data, plan.volumes)

    say("exporting the model repository")
    overrides = {"anomaly_threshold": theta} if theta is not None else None
    repo = build_repository(out / "repo", preset_name, loop_overrides=overrides)
    torch_ex = TorchExecutor.from_preset(preset_name)
    if overrides:
        torch_ex.preset = torch_ex.preset.with_(**overrides)
    preset = torch_ex.preset  # with the trained scale factor
    # the same graphs and loop settings, without dynamic batching
    repo_static = write_repository(out / "repo_no_batching", preset, "python-ort", repo, dynamic_batching=False)
    onnx_ex = OnnxExecutor.from_repository(repo)
    results = {"machine": describe_machine(), "preset": preset.name, "quick": quick, "plan": plan.__dict__,
               "anomaly_threshold": preset.anomaly_threshold,
               "executors": {}}

    say("latency: torch, onnx")
    results["executors"]["torch"] = measure_latency(torch_ex, cases, plan.repeats)
    results["executors"]["onnx"] = measure_latency(onnx_ex, cases, plan.repeats)
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_path=out / "tritonserver.log") as server:
        url = server.grpc_url
        say("latency: triton, triton-bls, shared memory")
        client = TritonExecutor(url)
        results["executors"]["triton"] = measure_latency(client, cases, plan.repeats)
        client.close()
        shm = TritonExecutor(url, shared_memory=True)
        results["executors"]["triton"]["shared_memory_on"] = measure_latency(shm, cases, plan.repeats)
        shm.close()
        bls = BlsClient(url)
        results["executors"]["triton-bls"] = measure_latency(bls, cases, plan.repeats)
        bls.close()
        say("throughput with dynamic batching")
        results["throughput"] = {"dynamic_batching_on": [
            measure_throughput(lambda: TritonExecutor(url), cases, c, plan.per_client) for c in plan.concurrency]}
        say("UNet load and perf_analyzer")
        results["unet_load"] = [unet_load(url, preset, c, plan.unet_requests) for c in plan.concurrency]
        results["perf_analyzer"] = run_perf_analyzer(url, preset, out, plan.concurrency, say)
    with TritonServer(repo_static, grpc_port=0, http_port=0, metrics_port=0,
                      log_path=out / "tritonserver_no_batching.log") as server:
        say("throughput without dynamic batching")
        results["throughput"]["dynamic_batching_off"] = [
            measure_throughput(lambda: TritonExecutor(server.grpc_url), cases, c, plan.per_client)
            for c in plan.concurrency]
    say("cropping and steps against Dice")
    results["cropping"], results["steps_vs_dice"] = quality_sweeps(onnx_ex, cases, plan.steps)
    say("FLOPs and machine peak")
    peak = machine_peak_gflops()
    results["machine"]["peak_gflops_fp32_matmul"] = peak
    results["flops"] = stage_flops(repo, preset, peak)
    e = results["executors"]
    results["ratios"] = {
        "triton_over_torch": e["triton"]["end_to_end_p50_s"] / e["torch"]["end_to_end_p50_s"],
        "triton_overhead_over_onnx": e["triton"]["end_to_end_p50_s"] / e["onnx"]["end_to_end_p50_s"] - 1.0,
        "shared_memory_over_plain": e["triton"]["shared_memory_on"]["end_to_end_p50_s"] / e["triton"]["end_to_end_p50_s"],
        "crop_inpaint_speedup": results["cropping"]["inpaint_speedup"],
        "crop_dice_change": results["cropping"]["dice_change"],
    }
    results["seconds"] = time.time() - began
    write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown(results))
    plot(results, out)
    return results


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"Machine: {m['model_name']}, {m['cores']} cores, fp32 matmul peak "
             f"{m.get('peak_gflops_fp32_matmul', 0):.0f} GFLOP/s; preset `{r['preset']}`"
             f"{' (quick)' if r['quick'] else ''}, inpainting threshold {r['anomaly_threshold']}.", "",
             "| executor | end-to-end p50 s | p95 s | encode | attention | inpaint (incl. decode) | score |",
             "|---|---|---|---|---|---|---|"]
    for name, e in r["executors"].items():
        s = e["stages"]
        lines.append(f"| {name} | {e['end_to_end_p50_s']:.3f} | {e['end_to_end_p95_s']:.3f} | "
                     + " | ".join(f"{s[k]['p50']:.3f}" for k in ("encode", "attention", "inpaint", "score"))
                     + " |")
    shm = r["executors"]["triton"]["shared_memory_on"]
    lines.append(f"| triton + shared memory | {shm['end_to_end_p50_s']:.3f} | {shm['end_to_end_p95_s']:.3f} | "
                 + " | ".join(f"{shm['stages'][k]['p50']:.3f}" for k in ("encode", "attention", "inpaint", "score"))
                 + " |")
    lines += ["", "| concurrent clients | volumes/min, dynamic batching on | off |", "|---|---|---|"]
    for on, off in zip(r["throughput"]["dynamic_batching_on"], r["throughput"]["dynamic_batching_off"]):
        lines.append(f"| {on['concurrency']} | {on['volumes_per_minute']:.1f} | {off['volumes_per_minute']:.1f} |")
    ratios = r["ratios"]
    crop = r["cropping"]
    lines += ["", f"Ratios: Triton/torch {ratios['triton_over_torch']:.2f}x; Triton overhead over ONNX Runtime "
              f"{100 * ratios['triton_overhead_over_onnx']:+.1f}%; shared memory/plain {ratios['shared_memory_over_plain']:.2f}x; "
              f"cropping makes inpainting {crop['inpaint_speedup']:.2f}x faster over the {crop['cases_inpainted']} of "
              f"{len(crop['per_case'])} volumes with an inpainting mask (Dice {crop['on']['dice']:.3f} vs "
              f"{crop['off']['dice']:.3f}).", "",
              "| inpainting steps | Dice | inpaint p50 s |", "|---|---|---|"]
    lines += [f"| {s['steps']} | {s['dice']:.3f} | {s['inpaint_p50_s']:.3f} |" for s in r["steps_vs_dice"]]
    lines += ["", "| ONNX stage | GFLOP / call | median s | GFLOP/s | share of peak |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['gflop']:.2f} | {v['median_s']:.4f} | {v['gflops']:.1f} | {100 * v['fraction_of_peak']:.1f}% |"
              for k, v in r["flops"].items()]
    pa = r["perf_analyzer"]
    lines += ["", f"perf_analyzer on `unet`: {pa['status']}" + (f" ({pa['reason']})" if "reason" in pa else "")]
    if pa.get("rows"):
        lines += ["", "| perf_analyzer: concurrency | inferences/s | p50 ms | p95 ms |", "|---|---|---|---|"]
        lines += [f"| {x['concurrency']} | {x['throughput']:.1f} | {x['p50_us'] / 1e3:.1f} | {x['p95_us'] / 1e3:.1f} |"
                  for x in pa["rows"]]
    lines += ["", "| UNet load: concurrency | inferences/s | p50 ms | p95 ms |", "|---|---|---|---|"]
    lines += [f"| {u['concurrency']} | {u['inferences_per_s']:.1f} | {u['latency_p50_ms']:.1f} | {u['latency_p95_ms']:.1f} |"
              for u in r["unet_load"]]
    return "\n".join(lines) + "\n"


def plot(r: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    stages = ("encode", "attention", "inpaint", "score")
    names = list(r["executors"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [r["executors"][name]["stages"][s]["p50"] for s in stages]
        ax.bar([j + i * width for j in range(len(stages))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(stages))], stages)
    ax.set_ylabel("p50 seconds per volume")
    ax.set_title(f"Latency per stage ({r['preset']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_per_stage.png", dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("dynamic_batching_on", "dynamic batching on"), ("dynamic_batching_off", "off")):
        rows = r["throughput"][key]
        ax.plot([x["concurrency"] for x in rows], [x["volumes_per_minute"] for x in rows], marker="o", label=label)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("volumes per minute")
    ax.set_title("Triton throughput (client loop)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=90)
    plt.close(fig)
