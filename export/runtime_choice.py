"""Each stage's engine (ONNX Runtime or OpenVINO), chosen by measurement on this machine.

An engine qualifies for a stage when its parity against torch held at export (two shapes);
among those, the fastest median over a few calls at the loop's full-patch shapes serves the
stage. `force` skips the race (a qualified engine is still required).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from diffugts.client.runtimes import ENGINES, engine_available, open_session
from diffugts.config import Preset
from diffugts.stages import ONNX_STAGES, stage_specs

from .onnx_export import ExportError, example_inputs

CHOICES = ("auto",) + ENGINES


def available_engines() -> tuple[str, ...]:
    return tuple(e for e in ENGINES if engine_available(e))


def serving_session(version_dir: Path, engine: str, inputs: dict[str, np.ndarray], precision: str = "fp32"):
    """A stage's session as served for `inputs` (whole-patch shapes): an OpenVINO stage also
    compiles these fixed shapes, as the repository's `static_shapes` make it do."""
    return open_session(version_dir, engine, precision=precision,
                        static_shapes={k: list(v.shape) for k, v in inputs.items()})


def time_engine(version_dir: Path, engine: str, inputs: dict[str, np.ndarray], outputs: list[str],
                repeats: int = 5) -> float:
    return median_call_seconds(serving_session(version_dir, engine, inputs), inputs, outputs, repeats)


def median_call_seconds(session, inputs: dict[str, np.ndarray], outputs: list[str], repeats: int,
                        budget_s: float = 60.0) -> float:
    """Median of up to `repeats` timed calls after a warm-up; fewer (at least one) once they have
    taken `budget_s`: at the `maisi` size one decoder call takes tens of seconds on 2 cores."""
    session.run(outputs, inputs)  # warm-up (OpenVINO compiles shape-specific kernels on first call)
    times = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        start = time.perf_counter()
        session.run(outputs, inputs)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def choose_engines(repository: Path, preset: Preset, parity: dict[str, dict], force: str = "auto",
                   repeats: int = 5) -> tuple[dict[str, str], dict]:
    """-> ({stage: engine}, report). `parity`: {stage: {engine: errors | "rejected: ..."}}."""
    if force not in CHOICES:
        raise ValueError(f"unknown stage runtime {force!r}: {', '.join(CHOICES)}")
    specs = stage_specs(preset)
    engines, report = {}, {}
    for stage in ONNX_STAGES:
        checked = parity.get(stage, {})
        qualified = [e for e in available_engines() if isinstance(checked.get(e), dict)]
        entry = {"qualified": qualified, "forced": force != "auto"}
        if force != "auto":
            if force not in qualified:
                reason = checked.get(force, f"{force} is not installed or was not checked")
                raise ExportError(f"{stage}: --stage-runtime {force} cannot serve it ({reason})")
            engines[stage] = force
        else:
            inputs = example_inputs(preset, stage)
            outputs = [t.name for t in specs[stage].outputs]
            seconds = {e: time_engine(repository / stage / "1", e, inputs, outputs, repeats) for e in qualified}
            entry["median_s"] = seconds
            engines[stage] = min(seconds, key=seconds.get)
        entry["engine"] = engines[stage]
        report[stage] = entry
    return engines, report
