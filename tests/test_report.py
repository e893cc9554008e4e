"""Pictures next to a mask: which slices, which grey levels."""

import numpy as np

from diffugts.report import display_window, top_slices, write_overlay


def test_top_slices_are_the_ones_with_most_lesion():
    mask = np.zeros((8, 8, 10), np.uint8)
    mask[:2, :2, 3] = 1
    mask[:4, :4, 7] = 1
    mask[:3, :3, 5] = 1
    mask[:1, :1, 1] = 1
    assert top_slices(mask) == [3, 5, 7]
    assert top_slices(np.zeros((4, 4, 6), np.uint8)) == [3]


def test_display_window_shows_soft_tissue_not_air():
    ct = np.full((8, 8, 8), -1000.0, np.float32)
    ct[2:6, 2:6, 2:6] = 40.0
    assert display_window(ct, "CT") == (-160.0, 240.0)
    mr = np.zeros((8, 8, 8), np.float32)  # mostly background: the window comes from the body
    mr[2:6, 2:6, 2:6] = np.linspace(100, 200, 64).reshape(4, 4, 4)
    lo, hi = display_window(mr, "MR")
    assert 100 <= lo < 110 and 190 < hi <= 200


def test_overlay_png_is_written(tmp_path):
    image = np.random.default_rng(0).normal(40, 10, (16, 16, 8)).astype(np.float32)
    mask = np.zeros(image.shape, np.uint8)
    mask[4:8, 4:8, 2:4] = 1
    assert write_overlay(tmp_path / "o.png", image, mask, np.full(image.shape, 0.05, np.float32),
                         truth=mask, title="t", modality="CT")
    assert (tmp_path / "o.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
