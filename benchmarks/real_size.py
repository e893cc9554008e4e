"""A CT-sized volume (512 x 512 x 300, LPS, anisotropic spacing) end to end: seconds per stage,
pre- plus postprocessing's share, peak RSS. The phantoms elsewhere are small and hide the cost
of going to and from the model grid; this is the size users send."""

from __future__ import annotations

import resource
import time

import numpy as np
from scipy import ndimage

from diffugts.io import Volume
from diffugts.phantom import CATEGORIES, make_case

SHAPE = (512, 512, 300)
SPACING = (0.8, 0.8, 1.25)  # mm: a typical abdominal CT


def ct_sized_volume(shape=SHAPE, spacing=SPACING, seed: int = 5,
                    category: str = "kidney tumor") -> tuple[Volume, np.ndarray]:
    """A phantom made at 4 mm and brought to CT size (linear), with CT-like noise, on an LPS grid
    (so that reorientation is exercised as with a scanner's DICOM)."""
    rng = np.random.default_rng(seed)
    coarse = tuple(max(int(round(n * s / 4.0)), 8) for n, s in zip(shape, spacing))
    image, label, _ = make_case(rng, CATEGORIES[category], coarse, 4.0)
    zoom = [n / c for n, c in zip(shape, coarse)]
    big = ndimage.zoom(image, zoom, order=1, output=np.float32, grid_mode=True, mode="grid-constant")
    big += rng.normal(0, 10, big.shape).astype(np.float32)
    truth = ndimage.zoom(label, zoom, order=0, grid_mode=True, mode="grid-constant")
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS, as DICOM stores it
    return Volume(np.round(big).astype(np.float32), affine), truth.astype(bool)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_real_size(executor, prompt: str = "kidney tumor", volume: Volume | None = None) -> dict:
    from diffugts.metrics import dice
    from diffugts.pipeline import run_segmentation

    truth = None
    if volume is None:
        volume, truth = ct_sized_volume()
    start = time.perf_counter()
    seg = run_segmentation(executor, volume, prompt, "CT")
    total = time.perf_counter() - start
    seconds = {k: float(v) for k, v in seg.timings.items() if k != "total"}
    seconds["total"] = total
    io = seconds.get("preprocess", 0.0) + seconds.get("postprocess", 0.0)
    return {"shape": list(volume.array.shape), "spacing_mm": [float(s) for s in volume.spacing],
            "seconds": seconds, "pre_post_fraction": io / total, "peak_rss_mb": peak_rss_mb(),
            "dice": float(dice(seg.mask, truth)) if truth is not None else None}
