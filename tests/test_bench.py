"""`diffugts bench --quick`: the harness runs end to end and writes what it promises.
(No speed is asserted here: speed is what the benchmark reports.)"""

import json

import pytest

from diffugts.benchmarks.flops import graph_flops, graph_flops_by_op
from diffugts.cli import main

pytestmark = pytest.mark.slow


def test_quick_bench_writes_results(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("torch", "onnx", "openvino", "triton", "triton-bls"):
        e = results["executors"][name]
        assert 0 < e["end_to_end_p50_s"] <= e["end_to_end_p95_s"]
        assert set(e["stages"]) >= {"encode", "inpaint", "score"}
    assert [t["concurrency"] for t in results["throughput"]["dynamic_batching_on"]] == [1, 2]
    assert all(not t["errors"] for t in results["throughput"]["dynamic_batching_off"])
    assert results["cropping"]["inpaint_speedup"] > 0
    overhead = results["triton_overhead"]["models"]["unet"]
    assert overhead["triton"]["calls"] == overhead["in_process"]["calls"] >= 1
    assert "Where Triton's time goes" in (tmp_path / "results.md").read_text()
    assert results["flops"]["unet"]["gflop"] > 0 and results["machine"]["peak_gflops_fp32_matmul"] > 0
    assert results["flops"]["unet:prediction"]["gflop"] == results["flops"]["unet"]["gflop"]  # the inpainting call
    for stage in results["flops"].values():  # the quick plan: one round, its share against its own peak read
        (only,) = stage["rounds"]
        assert stage["fraction_of_peak"] == pytest.approx(stage["gflop"] / only["seconds"] / only["peak_gflops"])
    assert results["perf_analyzer"]["status"] in ("ok", "unavailable", "failed")
    if results["perf_analyzer"]["status"] == "ok":
        assert [r["concurrency"] for r in results["perf_analyzer"]["rows"]] == [1, 2]
        assert (tmp_path / results["perf_analyzer"]["csv"]).is_file()
    # issue 14's keys: the served runtimes and their in-process twin, sizes, real size
    assert results["triton_runtime"] in results["executors"]
    assert set(results["triton_stage_runtimes"].values()) <= {"onnxruntime", "openvino"}
    assert results["ratios"]["triton_over_same_runtime"] > 0
    assert [c["windows"] for c in results["cost_curve"]] == [1]
    real = results["real_size"]
    assert real["shape"] == [96, 96, 60] and real["peak_rss_mb"] > 0
    assert real["seconds"]["total"] >= real["seconds"]["encode"] > 0
    assert results["int8"]["status"].startswith("skipped") and results["maisi"]["status"].startswith("skipped")
    md = (tmp_path / "results.md").read_text()
    assert "| cost curve (Triton client loop) |" in md and "| real-size stage | seconds |" in md
    assert (tmp_path / "latency_per_stage.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    assert "| executor |" in (tmp_path / "results.md").read_text()


def test_flop_count_of_a_known_convolution(tmp_path):
    import torch

    conv = torch.nn.Conv3d(2, 4, 3, padding=1)
    path = tmp_path / "conv.onnx"
    torch.onnx.export(conv, (torch.zeros(1, 2, 8, 8, 8),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "b", 2: "d"}})
    # 2 FLOPs x output voxels (4 x 8^3) x kernel (2 x 27)
    assert graph_flops(str(path), {"x": (1, 2, 8, 8, 8)}) == 2 * 4 * 512 * 2 * 27
    up = torch.nn.ConvTranspose3d(2, 4, 4, stride=2, padding=1)
    torch.onnx.export(up, (torch.zeros(1, 2, 8, 8, 8),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "b", 2: "d"}})
    # every input voxel (2 x 8^3) spreads over a 4^3 kernel into 4 output channels
    assert graph_flops(str(path), {"x": (2, 2, 8, 8, 8)}) == 2 * 2 * 512 * 2 * 4 * 64


