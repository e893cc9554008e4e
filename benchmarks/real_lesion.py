"""A real MR with a marked liver lesion (pydicom-data: MR-SIEMENS-DICOM-WithOverlays.dcm).

One 2D slice whose overlay plane circles the lesion. The slice is repeated along z into a thin
pseudo-volume at its slice thickness (the loop is 3D); the truth is the filled overlay contour
that circles the lesion (the largest filled component inside the body). Reported as measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from diffugts.io import Volume
from diffugts.metrics import auroc, dice
from diffugts.pipeline import LoopOptions, run_segmentation

DICOM_NAME = "MR-SIEMENS-DICOM-WithOverlays.dcm"
DEPTH = 12


def load_case() -> tuple[Volume, np.ndarray]:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file(DICOM_NAME))
    image = ds.pixel_array.astype(np.float32)
    overlay = ds.overlay_array(0x6000).astype(bool)
    filled, n = ndimage.label(ndimage.binary_fill_holes(overlay))
    body = image > np.percentile(image, 60)
    inside = [ndimage.sum(body, filled, i) / max(ndimage.sum(np.ones_like(body), filled, i), 1) for i in range(1, n + 1)]
    sizes = ndimage.sum(np.ones_like(body), filled, range(1, n + 1))
    lesion = filled == 1 + int(np.argmax(np.where(np.asarray(inside) > 0.5, sizes, 0)))
    row, col = (float(v) for v in ds.PixelSpacing)
    thickness = float(ds.get("SliceThickness", 4.0))
    affine = np.diag([-col, -row, thickness, 1.0])  # LPS rows/cols -> RAS
    volume = np.repeat(image.T[:, :, None], DEPTH, axis=2)
    truth = np.repeat(lesion.T[:, :, None], DEPTH, axis=2)
    return Volume(volume, affine, DICOM_NAME), truth


def run_real_lesion(executor, out: Path, prompt: str = "liver lesion", options: LoopOptions | None = None) -> dict:
    from diffugts.report import write_json, write_overlay

    volume, truth = load_case()
    seg = run_segmentation(executor, volume, prompt, "MR", options or LoopOptions())
    z = DEPTH // 2
    result = {"file": DICOM_NAME, "prompt": prompt, "preset": executor.preset.name,
              "dice_center_slice": dice(seg.mask[..., z], truth[..., z]),
              "auroc_center_slice": auroc(seg.anomaly[..., z], truth[..., z]),
              "mask_pixels_center_slice": int(seg.mask[..., z].sum()), "truth_pixels": int(truth[..., z].sum())}
    write_json(out / "real_lesion.json", result)
    write_overlay(out / "real_lesion_overlay.png", volume.array, seg.mask, seg.anomaly, truth,
                  title=f"{DICOM_NAME}: '{prompt}', Dice {result['dice_center_slice']:.3f}", modality="MR",
                  affine=volume.affine)
    return result
