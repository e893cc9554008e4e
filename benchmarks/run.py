"""Orchestration of `diffugts bench`: one run, one machine, every executor; JSON, PNG, markdown."""

from __future__ import annotations

import json
import time
from pathlib import Path

from diffugts.config import get_preset
from diffugts.phantom import write_dataset
from diffugts.report import write_json

from .flops import machine_peak_gflops
from .harness import (FULL, QUICK, describe_machine, load_cases, measure_latencies, measure_throughput,
                      paired_ratio, quality_sweeps, run_perf_analyzer, stage_flops, unet_load)
from .real_size import ct_sized_volume, run_real_size
from .sizes import cost_curve, run_maisi
from .triton_overhead import server_statistics, stage_overhead

ENGINE_EXECUTORS = {"onnxruntime": "onnx", "openvino": "openvino"}


def triton_runtime(repo: Path) -> dict:
    """Which in-process executor runs what Triton's stage models run (the export's choice)."""
    report = json.loads((Path(repo) / "export_report.json").read_text())
    engines = {stage: entry["engine"] for stage, entry in report.get("stage_runtime", {}).items()}
    names = {ENGINE_EXECUTORS[e] for e in engines.values()} or {"onnx"}
    return {"triton_runtime": names.pop() if len(names) == 1 else "exported_runtimes",
            "triton_stage_runtimes": engines}