def test_flop_count_follows_shapes_through_the_unets_timestep_arithmetic(tiny_models, tmp_path):
    import torch

    from diffugts.export.onnx_export import OPSET, dynamic_axes, example_inputs

    preset = tiny_models.preset
    stage = tiny_models.stages()["unet"].eval()
    path = tmp_path / "unet.onnx"
    inputs = example_inputs(preset, "unet")
    # traced as torch runs it (not the export's rewritten forms), with the export's dynamic axes
    torch.onnx.export(stage, tuple(torch.from_numpy(v) for v in inputs.values()), str(path), dynamo=False,
                      input_names=list(inputs), output_names=["prediction", "attention"],
                      dynamic_axes=dynamic_axes(preset, "unet"), opset_version=OPSET)
    counted = []  # every Conv3d as torch runs it: 2 x output elements x kernel volume x input channels

    def count(module, args, output):
        counted.append(2.0 * output.numel() * module.weight[0].numel())

    hooks = [m.register_forward_hook(count) for m in stage.modules() if isinstance(m, torch.nn.Conv3d)]
    with torch.no_grad():
        stage(*(torch.from_numpy(v) for v in inputs.values()))
    for hook in hooks:
        hook.remove()
    by_op = graph_flops_by_op(str(path), {k: v.shape for k, v in inputs.items()})
    assert by_op["Conv"] == sum(counted) > 0


def test_inpainting_check_measures_the_true_lesion_and_restores_the_preset():
    import numpy as np
    import torch
    from scipy import ndimage

    from diffugts.benchmarks.inpainting import inpainting_effect, lesion_contrast
    from diffugts.executors.torch_executor import TorchExecutor
    from diffugts.train import UNSEEN, make_cases

    executor = TorchExecutor.from_preset("tiny")
    preset = executor.preset
    cases = make_cases(preset, 2, 5, list(UNSEEN))
    result = inpainting_effect(executor, cases)
    assert executor.preset is preset
    assert len(result["cases"]) == 2
    for case, row in zip(cases, result["cases"]):
        lesion = case.label > 0.5
        ring = ndimage.binary_dilation(lesion, iterations=2) & ~lesion
        assert row["contrast_before"] == lesion_contrast(case.image, lesion, ring)
        with torch.no_grad():  # the VAE's reconstruction (clamped to [0, 1] as the decoder stage does)
            vae = executor.models.vae
            recon = vae.decode(vae.encode(torch.from_numpy(case.image)[None, None])[0]).clamp(0, 1)[0, 0].numpy()
        assert abs(row["contrast_reconstructed"] - lesion_contrast(recon, lesion, ring)) < 1e-5
        assert row["contrast_kept_by_vae"] == row["contrast_reconstructed"] / row["contrast_before"]
        # the true lesion was inpainted, so the pseudo-healthy image differs there
        assert row["residual_lesion"] > 0 and np.isfinite(row["contrast_after"])
    assert result["mean"]["residual_ratio"] > 0


