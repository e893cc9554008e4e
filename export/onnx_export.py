"""Each stage to ONNX: dynamic batch and the shapes the loop needs, checked against torch.

A graph is accepted only if `onnx.checker` and shape inference pass and ONNX Runtime agrees
with torch on the same inputs (two input shapes per graph) within a relative tolerance.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from diffugts.config import Preset
from diffugts.prompts import build_prompt_set
from diffugts.stages import ONNX_STAGES, stage_specs
from diffugts.tokenizer import tokenize

OPSET = 17
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf's limit is 2 GB; stay clear of it


class ExportError(RuntimeError):
    pass


def example_inputs(preset: Preset, stage: str, batch: int = 1, crop: int | None = None,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Realistic inputs of a stage (real prompt tokens, unit embeddings, [0, 1] images)."""
    rng = np.random.default_rng(seed)
    p, lat, c, e = preset.patch, preset.latent_patch, preset.latent_channels, preset.embed_dim
    prompts = build_prompt_set("kidney tumor", "CT")
    n = len(prompts.texts)

    def image():
        return rng.random((batch, 1, p, p, p), dtype=np.float32)

    def unit(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=1 if len(shape) == 5 else -1, keepdims=True)

    if stage == "text_encoder":
        ids, mask = tokenize(prompts.texts)
        return {"input_ids": np.repeat(ids[None], batch, 0), "attention_mask": np.repeat(mask[None], batch, 0)}
    if stage == "vae_encoder_aova":
        return {"image": image(), "prompt_embeddings": unit(batch, n, e),
                "abnormal": np.repeat(prompts.abnormal_mask[None], batch, 0)}
    if stage == "unet":
        side = crop or lat
        return {"latent": rng.standard_normal((batch, c, side, side, side)).astype(np.float32),
                "timestep": np.full((batch, 1), 500.0, np.float32)}
    if stage == "vae_decoder":
        side = crop or lat
        return {"latent": rng.standard_normal((batch, c, side, side, side)).astype(np.float32)}
    if stage == "residual_head":
        return {"image": image(), "healthy": image(), "anomaly": image(), "healthy_anomaly": image(),
                "features": unit(batch, e, lat, lat, lat), "healthy_features": unit(batch, e, lat, lat, lat)}
    raise KeyError(stage)


def dynamic_axes(preset: Preset, stage: str) -> dict[str, dict[int, str]]:
    spec = stage_specs(preset)[stage]
    axes = {}
    for t in spec.inputs + spec.outputs:
        named = {0: "batch"}
        named.update({i + 1: f"{t.name}_{i + 1}" for i, d in enumerate(t.dims) if d == -1})
        axes[t.name] = named
    return axes


