"""The training corpus of real anatomy: installed templates, a real head CT, and the phantoms.

`build_corpus(out)` writes an MSD-like folder that domain randomization and lesion synthesis read:

    out/dataset.json
    out/images/<id>.nii.gz   float32, real intensities (CT in HU, MR as stored), RAS affine in mm
    out/labels/<id>.nii.gz   int16 partition of the whole head/body (0 = air outside it)
    out/organs/<id>.nii.gz   uint8 organs where lesions may be placed (dataset.json names them)

Every source is something installed here, read offline; a source that is not installed is
skipped with one warning line. The label maps are meant for SynthSeg-style synthesis (a random
intensity per label), so they partition everything inside the head or body:
- inside the brain: atlas regions (AAL, HarvardOxford, JHU; all in MNI space) where the atlas
  has a label, else grey matter / white matter / CSF (tissue maps or intensity classes);
- outside the brain: CSF, bone, soft tissue, fat and air cavities from intensity classes
  (see `_head_classes` and `_ct_labels`), because no atlas covers the skull and scalp.
"""

from __future__ import annotations

import json
import plistlib
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from .organ_regions import filled


# Tissue classes shared by every entry; atlas regions are offset so that ids never collide.
CSF, GREY_MATTER, WHITE_MATTER, BONE, SOFT_TISSUE, FAT, AIR_CAVITY, BRAIN = 1, 2, 3, 4, 5, 6, 7, 8
TISSUE_NAMES = {CSF: "CSF", GREY_MATTER: "grey matter", WHITE_MATTER: "white matter", BONE: "bone",
                SOFT_TISSUE: "soft tissue", FAT: "fat", AIR_CAVITY: "air cavity",
                BRAIN: "brain parenchyma (grey and white matter not separated)"}
PHANTOM_ORGAN_LABELS = {"lung": 20, "liver": 21, "spleen": 22, "kidney": 23, "pancreas": 24}
ATLAS_OFFSETS = {"aal": 100, "harvard_oxford": 300, "jhu": 400}
BODY_OFFSET = 500  # real body structures (corpus_body), after every atlas

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
INVESALIUS_CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")

# Licences as the packages' own files state them (Debian copyright files, wheel metadata, nilearn's
# dataset descriptions); the model card quotes the same.
SOURCES = {
    "nilearn-mni152": {
        "package": "nilearn (PyPI): the ICBM152 2009a T1 and GM/WM templates bundled in nilearn/datasets/data",
        "licence": "nilearn code: BSD-3-Clause (Copyright (c) The nilearn developers). The ICBM152 2009 "
                   "templates: nilearn's description (datasets/description/icbm152_2009.rst) lists the "
                   "licence as 'unknown' and points to the McConnell Brain Imaging Centre's release page",
        "citation": "Collins et al. 1999; Fonov et al., NeuroImage 47 S102 2009; Fonov et al., NeuroImage 54(1) 2011",
    },
    "mricron-colin27": {
        "package": "mricron-data (Debian): /usr/share/mricron/templates ch2, ch2better, ch2bet, aal, "
                   "HarvardOxford-cort-maxprob-thr0-1mm, JHU-WhiteMatter-labels-1mm",
        "licence": "Debian copyright file (Files: *): Copyright 2006-2010 Chris Rorden, BSD-3-clause; it states "
                   "no separate terms for the templates. nilearn's descriptions: HarvardOxford under the FSL "
                   "licence, AAL 'unknown'",
        "citation": "Holmes et al., J Comput Assist Tomogr 22(2) 1998 (Colin27); Tzourio-Mazoyer et al., "
                    "NeuroImage 15 2002 (AAL); Desikan et al., NeuroImage 31 2006 (HarvardOxford); "
                    "Mori et al., NeuroImage 40 2008 (JHU white matter)",
    },
    "invesalius-cranium": {
        "package": "invesalius-examples (Debian): /usr/share/doc/invesalius-examples/examples/Cranium.inv3",
        "licence": "Debian copyright file (Files: *): (c) 2008-2021 Centro de Tecnologia da Informacao Renato "
                   "Archer, P. H. J. Amorim, T. F. de Moraes, T. Al-Chueyr Pereira Martins; GPL-2",
        "citation": "InVesalius (https://github.com/invesalius/invesalius3), example project Cranium.inv3",
    },
    "pydicom-data": {
        "package": "pydicom-data (PyPI): data_store/data/emri_small.dcm",
        "licence": "MIT (the wheel's LICENSE: Copyright (c) 2020 Dicom in Python)",
        "citation": "pydicom-data, https://github.com/pydicom/pydicom-data",
    },
    "totalsegmentator": {
        "package": "totalsegmentator 2.18.0 (PyPI sdist, fetched by `make data-sources`): "
                   "tests/reference_files/example_ct_sm, example_seg, example_mr_sm, example_seg_mr",
        "licence": "Apache-2.0 (the sdist's LICENSE covers the repository, its test files included; they "
                   "state no separate terms). The organ maps are TotalSegmentator's output",
        "citation": "Wasserthal et al., Radiology: Artificial Intelligence 5(5) 2023 (CT); "
                    "D'Antonoli et al., Radiology 314(2) 2025 (MR)",
    },
    "phantom": {
        "package": "diffugts.phantom (this project)",
        "licence": "Apache-2.0 (this project)",
        "citation": "procedural phantoms of diffugts",
    },
}