def test_inpainting_check_command(tmp_path, capsys):
    out = tmp_path / "inpainting.json"
    assert main(["inpainting-check", "--preset", "tiny", "--n", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["mean"]["contrast_removed"] <= 1.0
    assert "residual lesion / ring" in capsys.readouterr().out


def test_inpainting_check_rejects_no_cases_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "inpainting.json"
    assert main(["inpainting-check", "--preset", "tiny", "--n", "0", "--out", str(out)]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err and not out.exists()


def test_flops_section_alone_refuses_a_folder_that_is_no_repository(tmp_path, capsys):
    from diffugts.benchmarks.flops import main as flops_main

    with pytest.raises(SystemExit) as exc:
        flops_main([str(tmp_path)])
    assert exc.value.code == 2 and "not a repository from `diffugts export`" in capsys.readouterr().err


def test_latencies_interleave_executors_and_rotate_who_goes_first(monkeypatch):
    """Each case runs on every executor before the next case; the first executor rotates, so the
    host's drift over the section falls on every executor alike."""
    from types import SimpleNamespace

    from diffugts.benchmarks import harness

    calls = []

    def fake_run(executor, volume, prompt, modality, options=None):
        calls.append((executor, volume))
        return SimpleNamespace(timings={"encode": 0.5})

    monkeypatch.setattr(harness, "run_segmentation", fake_run)
    cases = [(f"v{i}", None, "kidney tumor", "CT") for i in range(2)]
    report = harness.measure_latencies({"a": "A", "b": "B", "c": "C"}, cases, repeats=2)
    assert calls[:3] == [("A", "v0"), ("B", "v0"), ("C", "v0")]  # warm-up, each once
    assert calls[3:] == [("A", "v0"), ("B", "v0"), ("C", "v0"), ("B", "v1"), ("C", "v1"), ("A", "v1"),
                         ("C", "v0"), ("A", "v0"), ("B", "v0"), ("A", "v1"), ("B", "v1"), ("C", "v1")]
    assert set(report) == {"a", "b", "c"}
    assert all(r["runs"] == 4 and r["stages"]["encode"]["p50"] == 0.5 for r in report.values())
    assert report["a"]["stages"]["inpaint"]["p50"] == 0.0  # a stage the run skipped reads 0
    assert all(len(r["end_to_end_s"]) == 4 for r in report.values())  # run by run, for paired ratios


def test_paired_ratio_is_the_median_of_per_volume_ratios():
    """Two volumes of different cost: the p50s fall between them, the paired ratio does not."""
    from diffugts.benchmarks.harness import paired_ratio

    report = {"triton": {"end_to_end_s": [1.0, 3.0, 1.1, 3.3]}, "openvino": {"end_to_end_s": [1.0, 2.0, 1.0, 2.0]}}
    assert paired_ratio(report, "triton", "openvino") == pytest.approx(1.3)  # median of 1.0, 1.5, 1.1, 1.65
    assert paired_ratio(report, "openvino", "openvino") == 1.0


def test_triton_overhead_splits_served_calls_into_server_phases_and_wire(triton_server, tiny_repository,
                                                                         phantom_dir):
    """The same loop makes the same calls in process and through Triton; the server's phases come
    from its statistics (refused without the server's metadata) and the wire is what is left."""
    from diffugts.benchmarks.harness import load_cases
    from diffugts.benchmarks.triton_overhead import PHASES, server_statistics, stage_overhead
    from diffugts.client.triton_executor import TritonExecutor
    from diffugts.client.transports import GrpcTransport
    from diffugts.executors.onnx_executor import OnnxExecutor

    cases = load_cases(phantom_dir, 2)
    in_process, served = OnnxExecutor.from_repository(tiny_repository), TritonExecutor(triton_server.grpc_url)
    originals = in_process.transport, served.transport
    metadata = triton_server.security.statistics_metadata()
    bare = GrpcTransport(triton_server.grpc_url)
    with pytest.raises(Exception, match="restricted"):
        server_statistics(bare.client)
    bare.close()
    try:
        report = stage_overhead(in_process, served, cases, lambda: server_statistics(served.transport.client, metadata))
    finally:
        served.close()
    assert (in_process.transport, served.transport) == originals  # the timing wrappers are gone
    assert report["volumes"] == 2
    unet = report["models"]["unet"]
    assert unet["in_process"]["calls"] == unet["triton"]["calls"] >= 1  # probe (+ inpainting steps)
    for model, row in report["models"].items():
        if "wire_ms" in row:
            assert row["in_process"]["calls"] == row["triton"]["calls"], model
            assert row["wire_ms"] == pytest.approx(row["triton"]["ms"] - sum(row["server_ms"][p] for p in PHASES))
            assert row["server_ms"]["compute_infer"] > 0, model
    for model in ("unet", "vae_decoder"):  # never inside an ensemble: the server's time is all the client's
        row = report["models"][model]
        assert row["server_ms"]["compute_infer"] < row["triton"]["ms"], model
    # the text encoder runs only inside the `encode_aova` ensemble, so the client never calls it
    assert "wire_ms" not in report["models"]["text_encoder"]
    assert report["total_ms"]["triton"] == pytest.approx(
        sum(r["triton"]["ms"] for r in report["models"].values() if "wire_ms" in r))


def test_the_component_rules_benchmark_runs_each_rule_on_the_same_networks(phantom_dir, tmp_path):
    """Three rules on one executor: the tiny preset keeps every component already, so the rule
    switched off and --all-components must read exactly what the preset reads (a preset change
    that leaked, or an option that changed more than the components, would show here)."""
    from diffugts.benchmarks.component_rules import main
    from diffugts.config import get_preset

    assert (get_preset("tiny").top_k_components, get_preset("tiny").several_near_best) == (0, 0.0)
    out = tmp_path / "rules.json"
    assert main([str(phantom_dir), "--preset", "tiny", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    name = phantom_dir.name
    assert set(runs) == {f"{name} | {rule}" for rule in ("plurals keep all", "shipped", "--all-components")}
    assert all(set(r) == {"dice", "found", "false_positives"} for r in runs.values())
    assert runs[f"{name} | plurals keep all"] == runs[f"{name} | shipped"] == runs[f"{name} | --all-components"]
