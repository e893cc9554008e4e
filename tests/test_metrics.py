"""Metrics against references: MONAI's surface Dice, scikit-learn's ROC."""

import numpy as np
import pytest
import torch
from monai.metrics import compute_surface_dice
from sklearn.metrics import roc_auc_score, roc_curve

from diffugts.metrics import (auroc, dice, false_positives, found, fpr_at_95_tpr, lesions_found, nanmean,
                              normalized_surface_dice)


def sphere(shape, center, radius):
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius**2


def test_dice_known_values():
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0


def test_found_is_a_touch_of_the_lesion_and_undefined_without_one():
    lesion = np.zeros((6, 6, 6), bool)
    lesion[2:4, 2:4, 2:4] = True
    touching = np.zeros_like(lesion)
    touching[3, 3, 3:6] = True  # one voxel in, the rest beside it: a poor Dice, but found
    beside = np.zeros_like(lesion)
    beside[5, 5, 5] = True
    assert found(touching, lesion) == 1.0 and dice(touching, lesion) < 0.25
    assert found(beside, lesion) == 0.0 and found(np.zeros_like(lesion), lesion) == 0.0
    assert np.isnan(found(beside, np.zeros_like(lesion)))  # a healthy case says nothing of finding
    three = lesion.copy()
    three[0, 0, 0] = three[0, 5, 5] = True  # two more lesions, apart from the first and each other
    assert found(touching, three) == pytest.approx(1 / 3) and found(three, three) == 1.0
    # false positives: the mask's components that touch no lesion; on a healthy case every one
    two_apart = touching.copy()
    two_apart[0, 5, 0] = True  # a second component, away from every lesion of `lesion`
    assert false_positives(touching, lesion) == 0.0 and false_positives(two_apart, lesion) == 1.0
    assert false_positives(two_apart, np.zeros_like(lesion)) == 2.0 and false_positives(np.zeros_like(lesion), lesion) == 0.0
    assert false_positives(three, three) == 0.0 and false_positives(three, lesion) == 2.0
    # each lesion's volume (8 voxels of 2 mm: 0.064 ml; 1 voxel: 0.008 ml) and whether it was touched
    assert sorted(lesions_found(touching, three, (2.0, 2.0, 2.0))) == [(0.008, False), (0.008, False), (0.064, True)]
    assert lesions_found(touching, np.zeros_like(lesion), (1.0, 1.0, 1.0)) == []


def test_found_by_size_pools_every_cases_lesions_by_volume():
    from diffugts.evaluate import found_by_size

    cases = [{"lesions": [[0.5, True], [0.2, False], [30.0, True]]}, {"lesions": [[2.0, False], [80.0, True]]},
             {"lesions": []}, {}]
    assert found_by_size(cases) == {"0-1 ml": {"lesions": 2, "found": 0.5}, "1-4 ml": {"lesions": 1, "found": 0.0},
                                    "15-60 ml": {"lesions": 1, "found": 1.0},
                                    "60 ml and over": {"lesions": 1, "found": 1.0}}
    assert nanmean([1.0, 0.0, float("nan"), 1.0]) == pytest.approx(2 / 3)  # the share of lesions found


@pytest.mark.parametrize("shift,tol", [(1, 2.0), (2, 2.0), (3, 4.0)])
def test_nsd_matches_monai(shift, tol):
    shape = (30, 30, 30)
    pred = sphere(shape, (15, 15, 15), 7)
    truth = sphere(shape, (15 + shift, 15, 15), 6)
    spacing = (1.5, 1.0, 2.0)
    ref = compute_surface_dice(torch.from_numpy(pred)[None, None].float(), torch.from_numpy(truth)[None, None].float(),
                               class_thresholds=[tol], include_background=True, spacing=spacing).item()
    assert normalized_surface_dice(pred, truth, spacing, tol) == pytest.approx(ref, abs=1e-6)


def test_roc_metrics_match_sklearn(rng):
    truth = rng.random((10, 10, 10)) < 0.1
    scores = np.round(rng.random(truth.shape) + truth * 0.8, 2)  # ties on purpose
    assert auroc(scores, truth) == pytest.approx(roc_auc_score(truth.ravel(), scores.ravel()), abs=1e-9)
    fpr, tpr, _ = roc_curve(truth.ravel(), scores.ravel())
    assert fpr_at_95_tpr(scores, truth) == pytest.approx(fpr[np.searchsorted(tpr, 0.95)], abs=1e-9)
    assert np.isnan(auroc(scores, np.zeros_like(truth)))
