"""int8 post-training quantization (NNCF on OpenVINO) of the VAE encoder, UNet and decoder.

Calibration inputs are what those stages receive when the loop runs on phantoms. A stage's int8
model (`<stage>/1/model.int8.xml`) ships, i.e. its config switches to OpenVINO int8, only where
the end-to-end Dice on an evaluation set moves by at most `max_dice_change` with that stage alone
in int8, and where it is faster than the engine the stage runs now.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffugts.client.runtimes import INT8_MODEL
from diffugts.client.transports import LocalTransport
from diffugts.stages import stage_specs

from .runtime_choice import median_call_seconds, serving_session

QUANTIZED_STAGES = ("vae_encoder_aova", "unet", "vae_decoder")
MAX_DICE_CHANGE = 0.01


class RecordingTransport(LocalTransport):
    """OpenVINO fp32 in process, keeping a copy of what the quantized stages are fed."""

    def __init__(self, repository: Path, stages=QUANTIZED_STAGES, limit: int = 64):
        super().__init__(repository, engine="openvino", precision={})
        self.samples: dict[str, list[dict[str, np.ndarray]]] = {s: [] for s in stages}
        self.limit = limit

    def infer(self, model, inputs, outputs):
        if model in self.samples and len(self.samples[model]) < self.limit:
            self.samples[model].append({k: np.array(v) for k, v in inputs.items()})
        return super().infer(model, inputs, outputs)


def calibration_samples(repository: Path, cases, limit: int = 64) -> dict[str, list[dict[str, np.ndarray]]]:
    """Stage inputs of the loop over `cases` [(volume, label, prompt, modality)]."""
    from diffugts.client.executor import RepositoryExecutor
    from diffugts.export import read_preset
    from diffugts.pipeline import segment_volume

    transport = RecordingTransport(repository, limit=limit)
    executor = RepositoryExecutor(transport, read_preset(repository))
    for volume, _, prompt, modality in cases:
        segment_volume(executor, volume, prompt, modality)
    return transport.samples


def quantize_stage(repository: Path, stage: str, samples: list[dict[str, np.ndarray]]) -> Path:
    import nncf
    import openvino as ov

    version = Path(repository) / stage / "1"
    model = ov.Core().read_model(str(version / "model.onnx"))
    # asymmetric activations (MIXED): group norms and SiLUs leave them one-sided; the UNet's
    # attention gets NNCF's transformer handling (measured on the tiny UNet: 0.21 relative RMS
    # error of the prediction against 0.29 with the defaults)
    kind = {"model_type": nncf.ModelType.TRANSFORMER} if stage == "unet" else {}
    quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples), fast_bias_correction=True,
                              preset=nncf.QuantizationPreset.MIXED, **kind)
    ov.save_model(quantized, str(version / INT8_MODEL), compress_to_fp16=False)
    return version / INT8_MODEL


def mean_dice(repository: Path, cases, precision: dict[str, str]) -> float:
    from diffugts.client.executor import RepositoryExecutor
    from diffugts.export import read_preset
    from diffugts.metrics import dice
    from diffugts.pipeline import segment_volume

    executor = RepositoryExecutor(LocalTransport(repository, engine="openvino", precision=precision),
                                  read_preset(repository))
    return float(np.mean([dice(segment_volume(executor, v, p, m).mask, label) for v, label, p, m in cases]))


def quantize_and_gate(repository: Path, calibration_cases, eval_cases, max_dice_change: float = MAX_DICE_CHANGE,
                      repeats: int = 5, write: bool = True, progress=None) -> dict:
    """Quantize each stage, measure its speed-up (stage call, full-patch shapes) and the Dice
    change with it alone in int8; ship the stages that pass. -> the report per stage."""
    from diffugts.export import read_preset
    from diffugts.export.onnx_export import example_inputs

    repository = Path(repository)
    preset = read_preset(repository)
    samples = calibration_samples(repository, calibration_cases)
    baseline = mean_dice(repository, eval_cases, {})
    local = LocalTransport(repository, engine=None)  # the engine each stage runs now
    report = {"fp32_dice": baseline, "max_dice_change": max_dice_change, "stages": {}}
    for stage in QUANTIZED_STAGES:
        if progress:
            progress(stage)
        quantize_stage(repository, stage, samples[stage])
        inputs = example_inputs(preset, stage)
        outputs = [t.name for t in stage_specs(preset)[stage].outputs]
        version = repository / stage / "1"
        fp32_s = median_call_seconds(serving_session(version, "openvino", inputs), inputs, outputs, repeats)
        int8_s = median_call_seconds(serving_session(version, "openvino", inputs, "int8"), inputs, outputs, repeats)
        engine, _ = local.stage_engine(stage)
        current_s = fp32_s if engine == "openvino" else median_call_seconds(serving_session(version, engine, inputs),
                                                                            inputs, outputs, repeats)
        dice_int8 = mean_dice(repository, eval_cases, {stage: "int8"})
        change = dice_int8 - baseline
        ships = abs(change) <= max_dice_change and int8_s < current_s
        report["stages"][stage] = {
            "calibration_samples": len(samples[stage]), "fp32_openvino_s": fp32_s, "int8_s": int8_s,
            "speedup_over_fp32_openvino": fp32_s / int8_s, "current_engine": engine, "current_s": current_s,
            "speedup_over_current": current_s / int8_s, "dice_int8": dice_int8, "dice_change": change,
            "ships": ships}
    if write:
        ship(repository, [s for s, r in report["stages"].items() if r["ships"]])
    return report


def ship(repository: Path, stages: list[str]) -> None:
    """Switch these stages' configs to OpenVINO int8 (the python runner reads both parameters)."""
    import json

    from diffugts.export import read_preset
    from diffugts.export.repository import parse_config, stage_config

    repository = Path(repository)
    preset = read_preset(repository)
    specs = stage_specs(preset)
    for stage in stages:
        path = repository / stage / "config.pbtxt"
        config = parse_config(path)
        if config.backend != "python":
            raise ValueError(f"{stage}: int8 ships through the python runner; this repository's "
                             f"runtime is {config.backend or config.platform}")
        threads = int(config.parameters["intra_op_threads"].string_value or 0)
        path.write_text(stage_config(specs[stage], "python-ort", config.HasField("dynamic_batching"), threads,
                                     engine="openvino", precision="int8"))
    report_path = repository / "export_report.json"
    report = json.loads(report_path.read_text())
    report["int8_stages"] = sorted(set(report.get("int8_stages", [])) | set(stages))
    report_path.write_text(json.dumps(report, indent=2))
