"""`diffugts calibrate`: the inpainting theta, the head's threshold and the smallest component
kept, chosen jointly on a dataset of *seen* categories by the full pipeline's mean Dice (never on
the unseen set)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .evaluate import load_manifest
from .executors.base import preset_changes
from .io import InputError, read_volume
from .label_classes import lesion_mask
from .metrics import dice
from .pipeline import LoopOptions, segment_volume
from .postprocess import probability_to_mask


def calibrate(executor, datasets, thetas, thresholds, min_components=None, on_case=None, split: str = "test",
              prompt: str | None = None) -> dict:
    """Mean Dice for every (theta, threshold, min component mm^3) over the cases of one or more
    datasets; needs an in-process executor (its preset is swapped). The loop runs once per theta;
    the threshold and component size only change the postprocessing of its probability.
    `min_components`: None keeps the preset's; `split` and `prompt` as `evaluate` reads them. The
    result's `dice` nests theta -> threshold -> mm^3."""
    dirs = [Path(d) for d in ([datasets] if isinstance(datasets, (str, Path)) else datasets)]
    cases = []
    for dataset_dir in dirs:
        for entry in load_manifest(dataset_dir, split, prompt):
            label = lesion_mask(read_volume(dataset_dir / entry["label"]).array, entry["lesion_values"])
            if label.any():  # Dice of an empty truth says nothing about a threshold
                cases.append((read_volume(dataset_dir / entry["image"], channel=entry.get("channel")), label, entry))
    if not cases:
        raise InputError(", ".join(map(str, dirs)), "no case with a lesion to calibrate on")
    base, grid = executor.preset, {}
    sizes = [float(m) for m in (min_components if min_components is not None else [base.min_component_mm3])]
    for theta in thetas:
        probabilities = []
        with preset_changes(executor, anomaly_threshold=float(theta)):
            for volume, label, entry in cases:
                seg = segment_volume(executor, volume, entry["prompt"], entry.get("modality"), LoopOptions())
                # the rule the loop applied; its drop of components mostly outside the organ was
                # made at the preset's threshold, not at each threshold tried here
                probabilities.append((seg.probability, label, volume, seg.components))
                if on_case:
                    on_case()
        grid[float(theta)] = {float(t): {m: float(np.mean([
            dice(probability_to_mask(p, volume.spacing, t, m, rule.top_k, volume.array, rule.min_median, rule.rank,
                                     rule.near_best), label)
            for p, label, volume, rule in probabilities])) for m in sizes} for t in thresholds}
    cells = [(a, b, m) for a in grid for b in grid[a] for m in grid[a][b]]
    theta, threshold, size = max(cells, key=lambda k: grid[k[0]][k[1]][k[2]])
    best = {"anomaly_threshold": theta, "mask_threshold": threshold, "min_component_mm3": size,
            "dice": grid[theta][threshold][size]}
    # a best value on the grid's edge may be short of the real optimum: say which knob to widen
    edges = [name for name, value, values in (("thetas", theta, thetas), ("thresholds", threshold, thresholds),
                                              ("min components", size, sizes))
             if len(values) > 1 and float(value) in (float(min(values)), float(max(values)))]
    return {"dataset": ", ".join(d.name for d in dirs), "preset": base.name, "cases": len(cases), "dice": grid,
            "best": best, "on_grid_edge": edges}
