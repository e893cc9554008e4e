"""FLOPs of an ONNX graph at concrete input shapes (convolutions, matmuls, einsums), and the
machine's measured peak (a large fp32 matmul), so a stage can report its fraction of peak."""

from __future__ import annotations

import re
import time

import numpy as np
import onnx


def _concrete(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """The graph with every value's shape at the given input shapes.

    ONNX Runtime's symbolic shape inference follows shapes through the arithmetic a traced
    graph does on them (the UNet's timestep embedding, upsampling sizes); `onnx`'s own inference
    stops there, and every convolution after it went uncounted (the demo UNet read 0.72 GFLOP
    of its 4.2)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for inp in model.graph.input:
        if inp.name in shapes:
            for dim, size in zip(inp.type.tensor_type.shape.dim, shapes[inp.name]):
                dim.ClearField("dim_param")
                dim.dim_value = int(size)
    return SymbolicShapeInference.infer_shapes(model, auto_merge=True)


def _shape_table(model: onnx.ModelProto) -> dict[str, list[int]]:
    table = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            table[value.name] = dims
    for init in model.graph.initializer:
        table[init.name] = list(init.dims)
    return table


def graph_flops_by_op(path: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """Multiply-adds counted as 2 FLOPs, per op type: Conv, ConvTranspose, MatMul, Gemm and Einsum nodes."""
    model = _concrete(onnx.load(path), shapes)
    table = _shape_table(model)
    totals = {"Conv": 0.0, "ConvTranspose": 0.0, "MatMul": 0.0, "Gemm": 0.0, "Einsum": 0.0}
    for node in model.graph.node:
        out = table.get(node.output[0]) if node.output else None
        if out is None:
            continue
        if node.op_type == "Conv" and node.input[1] in table:
            weight = table[node.input[1]]  # (Cout, Cin/groups, k...)
            totals["Conv"] += 2.0 * np.prod(out) * np.prod(weight[1:])
        elif node.op_type == "ConvTranspose" and node.input[0] in table and node.input[1] in table:
            inputs, weight = table[node.input[0]], table[node.input[1]]  # (B, Cin, ...), (Cin, Cout/groups, k...)
            totals["ConvTranspose"] += 2.0 * inputs[0] * np.prod(inputs[2:]) * np.prod(weight)
        elif node.op_type in ("MatMul", "Gemm") and node.input[0] in table:
            totals[node.op_type] += 2.0 * np.prod(out) * table[node.input[0]][-1]
        elif node.op_type == "Einsum":
            eq = next(a.s.decode() for a in node.attribute if a.name == "equation")
            sizes = {}
            for term, name in zip(eq.split("->")[0].split(","), node.input):
                for letter, size in zip(re.sub(r"[^a-z]", "", term), table.get(name, [])):
                    sizes[letter] = size
            totals["Einsum"] += 2.0 * np.prod(list(sizes.values())) if sizes else 0.0
    return {op: float(flops) for op, flops in totals.items()}


def graph_flops(path: str, shapes: dict[str, tuple[int, ...]]) -> float:
    """All of `graph_flops_by_op`."""
    return sum(graph_flops_by_op(path, shapes).values())


def machine_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best-of-N fp32 matmul throughput with numpy's BLAS, all cores."""
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    b = a.T.copy()
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e9


def main(argv: list[str] | None = None) -> int:
    """Re-measure the share of peak of an exported repository's stages alone (the bench's section)."""
    import argparse
    import json
    from pathlib import Path

    from diffugts.config import get_preset

    from .harness import stage_flops

    parser = argparse.ArgumentParser(prog="python -m diffugts.benchmarks.flops", description=main.__doc__)
    parser.add_argument("repository", type=Path, help="a model repository written by `diffugts export`")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if not (args.repository / "export_report.json").is_file():
        parser.error(f"{args.repository} has no export_report.json: not a repository from `diffugts export`")
    report = stage_flops(args.repository, get_preset(args.preset), args.rounds)
    for stage, r in report.items():
        print(f"{stage:18s} {r['engine']:12s} {r['gflop']:6.2f} GFLOP  {1000 * r['median_s']:8.1f} ms  "
              f"{r['gflops']:6.1f} GFLOP/s  peak {r['peak_gflops']:5.0f}  share {100 * r['fraction_of_peak']:5.1f}%")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
