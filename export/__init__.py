"""`diffugts export`: stages -> ONNX (checked against torch) -> a Triton model repository."""

from __future__ import annotations

import json
from pathlib import Path

from .repository import REPOSITORY_FORMAT, RUNTIMES, read_preset, write_repository  # noqa: F401

DEFAULT_REPOSITORY = Path("model_repository")


def is_repository(path: Path) -> bool:
    """Configs and graphs of this format present (the committed configs alone are not a built repository)."""
    path = Path(path)
    report = path / "export_report.json"
    if not (path / "diffugts_pipeline" / "config.pbtxt").is_file() or not (path / "unet" / "1" / "model.onnx").is_file():
        return False
    try:
        return json.loads(report.read_text()).get("format") == REPOSITORY_FORMAT
    except (OSError, ValueError):
        return False


def build_repository(out: str | Path = DEFAULT_REPOSITORY, preset_name: str = "demo", weights: str | None = None,
                     runtime: str = "python-ort", dynamic_batching: bool = True, rtol: float = 1e-3,
                     progress=None, trt_accelerator: bool = False, loop_overrides: dict | None = None,
                     stage_runtime: str = "auto") -> Path:
    """Export every stage of a preset (with its weights) and lay out the repository.

    `loop_overrides` change loop settings (not networks) of the preset the server and clients use.
    `stage_runtime`: "auto" runs each stage in the engine measured fastest here among those that
    match torch (ONNX Runtime, OpenVINO when installed); "onnxruntime" or "openvino" forces one."""
    from diffugts.executors.torch_executor import TorchExecutor

    from .onnx_export import export_onnx
    from .runtime_choice import CHOICES, available_engines, choose_engines

    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: {', '.join(RUNTIMES)}")
    if stage_runtime not in CHOICES:
        raise ValueError(f"unknown stage runtime {stage_runtime!r}: {', '.join(CHOICES)}")
    if runtime == "tensorrt":
        from .tensorrt import require_tensorrt

        require_tensorrt()  # fail before minutes of export, not after
    out = Path(out)
    models = TorchExecutor.from_preset(preset_name, weights).models
    if loop_overrides:
        models.preset = models.preset.with_(**loop_overrides)
    checked = export_onnx(models, out, rtol=rtol, progress=progress, engines=available_engines())
    engines, choice = ({}, {}) if runtime != "python-ort" else choose_engines(out, models.preset, checked, stage_runtime)
    if runtime == "tensorrt":
        from .tensorrt import build_plans

        build_plans(models.preset, out)
    parity = {stage: errors["onnxruntime"] for stage, errors in checked.items()}
    for stage, entry in choice.items():
        entry["parity"] = checked[stage]
    return write_repository(out, models.preset, runtime, out, dynamic_batching,
                            trt_accelerator=trt_accelerator, parity=parity, engines=engines, choice_report=choice)
