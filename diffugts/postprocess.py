"""Probability map -> binary mask: threshold, 26-connected components, size and top-k filters."""

from __future__ import annotations

import cc3d
import numpy as np


def components_filter(mask: np.ndarray, min_voxels: int = 0, top_k: int = 0) -> np.ndarray:
    labels, n = cc3d.connected_components(mask.astype(np.uint8), connectivity=26, return_N=True)
    if n == 0:
        return np.zeros(mask.shape, np.uint8)
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= max(min_voxels, 1)) + 1
    if top_k > 0:
        keep = keep[np.argsort(sizes[keep - 1])[::-1][:top_k]]
    return np.isin(labels, keep).astype(np.uint8)


def probability_to_mask(prob: np.ndarray, spacing, threshold: float = 0.5,
                        min_component_mm3: float = 0.0, top_k: int = 0) -> np.ndarray:
    voxel_mm3 = float(np.prod(spacing))
    min_voxels = int(np.ceil(min_component_mm3 / voxel_mm3)) if min_component_mm3 > 0 else 0
    return components_filter(prob > threshold, min_voxels, top_k)
