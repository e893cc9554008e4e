"""Probability map -> binary mask: threshold, 26-connected components, size, intensity and top-k
filters (which a target's mask applies: `component_rules`)."""

from __future__ import annotations

from typing import NamedTuple

import cc3d
import numpy as np
from scipy import ndimage

from .config import check_rank


class ComponentCounts(NamedTuple):
    found: int  # components over the size floor and the intensity floor (before the top-k)
    too_light: int  # components over the size floor whose median intensity is below the floor
    kept: int  # components in the mask


def kept_components(sizes: np.ndarray, min_voxels: int = 0, top_k: int = 0,
                    eligible: np.ndarray | None = None, scores: np.ndarray | None = None,
                    near_best: float = 0.0, rank: str | None = None) -> np.ndarray:
    """Indices into `sizes` (voxels per component) of the components kept: at least `min_voxels`
    and `eligible`; with `near_best` > 0 those whose score (mean probability) is at least that
    share of the best one's; then the `top_k` first by `rank`: "size" the largest, "mean
    probability" the highest scores (ties to the larger, so that both paths to the mask agree);
    None ranks by `scores` where given, else by size."""
    if near_best > 0 and scores is None:
        raise ValueError("near_best compares the components' scores: none were given")
    by_score = scores is not None if rank is None else check_rank(rank) == "mean probability"
    keep = np.flatnonzero((sizes >= max(min_voxels, 1)) & (True if eligible is None else eligible))
    if near_best > 0 and keep.size:
        keep = keep[scores[keep] >= near_best * scores[keep].max()]
    if top_k > 0:
        order = np.lexsort((-sizes[keep], -scores[keep])) if by_score else np.argsort(sizes[keep])[::-1]
        keep = keep[order[:top_k]]
    return keep


def needs_scores(rank: str, near_best: float) -> bool:
    """Whether the mask's components need their mean probability: to rank by it, or to compare it."""
    return check_rank(rank) == "mean probability" or near_best > 0


