"""Real body anatomy for the corpus: TotalSegmentator's example CT and MR with their organ maps.

TotalSegmentator's sdist keeps, for its own tests, an abdominal CT slab (`example_ct_sm`, 30 slices
at 3 mm, with the 117-class map `example_seg`) and an abdominal MR slab (`example_mr_sm`, 20 slices
at 3 mm, with the 50-class map `example_seg_mr`). The maps are TotalSegmentator's output, not
hand-drawn, which is enough to say where an organ is. Organs where lesions may go take the
phantoms' label ids (lung, liver, spleen, kidney, pancreas), bones take the bone class, every other
structure its own id (BODY_OFFSET + TotalSegmentator's class), and the rest of the body a tissue
class by intensity, so that SynthSeg-style contrasts have parts to paint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from .corpus import (AIR_CAVITY, BODY_OFFSET, BONE, FAT, PHANTOM_ORGAN_LABELS, SOFT_TISSUE, Entry,
                     SourceMissing, _head_mask, _otsu_thresholds, _ras)
from .sdists import checked_sdist, extract

FILES = {"CT": ("tests/reference_files/example_ct_sm.nii.gz", "tests/reference_files/example_seg.nii.gz"),
         "MR": ("tests/reference_files/example_mr_sm.nii.gz", "tests/reference_files/example_seg_mr.nii.gz")}

# TotalSegmentator's class ids (totalsegmentator/map_to_binary.py, tasks "total" and "total_mr", 2.18.0)
ORGANS = {
    "CT": {"lung": (10, 11, 12, 13, 14), "liver": (5,), "spleen": (1,), "kidney": (2, 3), "pancreas": (7,)},
    "MR": {"lung": (10, 11), "liver": (5,), "spleen": (1,), "kidney": (2, 3), "pancreas": (7,)},
}
BONES = {"CT": tuple(range(25, 51)) + tuple(range(69, 79)) + (91,) + tuple(range(92, 118)),
         "MR": tuple(range(18, 21)) + tuple(range(30, 40))}
STRUCTURES = {  # the others, named in the corpus's label list
    "CT": {4: "gallbladder", 6: "stomach", 8: "adrenal gland right", 9: "adrenal gland left", 15: "esophagus",
           16: "trachea", 17: "thyroid gland", 18: "small bowel", 19: "duodenum", 20: "colon",
           21: "urinary bladder", 22: "prostate", 23: "kidney cyst left", 24: "kidney cyst right", 51: "heart",
           52: "aorta", 53: "pulmonary vein", 62: "superior vena cava", 63: "inferior vena cava",
           64: "portal and splenic vein", 79: "spinal cord", 86: "autochthon left", 87: "autochthon right",
           88: "iliopsoas left", 89: "iliopsoas right", 90: "brain"},
    "MR": {4: "gallbladder", 6: "stomach", 8: "adrenal gland right", 9: "adrenal gland left", 12: "esophagus",
           13: "small bowel", 14: "duodenum", 15: "colon", 16: "urinary bladder", 17: "prostate", 21: "spinal cord",
           22: "heart", 23: "aorta", 24: "inferior vena cava", 25: "portal and splenic vein",
           46: "autochthon left", 47: "autochthon right", 48: "iliopsoas left", 49: "iliopsoas right", 50: "brain"},
}
MR_OFFSET = 100
MIN_ORGAN_ML = 5.0  # an organ the slab holds less of gets no lesions  # MR classes sit above the CT ones: BODY_OFFSET + MR_OFFSET + class


def body_label_names() -> dict[str, str]:
    names = {}
    for modality, offset in (("CT", BODY_OFFSET), ("MR", BODY_OFFSET + MR_OFFSET)):
        for index, name in STRUCTURES[modality].items():
            names[str(offset + index)] = f"totalsegmentator {modality}: {name}"
    return names


def _body_tissue(image: np.ndarray, body: np.ndarray, modality: str) -> np.ndarray:
    """Tissue classes of the body outside the named structures: CT by HU, MR by 3-class Otsu."""
    labels = np.zeros(image.shape, np.int16)
    smooth = ndimage.gaussian_filter(image, 0.7)
    if modality == "CT":
        labels[body & (smooth < -200)] = AIR_CAVITY
        labels[body & (smooth >= -200) & (smooth < -30)] = FAT
        labels[body & (smooth >= -30)] = SOFT_TISSUE
        labels[body & (smooth >= 200)] = BONE
    else:  # dark: air and cortical bone; middle: soft tissue; bright: fat (T1-like) or fluid
        low, high = _otsu_thresholds(smooth[body], 3)
        labels[body & (smooth < low)] = AIR_CAVITY
        labels[body & (smooth >= low) & (smooth < high)] = SOFT_TISSUE
        labels[body & (smooth >= high)] = FAT
    return labels


def _entry(image_path: Path, seg_path: Path, modality: str) -> Entry:
    import nibabel as nib

    img = _ras(nib.load(str(image_path)))
    seg = _ras(nib.load(str(seg_path)))
    if seg.shape != img.shape or not np.allclose(seg.affine, img.affine, atol=1e-3):
        raise ValueError(f"{seg_path.name} is not on {image_path.name}'s grid")
    image = np.asanyarray(img.dataobj).astype(np.float32)
    classes = np.asanyarray(seg.dataobj).astype(np.int16)
    if modality == "CT":
        threshold = -500.0
    else:
        threshold = 0.5 * _otsu_thresholds(image.ravel(), 2)[0]
    # a slab ends where the body goes on: pad with its end slices, or the mask's closing eats them
    padded = _head_mask(np.pad(image, 3, mode="edge"), threshold)[3:-3, 3:-3, 3:-3]
    body = ndimage.binary_fill_holes(padded | (classes > 0))
    labels = _body_tissue(image, body, modality)
    offset = BODY_OFFSET + (MR_OFFSET if modality == "MR" else 0)
    for index in STRUCTURES[modality]:
        labels[classes == index] = offset + index
    labels[np.isin(classes, BONES[modality])] = BONE
    organs = np.zeros(image.shape, np.uint8)
    names = {}
    voxel_ml = abs(np.linalg.det(img.affine[:3, :3])) / 1000.0
    for k, organ in enumerate(PHANTOM_ORGAN_LABELS, start=1):
        where = np.isin(classes, ORGANS[modality][organ])
        labels[where] = PHANTOM_ORGAN_LABELS[organ]
        if where.sum() * voxel_ml >= MIN_ORGAN_ML:  # the MR slab grazes the lung: no room for a lesion
            organs[where] = k
            names[str(k)] = organ
    if modality == "CT":
        image = np.where(body, image, -1024.0).astype(np.float32)  # the table is not anatomy
    return Entry(f"totalsegmentator_{modality.lower()}_abdomen", image, labels, organs, img.affine.astype(np.float64),
                 modality, "body", names, "totalsegmentator",
                 {"organ_maps": "TotalSegmentator's own output (its test reference), not hand-drawn",
                  "field_of_view": f"an upper-abdomen slab of {image.shape[2]} slices"})


def totalsegmentator_examples() -> list[Entry]:
    try:
        sdist = checked_sdist("totalsegmentator")
    except FileNotFoundError as exc:
        raise SourceMissing(str(exc)) from None
    with tempfile.TemporaryDirectory() as tmp:
        files = extract(sdist, [name for pair in FILES.values() for name in pair], Path(tmp))
        return [_entry(files[FILES[m][0]], files[FILES[m][1]], m) for m in ("CT", "MR")]