@dataclass
class Entry:
    """One corpus volume before it is written: arrays on one grid, with a RAS affine in mm."""

    id: str
    image: np.ndarray
    labels: np.ndarray
    organs: np.ndarray
    affine: np.ndarray
    modality: str
    region: str
    organ_names: dict[str, str]
    source: str
    notes: dict = field(default_factory=dict)


class SourceMissing(Exception):
    """A source is not installed: the corpus skips it with a warning."""


# ---------------------------------------------------------------------------- helpers

def _nib():
    import nibabel as nib

    return nib


def _ras(img):
    """Reorient a nibabel image to RAS (the corpus' convention)."""
    return _nib().as_closest_canonical(img)


def _resample_to(img, ref_shape, ref_affine, order: int) -> np.ndarray:
    """Resample an image onto a reference grid in world coordinates (order 0 for label maps)."""
    from nibabel.processing import resample_from_to

    out = resample_from_to(img, (tuple(ref_shape), ref_affine), order=order, mode="constant", cval=0)
    return np.asanyarray(out.dataobj)


def _otsu_thresholds(values: np.ndarray, classes: int) -> list[float]:
    """Multi-class Otsu thresholds of a 1-D sample (SimpleITK's filter)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(values.astype(np.float32).reshape(1, 1, -1))
    otsu = sitk.OtsuMultipleThresholdsImageFilter()
    otsu.SetNumberOfThresholds(classes - 1)
    otsu.SetNumberOfHistogramBins(256)
    otsu.Execute(image)
    return sorted(otsu.GetThresholds())


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == 1 + int(np.argmax(sizes))


def _head_mask(image: np.ndarray, threshold: float) -> np.ndarray:
    """Everything inside the skin: the largest bright component, closed and filled."""
    mask = _largest_component(image > threshold)
    mask = ndimage.binary_closing(mask, iterations=2)
    return filled(mask)


def _atlas_overlay(labels: np.ndarray, atlas: np.ndarray, name: str, where: np.ndarray) -> None:
    """Atlas regions replace the tissue class where the atlas labels a voxel of the given tissue."""
    hit = where & (atlas > 0)
    labels[hit] = ATLAS_OFFSETS[name] + atlas[hit].astype(np.int16)


# the tissue class each atlas was laid over (`_atlas_overlay` call sites)
ATLAS_TISSUE = {"aal": GREY_MATTER, "harvard_oxford": GREY_MATTER, "jhu": WHITE_MATTER}


def tissue_classes(labels: np.ndarray) -> np.ndarray:
    """The label map with every atlas region put back to the tissue class it was laid over."""
    out = labels.copy()
    for name, low in sorted(ATLAS_OFFSETS.items(), key=lambda item: item[1]):
        high = min([o for o in ATLAS_OFFSETS.values() if o > low], default=BODY_OFFSET)
        out[(labels > low) & (labels < high)] = ATLAS_TISSUE[name]
    out[labels >= BODY_OFFSET] = SOFT_TISSUE  # the body's named structures (corpus_body)
    return out


def _head_classes(image: np.ndarray, head: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """T1 MR outside the brain, by intensity (3-class Otsu of the non-brain head voxels):
    dark = CSF within 3 mm of the brain, else bone (skull, and the air cavities T1 cannot tell
    from it); middle = soft tissue (muscle, skin); bright = fat (scalp fat, marrow)."""
    labels = np.zeros(image.shape, np.int16)
    shell = head & ~brain
    low, high = _otsu_thresholds(image[shell], 3)
    near_brain = ndimage.distance_transform_edt(~brain) <= 3.0
    dark = shell & (image <= low)
    labels[dark & near_brain] = CSF
    labels[dark & ~near_brain] = BONE
    labels[shell & (image > low) & (image <= high)] = SOFT_TISSUE
    labels[shell & (image > high)] = FAT
    return labels


def _brain_classes(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """T1 MR inside the brain by intensity (3-class Otsu): CSF < grey matter < white matter."""
    labels = np.zeros(image.shape, np.int16)
    low, high = _otsu_thresholds(image[brain], 3)
    labels[brain & (image <= low)] = CSF
    labels[brain & (image > low) & (image <= high)] = GREY_MATTER
    labels[brain & (image > high)] = WHITE_MATTER
    return labels


def _mricron(name: str):
    path = MRICRON_TEMPLATES / f"{name}.nii.gz"
    if not path.exists():
        raise SourceMissing(f"{path} not found (Debian package mricron-data)")
    return _ras(_nib().load(str(path)))


def _atlas_names(name: str) -> dict[int, str]:
    """Region names from mricron's `.nii.txt` lists ("index name [code]")."""
    path = MRICRON_TEMPLATES / f"{name}.nii.txt"
    names = {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit() and int(parts[0]) > 0:
                names[int(parts[0])] = parts[1]
    return names


# ---------------------------------------------------------------------------- sources

def _mni152() -> list[Entry]:
    """nilearn's bundled ICBM 2009a T1 (skull-stripped, 1 mm) with its GM/WM maps: nothing is fetched."""
    try:
        from nilearn import datasets
    except ImportError as exc:
        raise SourceMissing("nilearn is not installed (pip install 'diffugts[data]')") from exc
    t1 = _ras(datasets.load_mni152_template(resolution=1))
    gm = np.asanyarray(_ras(datasets.load_mni152_gm_template(resolution=1)).dataobj).astype(np.float32)
    wm = np.asanyarray(_ras(datasets.load_mni152_wm_template(resolution=1)).dataobj).astype(np.float32)
    image = np.asanyarray(t1.dataobj).astype(np.float32)
    brain = ndimage.binary_fill_holes(image > 0)
    # tissue by the larger of the GM, WM and remaining (CSF) probabilities
    probs = np.stack([np.clip(1.0 - gm - wm, 0, 1), gm, wm])
    labels = np.where(brain, np.array([CSF, GREY_MATTER, WHITE_MATTER], np.int16)[probs.argmax(0)], 0).astype(np.int16)
    try:
        ho = _mricron("HarvardOxford-cort-maxprob-thr0-1mm")
        jhu = _mricron("JHU-WhiteMatter-labels-1mm")
        _atlas_overlay(labels, _resample_to(ho, image.shape, t1.affine, 0), "harvard_oxford", labels == GREY_MATTER)
        _atlas_overlay(labels, _resample_to(jhu, image.shape, t1.affine, 0), "jhu", labels == WHITE_MATTER)
        atlases = ["HarvardOxford-cort-maxprob-thr0-1mm", "JHU-WhiteMatter-labels-1mm"]
    except SourceMissing:
        atlases = []  # the tissue classes alone still partition the brain
    return [Entry("mni152_t1", image, labels, brain.astype(np.uint8), t1.affine, "MR", "head",
                  {"1": "brain"}, "nilearn-mni152", {"atlases": atlases, "skull_stripped": True,
                                                     "intensity": "nilearn's loader rescales the template to 0..1"})]


def _colin27() -> list[Entry]:
    """Colin27 T1 with skull (`ch2`, 1 mm; `ch2better`, resampled from 0.5 to 1 mm).

    Brain = `ch2bet` > 0 (same grid as ch2, both in MNI space, so it also maps onto ch2better).
    ch2 gets AAL (drawn on this very brain) over grey matter; ch2better gets HarvardOxford;
    both get JHU over white matter."""
    from nibabel.processing import resample_to_output

    ch2 = _mricron("ch2")
    bet = _mricron("ch2bet")
    aal = _mricron("aal")
    jhu = _mricron("JHU-WhiteMatter-labels-1mm")
    entries = []
    better = _mricron("ch2better")
    better = resample_to_output(better, voxel_sizes=(1.0, 1.0, 1.0), order=1)
    for entry_id, img, cortical, cortical_name in (("colin27_ch2", ch2, aal, "aal"),
                                                   ("colin27_ch2better", better, None, "harvard_oxford")):
        image = np.asanyarray(img.dataobj).astype(np.float32)
        brain = _resample_to(bet, image.shape, img.affine, 0) > 0
        brain = ndimage.binary_fill_holes(_largest_component(ndimage.binary_opening(brain, iterations=1)))
        head_threshold = _otsu_thresholds(image[image > 0], 2)[0] * 0.5
        head = ndimage.binary_fill_holes(_head_mask(image, head_threshold) | brain)
        labels = _head_classes(image, head, brain)
        labels[brain] = _brain_classes(image, brain)[brain]
        if cortical is None:
            cortical = _mricron("HarvardOxford-cort-maxprob-thr0-1mm")
        _atlas_overlay(labels, _resample_to(cortical, image.shape, img.affine, 0), cortical_name,
                       brain & (labels == GREY_MATTER))
        _atlas_overlay(labels, _resample_to(jhu, image.shape, img.affine, 0), "jhu", brain & (labels == WHITE_MATTER))
        entries.append(Entry(entry_id, image, labels, brain.astype(np.uint8), img.affine, "MR", "head",
                             {"1": "brain"}, "mricron-colin27", {"head_threshold": float(head_threshold)}))
    return entries


def read_inv3(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """InVesalius project: the int16 volume (HU) and a RAS affine.

    `matrix.dat` is stored (slice, row, column) with the spacing listed (column, row, slice).
    Looking at the slices: slice index runs to the vertex (superior), row index to the forehead
    (anterior; InVesalius flips DICOM rows for display); columns follow DICOM's column direction
    (patient left), which the anatomy cannot confirm (a head is left-right symmetric)."""
    with tarfile.open(path, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers()}
        main = plistlib.loads(tar.extractfile(members["main.plist"]).read())
        info = main["matrix"]
        raw = tar.extractfile(members[info["filename"]]).read()
    volume = np.frombuffer(raw, dtype=np.dtype(info["dtype"])).reshape(info["shape"])
    sx, sy, sz = (float(s) for s in main["spacing"])
    # (S, A, L) -> (L, A, S) -> (R, A, S)
    volume = volume.transpose(2, 1, 0)[::-1].astype(np.float32)
    affine = np.diag([sx, sy, sz, 1.0])
    return np.ascontiguousarray(volume), affine, {"modality": main.get("modality"), "name": main.get("name")}


def _ct_labels(hu: np.ndarray, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Head CT by HU ranges, and the brain as the soft tissue inside the skull.

    Brain: soft tissue (-30..100 HU, smoothed) away from bone, eroded 4 voxels so that thin
    bridges through the orbits and foramina break, its largest component grown back inside the
    soft tissue (geodesic dilation), holes filled. Labels: bone >= 200 HU; in the brain CSF < 15 HU
    <= parenchyma (grey and white matter differ by ~10 HU, below the noise); elsewhere in the head
    air cavities < -200 <= fat < -30 <= soft tissue."""
    smooth = ndimage.gaussian_filter(hu, 1.0)
    bone = head & (hu >= 200)
    soft = head & (smooth > -30) & (smooth < 100) & ~ndimage.binary_dilation(bone, iterations=1)
    core = _largest_component(ndimage.binary_erosion(soft, iterations=4))
    brain = ndimage.binary_dilation(core, iterations=5, mask=soft)
    brain = filled(brain) & ~bone
    labels = np.zeros(hu.shape, np.int16)
    labels[head & (smooth < -200)] = AIR_CAVITY
    labels[head & (smooth >= -200) & (smooth < -30)] = FAT
    labels[head & (smooth >= -30)] = SOFT_TISSUE
    labels[brain & (smooth < 15)] = CSF
    labels[brain & (smooth >= 15)] = BRAIN
    labels[bone] = BONE
    return labels, brain


def _cranium() -> list[Entry]:
    if not INVESALIUS_CRANIUM.exists():
        raise SourceMissing(f"{INVESALIUS_CRANIUM} not found (Debian package invesalius-examples)")
    hu, affine, meta = read_inv3(INVESALIUS_CRANIUM)
    # the head is the largest component above -400 HU; the headrest (a separate arc) is set to air
    head = _head_mask(hu, -400.0)
    hu = np.where(head, hu, -1024.0).astype(np.float32)
    labels, brain = _ct_labels(hu, head)
    return [Entry("invesalius_cranium_ct", hu, labels, brain.astype(np.uint8), affine, "CT", "head",
                  {"1": "brain"}, "invesalius-cranium", {"scanner_name": meta.get("name"), "headrest_removed": True})]


def _pydicom_data() -> list[Entry]:
    """The one volumetric anatomical scan in pydicom-data: `emri_small.dcm`, a 3-D T1 TFE head MR
    (Enhanced MR, 10 frames of 64x64, a sagittal patch of the brain). Its functional groups were
    stripped, so only SpacingBetweenSlices (1.2 mm) is known: the in-plane spacing is assumed to be
    the same and the axes are assumed sagittal (frames left-right); `notes` says so."""
    try:
        import data_store
        import pydicom
    except ImportError as exc:
        raise SourceMissing("pydicom-data is not installed (pip install 'diffugts[data]')") from exc
    path = Path(data_store.__file__).parent / "data" / "emri_small.dcm"
    if not path.exists():
        raise SourceMissing(f"{path} not found")
    ds = pydicom.dcmread(str(path))
    frames = ds.pixel_array.astype(np.float32)  # (frame, row, column)
    step = float(ds.get("SpacingBetweenSlices", 1.0) or 1.0)
    # frame -> x (R), column -> y (A), row -> z (S, rows go down the image)
    image = np.ascontiguousarray(frames.transpose(0, 2, 1)[:, :, ::-1])
    affine = np.diag([step, step, step, 1.0])
    brain = image > _otsu_thresholds(image.ravel(), 2)[0] * 0.5
    labels = _brain_classes(image, np.ones(image.shape, bool))
    return [Entry("pydicom_emri_small", image, labels, brain.astype(np.uint8), affine, "MR", "head",
                  {"1": "brain"}, "pydicom-data",
                  {"field_of_view": "brain patch, not a whole head", "affine": "assumed (geometry stripped)"})]


def _phantoms(n: int = 6, seed: int = 0) -> list[Entry]:
    """Healthy phantoms at 1.5 mm: label map from the noise-free tissue image and organ masks."""
    from .phantom import TISSUE, make_case

    rng = np.random.default_rng(seed)
    shape, spacing = (128, 128, 96), 1.5
    # make_case draws the kind itself: keep draws until the kinds come in turn (CT body, MR body, MR head)
    kinds = [("CT", "abdomen"), ("MR", "abdomen"), ("MR", "brain")]
    entries = []
    while len(entries) < n:
        image, _, modality, anatomy = make_case(rng, None, shape, spacing, return_anatomy=True)
        tissue, organs, region = anatomy["tissue"], anatomy["organs"], anatomy["region"]
        if (modality, region) != kinds[len(entries) % len(kinds)]:
            continue
        i = len(entries)
        values = TISSUE[modality]
        labels = np.zeros(shape, np.int16)
        labels[tissue != values["air"]] = SOFT_TISSUE
        if region == "brain":
            labels[tissue == values["skull"]] = BONE
            labels[tissue == values["csf"]] = CSF
            labels[organs["brain"]] = BRAIN
            organ_map, names = organs["brain"].astype(np.uint8), {"1": "brain"}
        else:
            labels[(tissue == values["fat"]) & ~np.any(np.stack(list(organs.values())), 0)] = FAT
            for name in ("lung", "liver", "spleen", "kidney", "pancreas", "bone"):  # the phantom's paint order
                labels[organs[name]] = BONE if name == "bone" else PHANTOM_ORGAN_LABELS[name]
            organ_map = np.zeros(shape, np.uint8)
            names = {}
            for k, name in enumerate(PHANTOM_ORGAN_LABELS, start=1):
                organ_map[labels == PHANTOM_ORGAN_LABELS[name]] = k
                names[str(k)] = name
        # the phantom draws the liver at -x and the spine at +y: turned 180 degrees about z, the
        # liver lies on the patient's right and the spine behind, as in RAS
        image, labels, organ_map = (np.ascontiguousarray(a[::-1, ::-1]) for a in (image, labels, organ_map))
        affine = np.diag([spacing, spacing, spacing, 1.0])
        affine[:3, 3] = -np.asarray(shape) * spacing / 2
        entries.append(Entry(f"phantom_{i:02d}_{modality.lower()}_{'head' if region == 'brain' else 'body'}",
                             image, labels, organ_map, affine, modality, "head" if region == "brain" else "body",
                             names, "phantom", {"seed": seed, "index": i}))
    return entries


def _totalsegmentator() -> list[Entry]:
    from .corpus_body import totalsegmentator_examples  # imports this module's helpers

    return totalsegmentator_examples()


BUILDERS: dict[str, Callable[[], list[Entry]]] = {
    "nilearn-mni152": _mni152,
    "mricron-colin27": _colin27,
    "invesalius-cranium": _cranium,
    "pydicom-data": _pydicom_data,
    "totalsegmentator": _totalsegmentator,
    "phantom": _phantoms,
}


# ---------------------------------------------------------------------------- writing

def _crop(entry: Entry, margin: int = 4) -> Entry:
    """Crop to the labelled head/body plus a margin; the affine follows the crop."""
    idx = np.argwhere(entry.labels > 0)
    if len(idx) == 0:
        return entry
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, entry.labels.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    affine = entry.affine.copy()
    affine[:3, 3] = entry.affine[:3, :3] @ lo + entry.affine[:3, 3]
    entry.image, entry.labels, entry.organs, entry.affine = entry.image[sl], entry.labels[sl], entry.organs[sl], affine
    return entry


def _label_names() -> dict[str, str]:
    names = {str(k): v for k, v in TISSUE_NAMES.items()}
    names.update({str(v): f"{k} (phantoms and real body scans)" for k, v in PHANTOM_ORGAN_LABELS.items()})
    from .corpus_body import body_label_names

    names.update(body_label_names())
    for atlas, file in (("aal", "aal"), ("jhu", "JHU-WhiteMatter-labels-1mm")):
        for index, name in _atlas_names(file).items():
            names[str(ATLAS_OFFSETS[atlas] + index)] = f"{atlas}: {name}"
    for index in range(1, 49):
        names.setdefault(str(ATLAS_OFFSETS["harvard_oxford"] + index), f"harvard_oxford: cortical region {index}")
    return names


def _check_sources(names: list[str]) -> list[str]:
    unknown = [s for s in names if s not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown corpus sources {unknown}; known: {', '.join(BUILDERS)}")
    return names


def build_corpus(out: str | Path, sources: list[str] | None = None, n_phantoms: int = 6, seed: int = 0,
                 progress: Callable[[str, bool], None] | None = None) -> Path:
    """Write the corpus; returns the dataset.json path. Missing sources are skipped with a warning.

    `progress(source, finished)` is called as each source starts and ends."""
    nib = _nib()
    names = _check_sources(list(sources) if sources else list(BUILDERS))
    out = Path(out)
    for sub in ("images", "labels", "organs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    training, used, skipped = [], {}, {}
    for source in names:
        if progress:
            progress(source, False)
        try:
            entries = _phantoms(n_phantoms, seed) if source == "phantom" else BUILDERS[source]()
        except SourceMissing as exc:
            warnings.warn(f"corpus: skipping {source}: {exc}", stacklevel=2)
            skipped[source] = str(exc)
            if progress:
                progress(source, True)
            continue
        used[source] = SOURCES[source]
        for entry in entries:
            entry = _crop(entry)
            affine = entry.affine.astype(np.float64)
            for sub, array, dtype in (("images", entry.image, np.float32), ("labels", entry.labels, np.int16),
                                      ("organs", entry.organs, np.uint8)):
                img = nib.Nifti1Image(np.ascontiguousarray(array, dtype=dtype), affine)
                img.header.set_xyzt_units("mm")
                img.set_qform(affine, code=1)
                img.set_sform(affine, code=1)
                nib.save(img, str(out / sub / f"{entry.id}.nii.gz"))
            training.append({
                "id": entry.id, "image": f"./images/{entry.id}.nii.gz", "labels": f"./labels/{entry.id}.nii.gz",
                "organs": f"./organs/{entry.id}.nii.gz", "organ_names": entry.organ_names,
                "modality": entry.modality, "region": entry.region, "source": entry.source,
                "shape": list(entry.image.shape),
                "spacing": [float(s) for s in np.sqrt((entry.affine[:3, :3] ** 2).sum(0))],
                "notes": entry.notes,
            })
        if progress:
            progress(source, True)
    manifest = {"name": "diffugts-anatomy",
                "description": "healthy real anatomy and phantoms for backbone training and lesion synthesis",
                "sources": used, "skipped": skipped, "labels": {"0": "background (air)", **_label_names()},
                "numTraining": len(training), "training": training}
    # a rebuild into the same folder leaves no volume that dataset.json does not list
    written = {f"{e['id']}.nii.gz" for e in training}
    for sub in ("images", "labels", "organs"):
        for stale in (out / sub).glob("*.nii.gz"):
            if stale.name not in written:
                stale.unlink()
    path = out / "dataset.json"
    partial = out / ".dataset.json.partial"
    partial.write_text(json.dumps(manifest, indent=2))
    partial.replace(path)  # dataset.json appears only once every volume is written
    return path


def load_corpus(directory: str | Path) -> list[dict]:
    """Every corpus entry as arrays: image float32, labels int16, organs uint8, affine (4x4, RAS mm),
    modality, region, organ_names, source, id."""
    nib = _nib()
    directory = Path(directory)
    manifest_path = directory / "dataset.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} not found: build it with `diffugts corpus --out {directory}`")
    manifest = json.loads(manifest_path.read_text())
    cases = []
    for item in manifest["training"]:
        img = nib.load(str(directory / item["image"]))
        cases.append({
            "id": item["id"],
            "image": np.asanyarray(img.dataobj).astype(np.float32),
            "labels": np.asanyarray(nib.load(str(directory / item["labels"])).dataobj).astype(np.int16),
            "organs": np.asanyarray(nib.load(str(directory / item["organs"])).dataobj).astype(np.uint8),
            "affine": img.affine,
            "modality": item["modality"], "region": item["region"],
            "organ_names": item["organ_names"], "source": item["source"],
        })
    return cases


def build_corpus_cli(out: str, sources: str | None, n_phantoms: int, seed: int, fail: Callable[[str], None]) -> int:
    """`diffugts corpus`: a rich progress bar per source, one line per skipped source."""
    from rich.console import Console
    from rich.progress import Progress

    try:
        names = _check_sources([s.strip() for s in sources.split(",") if s.strip()] if sources else list(BUILDERS))
        if n_phantoms < 0:
            raise ValueError("--phantoms must be 0 or more")
    except ValueError as exc:
        fail(str(exc))
        return 2
    console = Console(stderr=True, highlight=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Progress(console=console) as progress:
            task = progress.add_task("corpus", total=len(names))
            path = build_corpus(out, names, n_phantoms, seed,
                                progress=lambda source, finished: progress.update(
                                    task, advance=int(finished), description=source))
    for warning in caught:
        if str(warning.message).startswith("corpus:"):
            console.print(f"warning: {warning.message}")
    manifest = json.loads(path.read_text())
    print(f"wrote {manifest['numTraining']} volumes from {len(manifest['sources'])} sources to {path.parent}")
    return 0
