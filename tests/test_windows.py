"""Numpy sliding windows against MONAI's sliding_window_inference."""

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference

from diffugts.windows import gaussian_importance, sliding_window, window_slices


@pytest.mark.parametrize("roi", [16, 32, 17])
def test_gaussian_importance_matches_monai(roi):
    ref = compute_importance_map((roi,) * 3, mode="gaussian", sigma_scale=0.125).numpy()
    np.testing.assert_allclose(gaussian_importance(roi), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape,overlap", [((40, 36, 32), 0.25), ((64, 32, 50), 0.5), ((32, 32, 32), 0.25)])
def test_sliding_window_matches_monai(shape, overlap, rng):
    roi = 32
    volume = rng.standard_normal(shape).astype(np.float32)

    def predict_np(window):  # non-local, so the blending weights matter
        return {"out": window * 2.0 + window.mean()}

    def predict_torch(batch):
        return batch * 2.0 + batch.mean(dim=(1, 2, 3, 4), keepdim=True)

    ours = sliding_window(volume, roi, overlap, predict_np)["out"]
    ref = sliding_window_inference(torch.from_numpy(volume)[None, None], (roi,) * 3, 1, predict_torch,
                                   overlap=overlap, mode="gaussian").numpy()[0, 0]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_windows_cover_the_volume():
    covered = np.zeros((70, 33, 32), bool)
    for sl in window_slices(covered.shape, 32, 0.25):
        covered[sl] = True
    assert covered.all()


def test_window_larger_than_volume_is_refused():
    with pytest.raises(ValueError, match="pad it first"):
        sliding_window(np.zeros((20, 40, 40), np.float32), 32, 0.25, lambda w: {"x": w})
