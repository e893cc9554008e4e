"""Segmentation and anomaly-map metrics: Dice, NSD (surface Dice at a tolerance), AUROC, FPR95."""

from __future__ import annotations

import cc3d
import numpy as np
from scipy import ndimage


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice; 1.0 when both are empty (nothing to find, nothing found)."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2.0 * (pred & truth).sum() / total)


def found(pred: np.ndarray, truth: np.ndarray) -> float:
    """The share of the case's lesions (the truth's 26-connected components) that the mask touches
    at all: 1.0 or 0.0 for one lesion; NaN without a lesion. Whether a low Dice is a miss or a poor
    outline, and with several lesions, how many a mask that keeps few components drops."""
    return share_found(lesions_found(pred, truth, (1.0, 1.0, 1.0)))


def share_found(lesions: list[tuple[float, bool]]) -> float:
    """`found` of a case from its `lesions_found` (NaN without a lesion)."""
    return float(np.mean([hit for _, hit in lesions])) if lesions else float("nan")


def lesions_found(pred: np.ndarray, truth: np.ndarray, spacing) -> list[tuple[float, bool]]:
    """Each lesion (26-connected component of the truth): its volume in ml and whether the mask
    touches it. Where detection fails by size, this says so (`evaluate`'s found by size)."""
    lesions, n = cc3d.connected_components(truth.astype(bool).astype(np.uint8), connectivity=26, return_N=True)
    if n == 0:
        return []
    ml = np.bincount(lesions.ravel(), minlength=n + 1)[1:] * float(np.prod(spacing)) / 1000.0
    touched = np.zeros(n + 1, bool)
    touched[np.unique(lesions[pred.astype(bool)])] = True
    return [(float(v), bool(t)) for v, t in zip(ml, touched[1:])]


def false_positives(pred: np.ndarray, truth: np.ndarray) -> float:
    """How many of the mask's 26-connected components touch no lesion (on a healthy case, every one):
    a detection's false positives per scan, the other side of `found` when a rule keeps few components."""
    components, n = cc3d.connected_components(pred.astype(np.uint8), connectivity=26, return_N=True)
    return float(n - np.count_nonzero(np.unique(components[truth.astype(bool) & (components > 0)])))


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)  # 6-connected erosion, as MONAI's get_mask_edges


def normalized_surface_dice(pred: np.ndarray, truth: np.ndarray, spacing, tolerance_mm: float = 2.0) -> float:
    """Share of both surfaces lying within `tolerance_mm` of the other surface."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not pred.any() and not truth.any():
        return 1.0
    if not pred.any() or not truth.any():
        return 0.0
    sp, st = _surface(pred), _surface(truth)
    dist_to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    close = (dist_to_truth[sp] <= tolerance_mm).sum() + (dist_to_pred[st] <= tolerance_mm).sum()
    return float(close / (sp.sum() + st.sum()))


def _roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
    tps = np.cumsum(labels)[distinct]
    fps = 1 + distinct - tps
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)]


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC of a voxel score map; NaN when the truth has one class only."""
    labels = truth.ravel().astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    fpr, tpr = _roc(scores.ravel().astype(np.float64), labels)
    return float(np.trapz(tpr, fpr))


def fpr_at_95_tpr(scores: np.ndarray, truth: np.ndarray) -> float:
    labels = truth.ravel().astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    fpr, tpr = _roc(scores.ravel().astype(np.float64), labels)
    return float(fpr[np.searchsorted(tpr, 0.95, side="left")])


def nanmean(values) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return float(np.nanmean(arr)) if arr.size and not np.isnan(arr).all() else float("nan")
