"""TensorRT plans from the exported ONNX graphs, with the official TensorRT Python API.

Optional: TensorRT needs an NVIDIA GPU and NVIDIA's package index, and is never part of the
default install. Everything that does not need TensorRT itself (optimization profiles, the
precision plan, the engine cache key) is plain Python and tested everywhere.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx

from diffugts.config import Preset
from diffugts.stages import ONNX_STAGES, stage_specs

from .onnx_export import ExportError

WORKSPACE_BYTES = 4 << 30
# ONNX ops whose TensorRT layers stay in fp32 under fp16: normalizations and the reductions,
# powers and exponentials they are made of, whose ranges overflow half precision.
FP32_OPS = {"GroupNormalization", "InstanceNormalization", "LayerNormalization", "ReduceMean",
            "ReduceSum", "ReduceL2", "Pow", "Sqrt", "Softmax", "Exp", "Erf"}


def require_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise ExportError("TensorRT is not installed: the tensorrt runtime needs an NVIDIA GPU and "
                          "`pip install diffugts[tensorrt]` from NVIDIA's index; use --runtime "
                          "python-ort or onnxruntime on this machine") from None
    return tensorrt


def profile_shapes(preset: Preset, stage: str, max_batch: int | None = None,
                   max_prompts: int = 16) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) per input, batch included: the shapes the loop sends."""
    spec = stage_specs(preset)[stage]
    max_batch = max_batch or spec.max_batch_size
    opt_batch = min(2, max_batch)  # the decoder's usual call is batch 2 (box before and after)
    shapes = {}
    for t in spec.inputs:
        lo, opt, hi = [1], [opt_batch], [max_batch]
        for axis, d in enumerate(t.dims):
            if d != -1:
                lo.append(d), opt.append(d), hi.append(d)
            elif t.name == "latent":  # cropped latent boxes (UNet and decoder), multiples of the UNet's
                lo.append(preset.unet_multiple)
                opt.append(max(preset.unet_multiple, preset.latent_patch // 2))
                hi.append(preset.latent_patch)
            else:  # the prompt-set axis
                lo.append(1), opt.append(6), hi.append(max_prompts)
        shapes[t.name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def _in_norm_scope(node_name: str) -> bool:
    # group norms export under a `.../norm*/` scope (InstanceNormalization with its reshapes and
    # affine, or ReduceMean/Sub/Div/Sqrt where a norm was written out by hand)
    return any(part.startswith("norm") for part in node_name.split("/")[:-1])


def fp32_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the ONNX nodes whose layers keep fp32 in an fp16 engine: whole normalization
    subgraphs, and reductions / powers / exponentials anywhere."""
    return {n.name for n in model.graph.node
            if n.op_type in FP32_OPS or (_in_norm_scope(n.name) and n.op_type not in ("Conv", "Constant"))}


def cache_key(onnx_path: Path, trt_version: str, profile: dict, fp16: bool) -> str:
    """Engine cache key: the graph's bytes, the TensorRT version, the profile and precision."""
    digest = hashlib.sha256()
    for f in sorted(Path(onnx_path).parent.glob(Path(onnx_path).name + "*")):
        digest.update(f.read_bytes())
    digest.update(json.dumps({"trt": trt_version, "profile": profile, "fp16": fp16}, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def build_engine(onnx_path: Path, profile: dict, fp16: bool = True) -> bytes:
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT cannot parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        keep = fp32_nodes(onnx.load(str(onnx_path), load_external_data=False))
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if any(layer.name.startswith(name) for name in keep):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    optimization = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        optimization.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(optimization)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"{onnx_path}: TensorRT failed to build an engine")
    return bytes(plan)


def build_plans(preset: Preset, repository: Path, cache_dir: Path | None = None, fp16: bool = True) -> None:
    """`<stage>/1/model.onnx` -> `<stage>/1/model.plan`, reusing cached engines."""
    trt = require_tensorrt()
    cache_dir = Path(cache_dir or repository / ".engine_cache")
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stage in ONNX_STAGES:
        onnx_path = repository / stage / "1" / "model.onnx"
        profile = profile_shapes(preset, stage)
        cached = cache_dir / f"{stage}-{cache_key(onnx_path, trt.__version__, profile, fp16)}.plan"
        if not cached.exists():
            cached.write_bytes(build_engine(onnx_path, profile, fp16))
        (repository / stage / "1" / "model.plan").write_bytes(cached.read_bytes())
