"""The target's organ, found by classical image analysis, to restrict the maps to it.

ZePT restricts each tumour to its organ (method.md, "Peer"). We have no organ model, but two
organs are found reliably from intensities alone, and they are the ones whose false positives
swamp the real tumours (eyes and scalp around a brain; humeral heads, spine, stomach and aorta
around the lungs):

- the brain, on MR or CT: the head's tissue, eroded until the skull's gap cuts the scalp, eyes and
  neck away, the large pieces grown back, closed and filled;
- the lungs, on CT: the air inside the body, closed and filled so that nodules and masses in or
  against the lung are in it.

A target names its organ by a word (`ORGAN_WORDS`); any other target is not restricted. A region
that comes out implausibly small (a crop, a slab, an odd contrast) restricts nothing either: the
rule must never take away what the maps found when it cannot find the organ.
"""

from __future__ import annotations

import re

import cc3d
import numpy as np
from scipy import ndimage

from .notices import CAUTION

ORGAN_WORDS = {
    "brain": ("brain", "cerebral", "cerebellar", "intracranial", "glioma", "glioblastoma", "astrocytoma",
              "meningioma", "oligodendroglioma"),
    "lung": ("lung", "lungs", "pulmonary", "bronchial", "bronchogenic"),
}
# other organs a target may name: "liver metastasis" is not restricted, nor "adrenal mass bronchogenic"
OTHER_ORGAN_WORDS = (
    "liver", "hepatic", "hepatocellular", "bone", "bones", "osseous", "spine", "spinal", "vertebral",
    "adrenal", "kidney", "kidneys", "renal", "pancreas", "pancreatic", "spleen", "splenic", "breast",
    "colon", "colorectal", "rectal", "prostate", "thyroid", "bladder", "ovary", "ovarian", "stomach",
    "gastric", "esophageal", "oesophageal", "pleural", "chest", "wall", "skin", "lymph", "node", "nodes",
)
# grown around the organ so that a lesion on its border (juxtapleural, at the dura) stays whole
MARGIN_MM = 9.0
# brain: deeper than the skull and CSF gap, shallower than half the brain; deeper steps for thick
# slices (Colin27 averaged into 6 mm slices: region Dice 0.81 at 7 mm, 0.93 at 9 mm)
ERODE_MM = (7.0, 9.0, 11.0, 13.0)
MAX_BRAIN_ML = 2100.0  # above the intracranial volume of a large adult
CLOSE_MM = 15.0  # bridges a lesion against the organ's edge (the pleura, the hilum, the dura)
LUNG_MEDIAN_HU = -960.0
BRAIN_HU = (-900.0, 300.0)  # neither air nor bone: a lesion may read anything between
MIN_ML = {"brain": 300.0, "lung": 300.0}


def target_organ(target: str) -> str | None:
    """'lung nodule' -> 'lung', 'glioma' -> 'brain', 'kidney tumor' -> None.

    The organ the lesion is in, not the one it came from ("brain metastasis from lung cancer" ->
    'brain'; "bone metastases of NSCLC" -> None), and only when the target names no other organ:
    a restriction to the wrong organ would take the lesion away."""
    where = re.split(r"\b(?:from|of)\b", target.lower())[0]
    words = set(re.findall(r"[a-z]+", where))
    named = [organ for organ, names in ORGAN_WORDS.items() if words & set(names)]
    return named[0] if len(named) == 1 and not words & set(OTHER_ORGAN_WORDS) else None


def millilitres(mask: np.ndarray, spacing) -> float:
    return float(mask.sum()) * float(np.prod(spacing)) / 1000.0


def hounsfield(image: np.ndarray) -> np.ndarray:
    """Model intensities of a CT ([0, 1] over -1000..1000 HU) back in HU."""
    return image * 2000.0 - 1000.0


def distance_mm(mask: np.ndarray, spacing) -> np.ndarray:
    """Distance of every voxel outside `mask` to it, in mm (0 inside)."""
    return ndimage.distance_transform_edt(~mask, sampling=spacing)


def grown(mask: np.ndarray, mm: float, spacing) -> np.ndarray:
    return distance_mm(mask, spacing) <= mm if mask.any() else mask


def shrunk(mask: np.ndarray, mm: float, spacing) -> np.ndarray:
    return ndimage.distance_transform_edt(mask, sampling=spacing) > mm


def large_components(mask: np.ndarray, share: float) -> np.ndarray:
    """The components of at least `share` of the largest one's size."""
    labels = cc3d.connected_components(mask.view(np.uint8), connectivity=6)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.isin(labels, np.flatnonzero(sizes >= share * sizes.max())) if sizes.any() else mask


def filled(mask: np.ndarray) -> np.ndarray:
    """Holes filled in 3D, then in each axial slice (a hole open at the volume's top or bottom)."""
    return filled_slices(ndimage.binary_fill_holes(mask))


def closed(mask: np.ndarray, mm: float, spacing) -> np.ndarray:
    """Grown then shrunk by `mm`: bridges gaps and concavities narrower than that."""
    return ~grown(~grown(mask, mm, spacing), mm, spacing) if mask.any() else mask


