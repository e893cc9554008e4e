"""Pictures and JSON next to a mask: overlay PNG of the slices with most lesion, timings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def top_slices(mask: np.ndarray, count: int = 3) -> list[int]:
    """Axial slices (last axis) with the most lesion; the middle slice when the mask is empty."""
    area = mask.reshape(-1, mask.shape[-1]).sum(0)
    if not area.any():
        return [mask.shape[-1] // 2]
    return sorted(int(i) for i in np.argsort(area)[::-1][:count] if area[i] > 0)


def display_window(image: np.ndarray, modality: str | None = None) -> tuple[float, float]:
    """Grey levels to show: CT in the abdominal soft-tissue window (HU), else the body's 1-99%."""
    if modality == "CT":
        return -160.0, 240.0
    body = image[image > np.percentile(image, 5)]
    lo, hi = np.percentile(body if body.size else image, [1, 99])
    return float(lo), float(hi)


def write_overlay(path: Path, image: np.ndarray, mask: np.ndarray, anomaly: np.ndarray | None = None,
                  truth: np.ndarray | None = None, title: str = "", modality: str | None = None) -> bool:
    """PNG: per slice the scan with the mask (red), truth contour (green) and anomaly map."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    slices = top_slices(mask if mask.any() or truth is None else truth)
    cols = 2 if anomaly is not None else 1
    fig, axes = plt.subplots(len(slices), cols, figsize=(4 * cols, 4 * len(slices)), squeeze=False)
    lo, hi = display_window(image, modality)
    peak = max(float(anomaly.max()), 1e-6) if anomaly is not None else 1.0  # maps rarely reach 1
    for row, z in zip(axes, slices):
        row[0].imshow(image[..., z].T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        row[0].imshow(np.ma.masked_where(mask[..., z].T == 0, mask[..., z].T), cmap="autumn",
                      alpha=0.5, origin="lower")
        if truth is not None and truth[..., z].any():
            row[0].contour(truth[..., z].T, levels=[0.5], colors="lime", linewidths=1)
        row[0].set_title(f"slice {z}: mask (red)" + (", truth (green)" if truth is not None else ""))
        if anomaly is not None:
            row[1].imshow(image[..., z].T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
            row[1].imshow(anomaly[..., z].T, cmap="magma", alpha=0.6, vmin=0, vmax=peak, origin="lower")
            row[1].set_title(f"anomaly map (0 to {peak:.2f})")
        for ax in row:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)
