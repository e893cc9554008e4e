"""DICOM out: the mask as a DICOM Segmentation (and the anomaly map as a Parametric Map), highdicom.

The mask is on the grid the series was read into (`dicom_series.read_series`): slice k of the
volume is header k of the series, so frame k of the SEG is `mask[:, :, k].T` (rows = Y,
columns = X) and references source image k. highdicom takes the plane positions, orientation
and the study / series / frame-of-reference references from the source headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import weights_sha256

# SNOMED CT concepts for what a prompt asks for (Segmentation Property Type, DICOM CID 7151 and
# neighbours); the first word found wins. Anything else is coded as the generic "Lesion".
FINDING_CODES = (
    (("metastasis", "metastases", "metastatic"), "NeoplasmMetastatic"),
    (("tumor", "tumour", "tumors", "tumours", "neoplasm", "cancer", "carcinoma", "malignancy"), "Neoplasm"),
    (("cyst", "cysts", "cystic"), "Cyst"),
    (("nodule", "nodules"), "Nodule"),
    (("mass", "masses"), "Mass"),
    (("haemorrhage", "hemorrhage", "bleed", "bleeding"), "Hemorrhage"),
    (("hematoma", "haematoma"), "Hematoma"),
    (("abscess",), "Abscess"),
    (("edema", "oedema"), "Edema"),
)
GENERIC_FINDING = "Lesion"
ORGAN_CODES = (
    (("kidney", "renal"), "Kidney"), (("liver", "hepatic"), "Liver"), (("lung", "pulmonary"), "Lung"),
    (("pancreas", "pancreatic"), "Pancreas"), (("brain", "cerebral"), "Brain"), (("spleen", "splenic"), "Spleen"),
    (("colon", "colonic"), "Colon"), (("bone",), "Bone"), (("breast",), "Breast"), (("prostate",), "Prostate"),
    (("bladder",), "Bladder"), (("stomach", "gastric"), "Stomach"), (("gallbladder",), "Gallbladder"),
    (("thyroid",), "Thyroid"),
)
LO_MAX = 64  # characters in a DICOM LO value (segment label, series description)


@dataclass(frozen=True)
class AlgorithmIdentity:
    """What made the mask, as the SEG's Algorithm Identification Sequence states it."""

    version: str
    preset: str
    weights_sha256: str  # "none (random init)" when a preset has no weights
    backend: str = "torch"
    name: str = "diffugts"

    def parameters(self) -> dict[str, str]:
        return {"preset": self.preset, "weights_sha256": self.weights_sha256, "backend": self.backend}


def algorithm_identity(preset, weights: str | None = None, backend: str = "torch") -> AlgorithmIdentity:
    """The preset's name and the SHA-256 of the weights it runs (a given file or the bundled one)."""
    from . import __version__

    digest = weights_sha256(preset, weights) or "none (random init)"
    return AlgorithmIdentity(__version__, preset.name, digest, backend)


def _words(prompt: str) -> list[str]:
    return re.findall(r"[a-z]+", prompt.lower())


def finding_code(prompt: str):
    """SNOMED CT code of the finding a prompt names; the generic 'Lesion' when none maps."""
    from pydicom.sr.codedict import codes

    words = set(_words(prompt))
    for keys, name in FINDING_CODES:
        if words & set(keys):
            return getattr(codes.SCT, name)
    return getattr(codes.SCT, GENERIC_FINDING)


def anatomy_codes(prompt: str) -> list:
    from pydicom.sr.codedict import codes

    words = set(_words(prompt))
    return [getattr(codes.SCT, name) for keys, name in ORGAN_CODES if words & set(keys)]


def _new_series_number(series) -> int:
    return int(series.first.get("SeriesNumber", 0) or 0) + 1000


def build_seg(series, mask: np.ndarray, prompt: str, identity: AlgorithmIdentity):
    """A binary DICOM SEG (pydicom Dataset) of `mask` (X, Y, Z on the series' grid), one segment."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frames = _frames(series, mask)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=identity.name, family=codes.cid7162.ArtificialIntelligence, version=identity.version,
        parameters=identity.parameters())
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=prompt[:LO_MAX],
        segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
        segmented_property_type=finding_code(prompt),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, anatomic_regions=anatomy_codes(prompt) or None)
    seg = hd.seg.Segmentation(
        source_images=series.headers, pixel_array=frames.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[description],
        series_instance_uid=hd.UID(), series_number=_new_series_number(series),
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="diffugts",
        manufacturer_model_name=f"diffugts {identity.preset}", software_versions=identity.version,
        device_serial_number=identity.weights_sha256[:16], content_label="DIFFUGTS",
        content_description=f"diffugts: {prompt}"[:LO_MAX],
        omit_empty_frames=False)  # every source frame is referenced, lesion or not
    seg.SeriesDescription = f"SEG {prompt}"[:LO_MAX]
    return seg


def build_parametric_map(series, anomaly: np.ndarray, prompt: str, identity: AlgorithmIdentity):
    """The anomaly map (X, Y, Z on the series' grid, values 0-1) as a float DICOM Parametric Map."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frames = _frames(series, anomaly).astype(np.float32)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY", lut_explanation=f"diffugts anomaly probability: {prompt}"[:LO_MAX],
        unit=codes.UCUM.NoUnits, value_range=(0.0, 1.0), slope=1, intercept=0)
    pm = hd.pm.ParametricMap(
        source_images=series.headers, pixel_array=frames, series_instance_uid=hd.UID(),
        series_number=_new_series_number(series) + 1, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="diffugts", manufacturer_model_name=f"diffugts {identity.preset}",
        software_versions=identity.version, device_serial_number=identity.weights_sha256[:16],
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        window_center=0.5, window_width=1.0, content_label="DIFFUGTS")
    pm.SeriesDescription = f"anomaly map {prompt}"[:LO_MAX]
    pm.Laterality = ""  # type 2C; unknown to us (dciodvfy: an error when absent, a warning when empty)
    return pm


def _frames(series, volume: np.ndarray) -> np.ndarray:
    """(X, Y, Z) on the series' grid -> (frames, rows, columns) in the series' header order."""
    first = series.first
    expected = (int(first.Columns), int(first.Rows), len(series.headers))
    if volume.shape != expected:
        raise ValueError(f"array of shape {volume.shape} does not match the series' grid {expected}")
    return np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))

