"""`diffugts bench --quick`: the harness runs end to end and writes what it promises.
(No speed is asserted here: speed is what the benchmark reports.)"""

import json

import pytest

from diffugts.benchmarks.flops import graph_flops
from diffugts.cli import main

pytestmark = pytest.mark.slow


def test_quick_bench_writes_results(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("torch", "onnx", "triton", "triton-bls"):
        e = results["executors"][name]
        assert 0 < e["end_to_end_p50_s"] <= e["end_to_end_p95_s"]
        assert set(e["stages"]) >= {"encode", "inpaint", "score"}
    assert [t["concurrency"] for t in results["throughput"]["dynamic_batching_on"]] == [1, 2]
    assert all(not t["errors"] for t in results["throughput"]["dynamic_batching_off"])
    assert results["cropping"]["inpaint_speedup"] > 0
    assert results["flops"]["unet"]["gflop"] > 0 and results["machine"]["peak_gflops_fp32_matmul"] > 0
    assert results["perf_analyzer"]["status"] in ("ok", "unavailable", "failed")
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
