"""Sliding windows in numpy, following MONAI's convention (scan interval, gaussian blending).

The torch-free client cannot call `monai.inferers.sliding_window_inference`; tests check this
module against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np


def scan_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts on one axis, as MONAI's `_get_scan_interval` + `dense_patch_slices`."""
    if roi >= size:
        return [0]
    interval = max(int(roi * (1 - overlap)), 1)
    num = int(math.ceil(size / interval))
    count = next((d for d in range(num) if d * interval + roi >= size), num - 1) + 1
    return [i * interval - max(i * interval + roi - size, 0) for i in range(count)]


def window_slices(shape: tuple[int, ...], roi: int, overlap: float) -> Iterator[tuple[slice, ...]]:
    starts = [scan_starts(s, roi, overlap) for s in shape]
    for corner in np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, len(shape)):
        yield tuple(slice(int(c), int(c) + roi) for c in corner)


def gaussian_importance(roi: int, ndim: int = 3, sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI's `compute_importance_map(mode='gaussian')`, clamped the same way."""
    x = np.arange(-(roi - 1) / 2.0, (roi - 1) / 2.0 + 1, dtype=np.float32)
    g = np.exp(x**2 / (-2 * (roi * sigma_scale) ** 2)).astype(np.float32)
    w = g
    for _ in range(ndim - 1):
        w = np.multiply.outer(w, g)
    return np.maximum(w, max(float(w.min()), 1e-3)).astype(np.float32)


def sliding_window(volume: np.ndarray, roi: int, overlap: float,
                   predict: Callable[[np.ndarray], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Blend every named output of `predict(window)` over the volume with gaussian weights.

    `volume` is spatial only (X, Y, Z) and at least `roi` on every axis; each output of
    `predict` has the window's spatial shape.
    """
    if min(volume.shape) < roi:
        raise ValueError(f"volume {volume.shape} is smaller than the window {roi}; pad it first")
    weight = gaussian_importance(roi, volume.ndim)
    acc: dict[str, np.ndarray] = {}
    norm = np.zeros(volume.shape, np.float32)
    for sl in window_slices(volume.shape, roi, overlap):
        for name, value in predict(volume[sl]).items():
            acc.setdefault(name, np.zeros(volume.shape, np.float32))[sl] += value * weight
        norm[sl] += weight
    return {name: value / norm for name, value in acc.items()}
