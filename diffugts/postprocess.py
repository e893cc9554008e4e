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


def mask_on_input_grid(grid, prob: np.ndarray, threshold: float, spacing, min_component_mm3: float = 0.0,
                       top_k: int = 0) -> np.ndarray:
    """`probability_to_mask(grid.to_input_grid(prob), ...)` without resampling the whole map.

    A linearly interpolated voxel exceeds the threshold only if one of the two model voxels it
    falls between on each axis does, so only the input-grid box over the model voxels above the
    threshold (grown by one) is resampled, thresholded and filtered: on a CT-sized input that is
    a small part of the volume. The mask is the same, voxel for voxel (components are found in the
    input orientation, so even top-k ties break as before)."""
    model = prob[grid.unpadded]
    above = model > threshold
    mask = np.zeros(grid.input_shape, np.uint8)
    if not above.any():
        return mask
    box = []
    for axis, (m, n) in enumerate(zip(model.shape, grid.canonical_shape)):
        idx = np.flatnonzero(above.any(axis=tuple(a for a in range(above.ndim) if a != axis)))
        scale = (m - 1) / max(n - 1, 1)
        if scale == 0:
            box.append(slice(0, n))
            continue
        # canonical voxel c sits at model coordinate scale * c; it reads floor and floor + 1
        lo = max(int(np.floor((idx[0] - 1) / scale)) - 1, 0)
        hi = min(int(np.ceil((idx[-1] + 1) / scale)) + 2, n)
        box.append(slice(lo, hi))
    box = tuple(box)
    values = grid.box_to_input_grid(prob, box)
    voxel_mm3 = float(np.prod(spacing))
    min_voxels = int(np.ceil(min_component_mm3 / voxel_mm3)) if min_component_mm3 > 0 else 0
    mask[grid.input_box(box)] = components_filter(values > threshold, min_voxels, top_k)
    return mask