def filled_slices(mask: np.ndarray) -> np.ndarray:
    """Holes filled in each axial slice (a skull open at the foramen magnum has no 3D hole)."""
    out = mask.copy()
    for z in range(mask.shape[2]):
        out[..., z] = ndimage.binary_fill_holes(mask[..., z])
    return out


def head_signal(image: np.ndarray, modality: str) -> np.ndarray:
    """CT: the brain's band of HU (parenchyma, blood, CSF; not bone, fat or air). MR: the scan's
    signal above its Otsu level over every voxel (air, cortical bone and most CSF below)."""
    if modality == "CT":
        hu = hounsfield(image)
        return (hu > BRAIN_HU[0]) & (hu < BRAIN_HU[1])
    import SimpleITK as sitk  # here, not on import: training machines load the loop without it

    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(sitk.GetImageFromArray(image))
    return image > otsu.GetThreshold()


def brain_region(image: np.ndarray, modality: str, spacing) -> np.ndarray:
    """The head's signal eroded until the skull's gap cuts the scalp, eyes and neck away, the
    large pieces grown back; closed and filled so that a lesion of any intensity inside or at the
    edge of the brain stays in. Thick slices blur the gap along z: while the region is larger
    than any brain (`MAX_BRAIN_ML`, the eyes or scalp still attached), erode deeper."""
    signal = head_signal(image, modality)
    for erode in ERODE_MM:
        # both hemispheres when a large lesion parts them
        core = large_components(shrunk(signal, erode, spacing), 0.25)
        region = filled(closed(grown(core, erode, spacing), CLOSE_MM, spacing))
        if millilitres(region, spacing) <= MAX_BRAIN_ML:
            break
    return region


def lung_region(image: np.ndarray, modality: str, spacing) -> np.ndarray:
    if modality != "CT":  # air is dark on MR, like everything else without signal
        return np.zeros(image.shape, bool)
    hu = hounsfield(image)
    air = hu < -400
    inside = np.zeros_like(air)
    for z in range(air.shape[2]):  # per axial slice: a lung open at the scan's end reaches no side
        labels, _ = ndimage.label(air[..., z])
        sides = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        inside[..., z] = air[..., z] & ~np.isin(labels, sides)
    # lung parenchyma reads -950..-600 HU at our spacing; gas in the bowel is air itself
    labels, n = cc3d.connected_components(inside.view(np.uint8), connectivity=6, return_N=True)
    medians = np.asarray(ndimage.median(hu, labels, np.arange(1, n + 1))) if n else np.zeros(0)
    parenchyma = np.isin(labels, 1 + np.flatnonzero(medians > LUNG_MEDIAN_HU))
    lungs = large_components(parenchyma, 0.1)  # both lungs, not a stray pocket
    # filled in 3D only: in an axial slice the mediastinum lies between the lungs, closed off
    return ndimage.binary_fill_holes(closed(lungs, CLOSE_MM, spacing))


RULES = {"brain": brain_region, "lung": lung_region}
NAMES = {"brain": "brain", "lung": "lungs"}


def organ_region(image: np.ndarray, modality: str, target: str, spacing) -> np.ndarray | None:
    """Voxels of the model grid where the target's organ is, or None when the target names no organ
    we find or the organ found is implausibly small."""
    organ = target_organ(target)
    if organ is None:
        return None
    region = RULES[organ](image, modality.upper(), spacing)
    return region if millilitres(region, spacing) >= MIN_ML[organ] else None


def with_margin(region: np.ndarray | None, spacing) -> np.ndarray | None:
    """The envelope: `region` with `MARGIN_MM` around it (a lesion at the organ's edge stays in)."""
    return None if region is None else grown(region, MARGIN_MM, spacing)


def organ_envelope(image: np.ndarray, modality: str, target: str, spacing) -> np.ndarray | None:
    """`organ_region` with `MARGIN_MM` around it, or None."""
    return with_margin(organ_region(image, modality, target, spacing), spacing)


def mostly_inside(above: np.ndarray, region: np.ndarray) -> np.ndarray:
    """0 on the components of `above` that lie mostly (more than half) outside `region`, in the
    envelope's margin (an eye beside a brain region that thick slices joined to the orbits); 1
    elsewhere. The margin is there for a lesion at the organ's edge, not for one beside it."""
    labels, n = cc3d.connected_components(above.astype(np.uint8), connectivity=26, return_N=True)
    if n == 0:
        return np.ones(above.shape, np.float32)
    share = np.asarray(ndimage.mean(region, labels, np.arange(1, n + 1)))
    return (~np.isin(labels, np.flatnonzero(share <= 0.5) + 1)).astype(np.float32)


def restriction_notice(target: str, envelope: np.ndarray | None, spacing) -> tuple[str, ...]:
    """What a reader of the mask should know about the restriction (`Segmentation.notices`)."""
    organ = target_organ(target)
    if organ is None:
        return ()
    name = NAMES[organ]
    if envelope is None:
        return (f"{CAUTION}the {name} could not be found in this scan (none of {MIN_ML[organ]:g} ml or more: a crop, a "
                f"slab, another region), so the maps were not restricted to the {name}",)
    return (f"the maps were restricted to the {name} found in this scan ({millilitres(envelope, spacing):.0f} ml with a "
            f"{MARGIN_MM:g} mm margin); --whole-scan turns this off",)
