"""Each stage to ONNX: dynamic batch and the shapes the loop needs, checked against torch.

A graph is accepted only if `onnx.checker` and shape inference pass and ONNX Runtime agrees
with torch on the same inputs (two input shapes per graph) within a relative tolerance.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from diffugts.config import Preset
from diffugts.export.export_forms import export_forms
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


def export_stage(preset: Preset, stage: str, module: torch.nn.Module, path: Path, rtol: float = 1e-3,
                 engines: tuple[str, ...] = ("onnxruntime",)) -> dict:
    """Export and check one stage: ONNX Runtime's parity errors, or (several engines) {engine: errors}."""
    spec = stage_specs(preset)[stage]
    inputs = example_inputs(preset, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), export_forms(module):
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
