"""`diffugts calibrate`: the inpainting theta and the head's threshold, chosen jointly on a
dataset of *seen* categories by the full pipeline's mean Dice (never on the unseen set)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .evaluate import load_manifest
from .executors.base import preset_changes
from .io import InputError, read_volume
from .metrics import dice
from .pipeline import LoopOptions, segment_volume
from .postprocess import probability_to_mask


def calibrate(executor, datasets, thetas, thresholds, on_case=None) -> dict:
    """Mean Dice for every (theta, threshold) over the cases of one or more datasets; needs an
    in-process executor (its preset is swapped)."""
    dirs = [Path(d) for d in ([datasets] if isinstance(datasets, (str, Path)) else datasets)]
    cases = []
    for dataset_dir in dirs:
        for entry in load_manifest(dataset_dir):
            label = read_volume(dataset_dir / entry["label"]).array > 0
            if label.any():  # Dice of an empty truth says nothing about a threshold
                cases.append((read_volume(dataset_dir / entry["image"]), label, entry))
    if not cases:
        raise InputError(", ".join(map(str, dirs)), "no case with a lesion to calibrate on")
    base, grid = executor.preset, {}
    for theta in thetas:
        probabilities = []
        with preset_changes(executor, anomaly_threshold=float(theta)):
            for volume, label, entry in cases:
                seg = segment_volume(executor, volume, entry["prompt"], entry.get("modality"), LoopOptions())
                probabilities.append((seg.probability, label, volume.spacing))
                if on_case:
                    on_case()
        grid[float(theta)] = {float(t): float(np.mean([
            dice(probability_to_mask(p, spacing, t, base.min_component_mm3, base.top_k_components), label)
            for p, label, spacing in probabilities])) for t in thresholds}
    theta, threshold = max(((a, b) for a in grid for b in grid[a]), key=lambda k: grid[k[0]][k[1]])
    return {"dataset": ", ".join(d.name for d in dirs), "preset": base.name, "cases": len(cases), "dice": grid,
            "best": {"anomaly_threshold": theta, "mask_threshold": threshold, "dice": grid[theta][threshold]}}
