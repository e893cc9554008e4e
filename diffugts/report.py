"""Pictures and JSON next to a mask: overlay PNG of the slices with most lesion (radiological
convention), timings."""

from __future__ import annotations

import json
import os
import tempfile
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


def radiological(affine: np.ndarray | None, *volumes: np.ndarray) -> list[np.ndarray]:
    """Volumes (X, Y, Z on `affine`) turned so that `v[..., z].T` drawn with origin='upper' is an
    axial slice in radiological convention: anterior up, the patient's right on the image's left.

    nibabel reorients to the closest RAS axes (i -> right, j -> anterior, k -> superior); flipping
    i and j then puts the patient's right at column 0 and anterior at row 0. `affine` None: the
    arrays are already RAS-aligned.
    """
    from nibabel.orientations import apply_orientation, io_orientation

    ornt = io_orientation(np.eye(4) if affine is None else affine)
    return [np.ascontiguousarray(apply_orientation(v, ornt)[::-1, ::-1, :]) for v in volumes]


def _orientation_letters(ax) -> None:
    for x, y, letter in ((0.5, 0.98, "A"), (0.5, 0.02, "P"), (0.02, 0.5, "R"), (0.98, 0.5, "L")):
        ax.text(x, y, letter, transform=ax.transAxes, color="yellow", fontsize=9,
                ha="center", va="center")


def outline(ax, region: np.ndarray, color: str = "lime"):
    """A region's outline over an `imshow(origin="upper")` picture. Not `contour(origin="upper")`:
    on axes imshow has already turned, that flips the outline upside down."""
    return ax.contour(region, levels=[0.5], colors=color, linewidths=1)


def write_overlay(path: Path, image: np.ndarray, mask: np.ndarray, anomaly: np.ndarray | None = None,
                  truth: np.ndarray | None = None, title: str = "", modality: str | None = None,
                  affine: np.ndarray | None = None) -> bool:
    """PNG: axial slices with most lesion, radiological convention (anterior up, patient's right on
    the left), the mask (red), truth contour (green) and anomaly map."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    given = [v for v in (image, mask, anomaly, truth) if v is not None]
    turned = iter(radiological(affine, *given))
    image, mask, anomaly, truth = (next(turned) if v is not None else None for v in (image, mask, anomaly, truth))
    slices = top_slices(mask if mask.any() or truth is None else truth)
    cols = 2 if anomaly is not None else 1
    fig, axes = plt.subplots(len(slices), cols, figsize=(4 * cols, 4 * len(slices)), squeeze=False)
    lo, hi = display_window(image, modality)
    peak = max(float(anomaly.max()), 1e-6) if anomaly is not None else 1.0  # maps rarely reach 1
    for row, z in zip(axes, slices):
        row[0].imshow(image[..., z].T, cmap="gray", vmin=lo, vmax=hi, origin="upper")
        row[0].imshow(np.ma.masked_where(mask[..., z].T == 0, mask[..., z].T), cmap="autumn",
                      alpha=0.5, origin="upper")
        if truth is not None and truth[..., z].any():
            outline(row[0], truth[..., z].T)
        row[0].set_title(f"axial {z}: mask (red)" + (", truth (green)" if truth is not None else ""))
        if anomaly is not None:
            row[1].imshow(image[..., z].T, cmap="gray", vmin=lo, vmax=hi, origin="upper")
            row[1].imshow(anomaly[..., z].T, cmap="magma", alpha=0.6, vmin=0, vmax=peak, origin="upper")
            row[1].set_title(f"anomaly map (0 to {peak:.2f})")
        for ax in row:
            ax.axis("off")
            _orientation_letters(ax)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write_json(path: Path, data) -> None:
    """Written whole or not at all: a temp file beside it (unique, so concurrent writers cannot
    share one), flushed to disk, then renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, default=float)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