def run_int8(repo: Path, out: Path, plan, cases, preset, say) -> dict:
    """int8 per stage on a copy of the repository (the figures above stay fp32): speed-up and
    end-to-end Dice change on the bench's volumes, calibrated on other phantoms."""
    import shutil

    from diffugts.export.quantize import quantize_and_gate

    if not plan.int8:
        return {"status": "skipped (quick plan)"}
    say("int8: calibrate on phantoms, quantize, Dice gate per stage")
    copy = out / "repo_int8"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(repo, copy)
    shape = (preset.patch, preset.patch, preset.patch * 3 // 4)
    calibration = load_cases(write_dataset(out / "calibration", 4, seed=321, shape=shape, spacing=preset.spacing[0],
                                           categories=["kidney tumor", "liver tumor", "lung nodule", "brain tumor"]), 4)
    report = quantize_and_gate(copy, calibration, cases, progress=lambda s: say(f"int8: {s}"))
    report["repository"] = copy.name
    return report


def maisi_section(out: Path, plan, say) -> dict:
    """The published sizes on this CPU: a failure there (memory, time) is reported, not fatal to
    the figures measured before it."""
    if not plan.maisi:
        return {"status": "skipped (quick plan)"}
    try:
        return run_maisi(out, say=say)
    except Exception as exc:  # noqa: BLE001 - any failure is a result of this section
        say(f"maisi: failed ({type(exc).__name__}: {exc})")
        return {"status": f"failed: {type(exc).__name__}: {exc}"}


CATEGORIES = ["liver cyst", "pancreas tumor", "spleen lesion", "kidney tumor"]


def run_bench(preset_name: str = "demo", out: str | Path = "bench_out", quick: bool = False,
              say=print, theta: float | None = None) -> dict:
    """`theta` overrides the inpainting threshold for every executor (server side included), so
    the inpainting loop runs even where the weights' anomaly maps stay below the preset's."""
    from diffugts.client.triton_executor import BlsClient, TritonExecutor
    from diffugts.executors.onnx_executor import ExportedRuntimeExecutor, OnnxExecutor
    from diffugts.executors.openvino_executor import OpenVinoExecutor
    from diffugts.executors.torch_executor import TorchExecutor
    from diffugts.export import build_repository
    from diffugts.export.repository import write_repository
    from diffugts.serve import TritonServer

    plan = QUICK if quick else FULL
    first_peak = machine_peak_gflops()
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
    results.update(triton_runtime(repo))

    in_process = {"torch": torch_ex, "onnx": onnx_ex, "openvino": OpenVinoExecutor.from_repository(repo)}
    if results["triton_runtime"] == "exported_runtimes":  # mixed engines: the same mix in process
        in_process["exported_runtimes"] = ExportedRuntimeExecutor.from_repository(repo)
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_path=out / "tritonserver.log") as server:
        url = server.grpc_url
        served = {"triton": TritonExecutor(url), "triton_shared_memory": TritonExecutor(url, shared_memory=True),
                  "triton-bls": BlsClient(url)}
        say(f"latency, interleaved: {', '.join(list(in_process) + list(served))}")
        latency = measure_latencies({**in_process, **served}, cases, plan.repeats)
        say("where Triton's time over the same runtime in process goes (Triton statistics)")
        results["triton_overhead"] = stage_overhead(
            in_process[results["triton_runtime"]], served["triton"], cases,
            lambda: server_statistics(served["triton"].transport.client, server.security.statistics_metadata()))
        for client in served.values():
            client.close()
        latency["triton"]["shared_memory_on"] = latency.pop("triton_shared_memory")
        results["executors"].update(latency)
        say("throughput with dynamic batching")
        results["throughput"] = {"dynamic_batching_on": [
            measure_throughput(lambda: TritonExecutor(url), cases, c, plan.per_client) for c in plan.concurrency]}
        say("UNet load and perf_analyzer")
        results["unet_load"] = [unet_load(url, preset, c, plan.unet_requests) for c in plan.concurrency]
    results["perf_analyzer"] = run_perf_analyzer(repo, preset, out, plan.concurrency, say)
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_path=out / "tritonserver_sizes.log") as server:
        url = server.grpc_url
        say("cost curve: 1, 8, 27 windows through the client loop")
        client = TritonExecutor(url)
        results["cost_curve"] = cost_curve(client, preset, plan.windows_per_axis)
        say("real size: a 512x512x300 CT through the client loop")
        results["real_size"] = run_real_size(client, volume=ct_sized_volume(plan.real_size_shape)[0])
        client.close()
    with TritonServer(repo_static, grpc_port=0, http_port=0, metrics_port=0,
                      log_path=out / "tritonserver_no_batching.log") as server:
        say("throughput without dynamic batching")
        results["throughput"]["dynamic_batching_off"] = [
            measure_throughput(lambda: TritonExecutor(server.grpc_url), cases, c, plan.per_client)
            for c in plan.concurrency]
    say("cropping and steps against Dice")
    results["cropping"], results["steps_vs_dice"] = quality_sweeps(onnx_ex, cases, plan.steps)
    say("FLOPs and machine peak")
    # the best of a read before anything ran and one now (a single read once came out at 60% of
    # the usual, after the maisi section), and before the long sections that load the machine most
    peak = max(first_peak, machine_peak_gflops())
    results["machine"]["peak_gflops_fp32_matmul"] = peak
    results["flops"] = stage_flops(repo, preset, plan.flops_rounds, plan.repeats)
    write_json(out / "results.partial.json", results)  # the long sections below must not lose these
    results["int8"] = run_int8(repo, out, plan, cases, preset, say)
    write_json(out / "results.partial.json", results)
    results["maisi"] = maisi_section(out, plan, say)
    e = results["executors"]
    results["ratios"] = {
        "triton_over_torch": e["triton"]["end_to_end_p50_s"] / e["torch"]["end_to_end_p50_s"],
        "triton_overhead_over_onnx": e["triton"]["end_to_end_p50_s"] / e["onnx"]["end_to_end_p50_s"] - 1.0,
        "shared_memory_over_plain": e["triton"]["shared_memory_on"]["end_to_end_p50_s"] / e["triton"]["end_to_end_p50_s"],
        "triton_over_same_runtime": e["triton"]["end_to_end_p50_s"] / e[results["triton_runtime"]]["end_to_end_p50_s"],
        # the same two, as the median of per-volume ratios (robust to where the p50 falls)
        "triton_over_torch_paired": paired_ratio(e, "triton", "torch"),
        "triton_over_same_runtime_paired": paired_ratio(e, "triton", results["triton_runtime"]),
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
    lines += ["", "| ONNX stage | engine | GFLOP / call | median s | GFLOP/s | peak read beside it | share of peak |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v.get('engine', 'onnxruntime')} | {v['gflop']:.2f} | {v['median_s']:.4f} | {v['gflops']:.1f} | "
              f"{v['peak_gflops']:.0f} | {100 * v['fraction_of_peak']:.1f}% |"
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
    lines += size_markdown(r)
    return "\n".join(lines) + "\n"


def size_markdown(r: dict) -> list[str]:
    """Issue 14's rows: runtimes, int8, the maisi size, the cost curve, a real-size volume."""
    e, ratios = r["executors"], r["ratios"]
    lines = ["", f"Triton's stage runtimes (chosen by measurement at export): "
             + ", ".join(f"{k} {v}" for k, v in r.get("triton_stage_runtimes", {}).items())
             + f"; Triton / the same runtimes in process (`{r['triton_runtime']}`): "
             f"{ratios['triton_over_same_runtime']:.2f}x; Triton / torch eager {ratios['triton_over_torch']:.2f}x "
             f"(p50 over p50; the median of per-volume ratios: {ratios['triton_over_same_runtime_paired']:.2f}x and "
             f"{ratios['triton_over_torch_paired']:.2f}x)."]
    lines += overhead_markdown(r.get("triton_overhead"), r["triton_runtime"])
    int8 = r.get("int8", {})
    if "stages" in int8:
        lines += ["", f"| int8 stage (fp32 Dice {int8['fp32_dice']:.3f}) | speed-up vs fp32 OpenVINO | vs current engine "
                  "| Dice change | ships |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['speedup_over_fp32_openvino']:.2f}x | {v['speedup_over_current']:.2f}x ({v['current_engine']}) "
                  f"| {v['dice_change']:+.4f} | {'yes' if v['ships'] else 'no'} |" for k, v in int8["stages"].items()]
    else:
        lines += ["", f"int8: {int8.get('status', 'not run')}"]
    m = r.get("maisi", {})
    if "seconds" in m:
        rss = m["peak_rss_mb"]["stage_models"]
        lines += ["", f"`maisi` preset (random weights), one {m['shape']} volume ({m['windows']} window) through Triton: "
                  f"export {m['export_s']:.0f} s; end to end {m['seconds']['total']:.1f} s.",
                  "", "| maisi stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in m["seconds"].items()]
        lines += ["", "| maisi stage model | peak RSS MB |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in rss.items()]
        lines += [f"| tritonserver | {m['peak_rss_mb']['tritonserver']:.0f} |", f"| client | {m['peak_rss_mb']['client']:.0f} |"]
    else:
        lines += ["", f"maisi: {m.get('status', 'not run')}"]
    lines += ["", "| cost curve (Triton client loop) | volume | seconds |", "|---|---|---|"]
    lines += [f"| {c['windows']} windows | {'x'.join(map(str, c['shape']))} | {c['seconds']:.2f} |" for c in r["cost_curve"]]
    rs = r["real_size"]
    lines += ["", f"Real size: {'x'.join(map(str, rs['shape']))} CT through Triton, peak RSS {rs['peak_rss_mb']:.0f} MB, "
              f"pre- plus postprocessing {100 * rs['pre_post_fraction']:.1f}% of end to end.", "",
              "| real-size stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in rs["seconds"].items()]
    return lines


def overhead_markdown(o: dict | None, runtime: str) -> list[str]:
    if not o:
        return []
    lines = ["", f"Where Triton's time goes, per volume ({o['volumes']} volumes; ms; server phases from Triton's "
             f"statistics; wire = the rest of a served call):", "",
             f"| model the client calls | calls | `{runtime}` in process | Triton | server compute | "
             "server queue + input + output | wire |", "|---|---|---|---|---|---|---|"]
    for model, row in o["models"].items():
        if "wire_ms" not in row:
            continue
        server = row["server_ms"]
        lines.append(f"| {model} | {row['triton']['calls']:.1f} | {row['in_process']['ms']:.1f} | {row['triton']['ms']:.1f} | "
                     f"{server['compute_infer']:.1f} | {server['queue'] + server['compute_input'] + server['compute_output']:.1f} "
                     f"| {row['wire_ms']:.1f} |")
    t = o["total_ms"]
    lines.append(f"| all | | {t['in_process']:.1f} | {t['triton']:.1f} | | | {t['wire']:.1f} |")
    return lines


def plot(r: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    stages = ("encode", "attention", "inpaint", "score")
    names = list(r["executors"])
    fig, ax = plt.subplots(figsize=(9.5, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [r["executors"][name]["stages"][s]["p50"] for s in stages]
        ax.bar([j + i * width for j in range(len(stages))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(stages))], stages)
    ax.set_ylabel("p50 seconds per volume")
    ax.set_title(f"Latency per stage ({r['preset']})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the bars, never over them
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
