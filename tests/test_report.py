"""Pictures next to a mask: which slices, which grey levels."""

import numpy as np
import pytest

from diffugts.report import display_window, outline, radiological, top_slices, write_overlay


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


def test_the_truth_outline_is_drawn_where_the_truth_is():
    """Over a picture drawn top row first, the outline of a region in the top rows is at the top
    (contour(origin="upper") drew it at the bottom: the real lesion's outline was upside down)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    region = np.zeros((20, 20))
    region[2:5, 8:12] = 1
    fig, ax = plt.subplots()
    ax.imshow(region, origin="upper")
    drawn = np.concatenate([p.vertices for p in outline(ax, region).get_paths()])
    plt.close(fig)
    assert 1 <= drawn[:, 1].min() and drawn[:, 1].max() <= 5  # rows 2-4, give or take half a pixel
    assert 7 <= drawn[:, 0].min() and drawn[:, 0].max() <= 12


def marked_volume(affine, shape=(20, 22, 6)):
    """Air (-1000 HU) with a bright block in the patient's right-anterior quarter (RAS x > 0, y > 0),
    wherever the voxel axes point."""
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ras = np.tensordot(affine[:3, :3], np.stack([i, j, k]), axes=1) + affine[:3, 3, None, None, None]
    center = np.tensordot(affine[:3, :3], (np.asarray(shape) - 1) / 2, axes=1) + affine[:3, 3]
    image = np.full(shape, -1000.0, np.float32)
    image[(ras[0] > center[0] + 4) & (ras[1] > center[1] + 4)] = 1000.0
    return image


ORIENTATIONS = {
    "RAS": np.diag([2.0, 2.0, 3.0, 1.0]),
    "LPS (a DICOM axial series)": np.diag([-2.0, -2.0, 3.0, 1.0]),
    # voxel axes permuted and flipped: i runs anterior -> posterior, j runs left -> right
    "permuted": np.array([[0, 2.0, 0, 0], [-2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_overlay_png_is_in_radiological_convention(tmp_path, name):
    """The marker at the patient's right-anterior lands top-left in the picture: anterior up,
    the patient's right on the image's left."""
    import matplotlib.image

    affine = ORIENTATIONS[name]
    image = marked_volume(affine)
    turned = radiological(affine, image)[0][..., 3].T  # the slice as drawn (origin upper)
    rows, cols = np.nonzero(turned > 0)
    assert rows.max() < turned.shape[0] / 2 and cols.max() < turned.shape[1] / 2

    assert write_overlay(tmp_path / "o.png", image, np.zeros(image.shape, np.uint8), modality="CT", affine=affine)
    png = matplotlib.image.imread(tmp_path / "o.png")[..., :3]
    from scipy import ndimage

    parts, _ = ndimage.label(png.sum(axis=2) < 0.3)  # the air of the scan (not the title's letters)
    r, c = np.nonzero(parts == np.argmax(np.bincount(parts.ravel())[1:]) + 1)
    top, bottom, left, right = r.min(), r.max(), c.min(), c.max()
    inside = png[top + 2: bottom - 1, left + 2: right - 1]  # off the antialiased border
    wr, wc = np.nonzero(inside.min(axis=2) > 0.9)  # the marker (letters are yellow, not white)
    top, bottom, left, right = 0, inside.shape[0] - 1, 0, inside.shape[1] - 1
    assert wr.size > 20
    assert wr.max() < (top + bottom) / 2 and wc.max() < (left + right) / 2  # top-left quadrant