def _run_torch(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.inference_mode():
        out = module(*(torch.from_numpy(v) for v in inputs.values()))
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def compare(stage: str, torch_out: list[np.ndarray], ort_out: list[np.ndarray], names, rtol: float) -> dict:
    errors = {}
    for name, ref, got in zip(names, torch_out, ort_out):
        if ref.shape != got.shape:
            raise ExportError(f"{stage}: output {name} has shape {got.shape} in ONNX Runtime, {ref.shape} in torch")
        scale = max(float(np.abs(ref).max()), 1e-6)
        errors[name] = float(np.abs(ref - got).max()) / scale
        if errors[name] > rtol:
            raise ExportError(f"{stage}: output {name} differs from torch by {errors[name]:.2e} "
                              f"(relative to its max), above the tolerance {rtol:.0e}")
    return errors


def verify(stage: str, module: torch.nn.Module, path: Path, cases: list[dict[str, np.ndarray]],
           rtol: float, engines: tuple[str, ...] = ("onnxruntime",)) -> dict[str, dict | str]:
    """Parity of the graph in each engine against torch, per output (worst over the cases).

    ONNX Runtime must agree (it is the reference runtime of the repository: ExportError if
    not); another engine that disagrees is recorded with the reason and will not serve the stage."""
    from diffugts.client.runtimes import open_session

    onnx.checker.check_model(str(path))
    onnx.shape_inference.infer_shapes_path(str(path), str(path.with_suffix(".inferred.onnx")))
    path.with_suffix(".inferred.onnx").unlink()
    names = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    references = [_run_torch(module, inputs) for inputs in cases]
    report: dict[str, dict | str] = {}
    for engine in engines:
        try:
            session = open_session(path, engine)
            worst: dict[str, float] = {}
            for inputs, reference in zip(cases, references):
                errors = compare(stage, reference, session.run(names, inputs), names, rtol)
                worst = {k: max(v, worst.get(k, 0.0)) for k, v in errors.items()}
            report[engine] = worst
        except ExportError as exc:
            if engine == "onnxruntime":
                raise
            report[engine] = f"rejected: {exc}"
    return report


def group_norm_from_moments(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """`nn.GroupNorm` as per-channel spatial means, averaged within groups on the small (B, C)
    tensor, then one per-channel scale and shift. The same function (two passes, as stable as
    torch's), traced without reshaping the feature map into groups: the reshape forces OpenVINO
    to reorder every map out of its channels-blocked layout and back (~30% of the demo encoder)."""
    b, c = x.shape[:2]
    groups, spatial = norm.num_groups, tuple(range(2, x.dim()))
    per_channel = (b, c) + (1,) * len(spatial)

    def group_mean(moment):  # (B, C, 1, ...) -> each channel's group average
        grouped = moment.reshape(b, groups, c // groups).mean(2, keepdim=True)
        return grouped.expand(b, groups, c // groups).reshape(per_channel)

    centred = x - group_mean(x.mean(dim=spatial, keepdim=True))
    scale = torch.rsqrt(group_mean((centred * centred).mean(dim=spatial, keepdim=True)) + norm.eps)
    if norm.affine:
        return centred * (scale * norm.weight.reshape(per_channel[1:])) + norm.bias.reshape(per_channel[1:])
    return centred * scale


@contextmanager
def layout_free_group_norms(module: torch.nn.Module):
    """Export every 3D group norm as `group_norm_from_moments`.

    This includes MONAI's `MaisiGroupNorm3D`, which normalizes one group at a time to spare GPU
    memory on 512^3 volumes and would trace to a chain of small reductions per group. The parity
    check runs against the modules as they are, outside this context."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D

    swapped = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)
               and not (isinstance(m, MaisiGroupNorm3D) and m.norm_float16)]
    for m in swapped:
        m.forward = group_norm_from_moments.__get__(m)
    try:
        yield
    finally:
        for m in swapped:
            del m.forward


def _conv_with_padded_outputs(conv: torch.nn.Conv3d, width: int, x: torch.Tensor) -> torch.Tensor:
    weight = torch.cat([conv.weight, conv.weight.new_zeros((width - 1,) + conv.weight.shape[1:])])
    bias = None if conv.bias is None else torch.cat([conv.bias, conv.bias.new_zeros(width - 1)])
    return conv._conv_forward(x, weight, bias)[:, :1]


@contextmanager
def padded_single_output_convs(module: torch.nn.Module, width: int = 8):
    """Export 3D convolutions with one output channel as `width` outputs (zero filters), of
    which the first is kept. OpenVINO's CPU plugin has no blocked kernel for a single output
    channel: the residual head's last 1->1 convolution took 90 ms at 64^3 (14 MFLOP), 3 ms padded."""
    swapped = [m for m in module.modules() if type(m) is torch.nn.Conv3d and m.out_channels == 1]
    for m in swapped:
        m.forward = partial(_conv_with_padded_outputs, m, width)
    try:
        yield
    finally:
        for m in swapped:
            del m.forward


# per axis, the 4 taps of a stride-2 transposed convolution from the 3 of a convolution that
# follows a nearest x2 upsampling: even outputs see (w-1) x[m-1] + (w0 + w+1) x[m], odd ones
# (w-1 + w0) x[m] + (w+1) x[m+1]; zero padding at either resolution is the same zeros
_UPSAMPLED_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def upsampled_conv_as_transposed(conv: torch.nn.Conv3d, x: torch.Tensor, emb=None) -> torch.Tensor:
    """Nearest x2 upsampling, then a 3x3x3 convolution (padding 1), as one transposed convolution
    on the coarse map: the same function with 27/8 fewer multiply-adds and no upsampled copy."""
    taps = torch.tensor(_UPSAMPLED_TAPS, dtype=conv.weight.dtype)
    kernel = torch.einsum("oiabc,xa,yb,zc->ioxyz", conv.weight, taps, taps, taps)
    return F.conv_transpose3d(x, kernel, conv.bias, stride=2, padding=1)


def _nearest_upsampling_conv(module: torch.nn.Module) -> torch.nn.Conv3d | None:
    """The convolution of a MONAI `Upsample` that is exactly nearest x2 -> 3x3x3 conv, else None."""
    children = list(module.children()) if isinstance(module, torch.nn.Sequential) else []
    if len(children) != 2 or not isinstance(children[0], torch.nn.Upsample):
        return None
    up, conv = children[0], getattr(children[1], "conv", children[1])
    scale = up.scale_factor if isinstance(up.scale_factor, tuple) else (up.scale_factor,) * 3
    if up.mode != "nearest" or tuple(float(f) for f in scale) != (2.0, 2.0, 2.0) or type(conv) is not torch.nn.Conv3d:
        return None
    plain = conv.kernel_size == (3, 3, 3) and conv.padding == (1, 1, 1) and conv.stride == (1, 1, 1)
    return conv if plain and conv.dilation == (1, 1, 1) and conv.groups == 1 else None


@contextmanager
def transposed_upsamplings(module: torch.nn.Module):
    """Export every nearest-x2-then-convolution block (the UNet's upsamplers) as
    `upsampled_conv_as_transposed`: 11% of the demo UNet's time in OpenVINO on this CPU."""
    swapped = [(m, conv) for m in module.modules() if (conv := _nearest_upsampling_conv(m)) is not None]
    for m, conv in swapped:
        m.forward = partial(upsampled_conv_as_transposed, conv)
    try:
        yield
    finally:
        for m, _ in swapped:
            del m.forward


def export_stage(preset: Preset, stage: str, module: torch.nn.Module, path: Path, rtol: float = 1e-3,
                 engines: tuple[str, ...] = ("onnxruntime",)) -> dict:
    """Export and check one stage: ONNX Runtime's parity errors, or (several engines) {engine: errors}."""
    spec = stage_specs(preset)[stage]
    inputs = example_inputs(preset, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), \
            layout_free_group_norms(module), padded_single_output_convs(module), transposed_upsamplings(module):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, tuple(torch.from_numpy(v) for v in inputs.values()), str(path), dynamo=False,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_axes=dynamic_axes(preset, stage), opset_version=OPSET, do_constant_folding=True,
        )
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    if size > EXTERNAL_DATA_BYTES:
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    # a second shape per graph proves the dynamic axes: batch 2, and a cropped latent where the loop crops
    cropped = stage in ("unet", "vae_decoder")
    second = example_inputs(preset, stage, batch=2, seed=1,
                            crop=max(preset.unet_multiple, preset.latent_patch // 2) if cropped else None)
    report = verify(stage, module, path, [inputs, second], rtol, engines)
    return report["onnxruntime"] if engines == ("onnxruntime",) else report


def export_onnx(models, out_dir: Path, rtol: float = 1e-3, progress=None,
                engines: tuple[str, ...] = ("onnxruntime",)) -> dict[str, dict]:
    """Export every ONNX stage into `out_dir/<stage>/1/model.onnx`; returns the parity errors
    ({stage: {output: error}}, or {stage: {engine: ...}} when several engines are checked)."""
    stages = models.stages()
    report = {}
    for name in ONNX_STAGES:
        if progress:
            progress(name)
        report[name] = export_stage(models.preset, name, stages[name], out_dir / name / "1" / "model.onnx",
                                    rtol, engines)
    return report