def mean_probability(prob: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Per component 1..n of `labels`: the mean of `prob` over its voxels (a ranking for top-k)."""
    if n == 0:
        return np.zeros(0)
    inside = labels > 0
    return np.asarray(ndimage.mean(prob[inside], labels[inside], np.arange(1, n + 1)), np.float64)


def dense_enough(image: np.ndarray | None, labels: np.ndarray, n: int, min_median: float | None) -> np.ndarray | None:
    """Per component 1..n: its median in `image` is at least `min_median` (None: no such floor)."""
    if image is None or min_median is None:
        return None
    if n == 0:
        return np.zeros(0, bool)
    inside = labels > 0  # ndimage.median sorts every voxel it is given: the background is most of them
    return np.asarray(ndimage.median(image[inside], labels[inside], np.arange(1, n + 1))) >= min_median


def components_filter(mask: np.ndarray, min_voxels: int = 0, top_k: int = 0, image: np.ndarray | None = None,
                      min_median: float | None = None, prob: np.ndarray | None = None,
                      near_best: float = 0.0, rank: str | None = None) -> np.ndarray:
    """`mask`'s components kept by `kept_components`, their scores the mean of `prob` (where given)."""
    labels, n = cc3d.connected_components(mask.astype(np.uint8), connectivity=26, return_N=True)
    if n == 0:
        return np.zeros(mask.shape, np.uint8)
    scores = None if prob is None else mean_probability(prob, labels, n)
    keep = kept_components(np.bincount(labels.ravel())[1:], min_voxels, top_k,
                           dense_enough(image, labels, n, min_median), scores, near_best, rank) + 1
    return np.isin(labels, keep).astype(np.uint8)


def min_component_voxels(spacing, min_component_mm3: float) -> int:
    """The smallest component kept, in voxels of this spacing."""
    return int(np.ceil(min_component_mm3 / float(np.prod(spacing)))) if min_component_mm3 > 0 else 0


def probability_to_mask(prob: np.ndarray, spacing, threshold: float = 0.5, min_component_mm3: float = 0.0,
                        top_k: int = 0, image: np.ndarray | None = None, min_median: float | None = None,
                        rank: str = "size", near_best: float = 0.0) -> np.ndarray:
    """The mask: `prob` above `threshold`, components of at least `min_component_mm3` whose median in
    `image` (the scan, on the same grid) is at least `min_median`, with `near_best` > 0 those whose
    mean probability is at least that share of the most probable one's, then the `top_k` largest
    (`rank` "size") or the `top_k` of highest mean probability ("mean probability")."""
    scored = needs_scores(rank, near_best)
    return components_filter(prob > threshold, min_component_voxels(spacing, min_component_mm3), top_k,
                             image, min_median, prob if scored else None, near_best, rank)


def mask_on_input_grid(grid, prob: np.ndarray, threshold: float, spacing, min_component_mm3: float = 0.0,
                       top_k: int = 0, image: np.ndarray | None = None, min_median: float | None = None,
                       rank: str = "size", near_best: float = 0.0) -> tuple[np.ndarray, ComponentCounts]:
    """`probability_to_mask(grid.to_input_grid(prob), ...)` without resampling the whole map (`image`
    is the scan on the input grid), and how many components each floor let through or dropped.

    A linearly interpolated voxel exceeds the threshold only if one of the two model voxels it
    falls between on each axis does. So only input-grid boxes over the model voxels above the
    threshold (grown by one) are resampled, one box per cluster of them (a scattered map's one
    bounding box spans most of a CT-sized volume), and boxes that touch are merged: then no
    component crosses from one box to another, and each box's components are its own. The mask is
    the same, voxel for voxel (with a `top_k` by size, components of equal size may break the tie
    differently)."""
    scored = needs_scores(rank, near_best)
    model = prob[grid.unpadded]
    above = model > threshold
    mask = np.zeros(grid.input_shape, np.uint8)
    if not above.any():
        return mask, ComponentCounts(0, 0, 0)
    clusters = cc3d.connected_components(above.view(np.uint8), connectivity=26)
    boxes = _apart([_canonical_box(above[box], box, model.shape, grid.canonical_shape)
                    for box in ndimage.find_objects(clusters)])
    labels, scores = [], []
    for box in boxes:  # one box's resampled probability at a time: a scattered map's box spans most of a CT
        box_prob = grid.box_to_input_grid(prob, box)
        labels.append(cc3d.connected_components((box_prob > threshold).view(np.uint8), connectivity=26))
        if scored:
            scores.append(mean_probability(box_prob, labels[-1], int(labels[-1].max())))
    sizes = [np.bincount(found.ravel(), minlength=1)[1:] for found in labels]  # per box, labels 1..n
    scores = np.concatenate(scores) if scores else None
    owner = np.repeat(np.arange(len(boxes)), [len(s) for s in sizes])
    label = np.concatenate([np.arange(1, len(s) + 1) for s in sizes])
    eligible = None
    if image is not None and min_median is not None:
        eligible = np.concatenate([dense_enough(image[grid.input_box(box)], found, len(n), min_median)
                                   for box, found, n in zip(boxes, labels, sizes)])
    sizes, floor = np.concatenate(sizes), min_component_voxels(spacing, min_component_mm3)
    kept = kept_components(sizes, floor, top_k, eligible, scores, near_best, rank)
    for i, box in enumerate(boxes):
        keep = label[kept[owner[kept] == i]]
        if keep.size:
            mask[grid.input_box(box)] = np.isin(labels[i], keep)
    found = len(kept_components(sizes, floor, 0, eligible))
    return mask, ComponentCounts(found, len(kept_components(sizes, floor)) - found, len(kept))


def _apart(boxes: list[tuple[slice, ...]]) -> list[tuple[slice, ...]]:
    """Boxes merged (into their bounding box) until no two overlap or touch."""
    boxes = list(boxes)

    def touching(a, b):
        return all(p.start <= q.stop and q.start <= p.stop for p, q in zip(a, b))

    while pair := next(((i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
                        if touching(boxes[i], boxes[j])), None):
        i, j = pair
        b = boxes.pop(j)
        boxes[i] = tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(boxes[i], b))
    return boxes


def _canonical_box(above: np.ndarray, model_box: tuple[slice, ...], model_shape, canonical_shape) -> tuple[slice, ...]:
    """The canonical-grid voxels whose interpolation reads a voxel of `above` (a `model_box` of the
    unpadded model grid), grown by one."""
    box = []
    for axis, (sl, m, n) in enumerate(zip(model_box, model_shape, canonical_shape)):
        idx = sl.start + np.flatnonzero(above.any(axis=tuple(a for a in range(above.ndim) if a != axis)))
        scale = (m - 1) / max(n - 1, 1)
        if scale == 0:
            box.append(slice(0, n))
            continue
        # canonical voxel c sits at model coordinate scale * c; it reads floor and floor + 1
        lo = max(int(np.floor((idx[0] - 1) / scale)) - 1, 0)
        hi = min(int(np.ceil((idx[-1] + 1) / scale)) + 2, n)
        box.append(slice(lo, hi))
    return tuple(box)
