"""The target's organ found by classical image analysis, checked against organ maps we did not draw
with it (the corpus's brains and the phantoms' lungs), and the loop's restriction to it."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest

from diffugts import corpus, organ_regions
from diffugts.io import Volume
from diffugts.organ_regions import organ_envelope, target_organ
from diffugts.pipeline import LoopOptions, segment_volume
from diffugts.preprocess import labels_to_model_grid, to_model_grid
from diffugts.sdists import default_sdist

SPACING = (3.0, 3.0, 3.0)  # the demo preset's


def on_model_grid(entry: corpus.Entry) -> tuple[np.ndarray, np.ndarray]:
    """An entry's image and organ map on the demo preset's model grid."""
    image, _ = to_model_grid(Volume(entry.image, entry.affine, entry.id), entry.modality, SPACING, 64)
    organs = labels_to_model_grid(Volume(entry.organs.astype(np.float32), entry.affine, entry.id), SPACING, 64)
    return image, organs


def organ_map(entry: corpus.Entry, organs: np.ndarray, organ: str) -> np.ndarray:
    return np.isin(organs, [int(k) for k, name in entry.organ_names.items() if name == organ])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.mark.parametrize("target, organ", [
    ("brain tumor", "brain"), ("Glioblastoma", "brain"), ("intracranial hemorrhage", "brain"),
    ("lung nodule", "lung"), ("pulmonary mass", "lung"), ("non-small cell lung cancer", "lung"),
    ("kidney tumor", None), ("liver metastasis", None), ("breast tumor", None), ("nodule", None),
    # the organ the lesion is in, not the one it came from; none when another organ is named
    ("brain metastasis from lung cancer", "brain"), ("liver metastasis from lung cancer", None),
    ("bone metastases of non-small cell lung cancer", None), ("adrenal metastasis bronchogenic carcinoma", None),
    ("lung metastasis of colorectal cancer", "lung"), ("brain and lung tumors", None),
    ("pleural mass", None), ("cancer of the lung", None),
])
def test_a_target_names_its_organ_by_a_word(target, organ):
    assert target_organ(target) == organ


@pytest.fixture(scope="module")
def colin27():
    if not (corpus.MRICRON_TEMPLATES / "ch2.nii.gz").exists():
        pytest.skip("mricron-data not installed (make corpus-sources)")
    return {e.id: e for e in corpus._colin27()}


def test_the_brain_on_a_head_mr_with_skull_and_eyes_is_the_brain(colin27):
    for entry in colin27.values():
        image, organs = on_model_grid(entry)
        region = organ_regions.brain_region(image, "MR", SPACING)
        assert dice(region, organ_map(entry, organs, "brain")) > 0.93, entry.id
    # the eyes and the scalp are outside it: nothing of the region in front of the brain's front
    entry = colin27["colin27_ch2"]
    image, organs = on_model_grid(entry)
    region = organ_regions.brain_region(image, "MR", SPACING)
    front = np.flatnonzero(organ_map(entry, organs, "brain").any(axis=(0, 2))).max()
    assert not region[:, front + 3:].any()


def test_the_brain_in_thick_slices_as_clinical_mr_takes_them(colin27):
    """Colin27 averaged into 6 mm axial slices: the blurred skull gap leaves the eyes and scalp
    attached at the first erosion (region ~2440 ml); the deeper one finds the brain."""
    entry = colin27["colin27_ch2"]
    n = entry.image.shape[2] // 6
    thick = entry.image[..., :n * 6].reshape(*entry.image.shape[:2], n, 6).mean(-1)
    affine = entry.affine.copy()
    affine[:3, 2] *= 6
    image, _ = to_model_grid(Volume(thick, affine, "thick"), "MR", SPACING, 64)
    organs = labels_to_model_grid(Volume(entry.organs[..., 3:n * 6:6].astype(np.float32), affine, "thick"),
                                  SPACING, 64)
    region = organ_regions.brain_region(image, "MR", SPACING)
    assert region.sum() * 27 / 1000 <= organ_regions.MAX_BRAIN_ML
    assert dice(region, organs > 0) > 0.9


def test_a_lesion_of_any_intensity_at_the_brains_edge_stays_in_the_envelope(colin27):
    entry = colin27["colin27_ch2"]
    image, organs = on_model_grid(entry)
    brain = organ_map(entry, organs, "brain")
    edge = np.argwhere(brain & ~organ_regions.shrunk(brain, 3.0, SPACING))
    centre = edge[len(edge) // 3]
    ball = np.linalg.norm((np.indices(image.shape).T - centre).T, axis=0) * SPACING[0] <= 12.0
    for value in (0.0, 1.0):  # a fluid cyst reads like the air; a bleed or a rim like the fat
        lesioned = np.where(ball, value, image)
        envelope = organ_envelope(lesioned, "MR", "brain tumor", SPACING)
        assert envelope[ball & brain].mean() > 0.95, value


def test_the_brain_on_a_real_head_ct():
    if not corpus.INVESALIUS_CRANIUM.exists():
        pytest.skip("invesalius-examples not installed (make corpus-sources)")
    (entry,) = corpus._cranium()
    image, organs = on_model_grid(entry)
    assert dice(organ_regions.brain_region(image, "CT", SPACING), organ_map(entry, organs, "brain")) > 0.93


def test_the_lungs_on_a_ct_body_and_nothing_on_mr():
    ct, mr = corpus._phantoms(n=2)
    image, organs = on_model_grid(ct)
    lungs = organ_map(ct, organs, "lung")
    assert dice(organ_regions.lung_region(image, "CT", SPACING), lungs) > 0.85
    envelope = organ_envelope(image, "CT", "lung nodule", SPACING)
    assert envelope[lungs].all()
    assert envelope.mean() < 0.5  # the body's soft tissue and bone are outside it
    image, _ = on_model_grid(mr)
    assert organ_envelope(image, "MR", "lung nodule", SPACING) is None


def test_an_abdominal_slab_with_only_the_lung_bases_restricts_nothing():
    if not default_sdist("totalsegmentator").is_file():
        pytest.skip("TotalSegmentator's sdist not fetched (make data-sources)")
    from diffugts.corpus_body import totalsegmentator_examples

    ct = next(e for e in totalsegmentator_examples() if e.modality == "CT")
    image, organs = on_model_grid(ct)
    lungs = organ_map(ct, organs, "lung")
    region = organ_regions.lung_region(image, "CT", SPACING)
    assert dice(region, lungs) > 0.9  # the bases are found (the gas in the bowel is not lung)
    assert region.sum() * 27 / 1000 < organ_regions.MIN_ML["lung"]
    assert organ_envelope(image, "CT", "lung nodule", SPACING) is None


def test_the_notice_says_where_the_maps_were_kept_or_that_no_organ_was_found():
    envelope = np.zeros((10, 10, 10), bool)
    envelope[:5] = True
    (kept,) = organ_regions.restriction_notice("lung nodule", envelope, SPACING)
    assert kept == ("the maps were restricted to the lungs found in this scan (14 ml with a 9 mm margin); "
                    "--whole-scan turns this off")
    (missing,) = organ_regions.restriction_notice("glioma", None, SPACING)
    assert missing.startswith("caution: the brain could not be found in this scan (none of 300 ml or more")
    assert organ_regions.restriction_notice("kidney tumor", None, SPACING) == ()


@pytest.fixture(scope="module")
def tiny_executor():
    pytest.importorskip("torch")
    from diffugts.executors import make_executor

    return make_executor("torch", "tiny")


def test_the_loop_restricts_the_maps_to_the_organ_the_target_names(tiny_executor):
    ct, _ = corpus._phantoms(n=2)
    volume = Volume(ct.image, ct.affine, ct.id)
    restricted = segment_volume(tiny_executor, volume, "lung nodule", "CT")
    whole = segment_volume(tiny_executor, volume, "lung nodule", "CT", LoopOptions(organ=False))
    preset = tiny_executor.preset
    model, grid = to_model_grid(volume, "CT", preset.spacing, preset.patch)
    # the envelope as the maps see it on the input grid: 1 inside, 0 away from it, between on its edge
    envelope = grid.to_input_grid(organ_envelope(model, "CT", "lung nodule", preset.spacing).astype(np.float32))
    inside, away = envelope > 1 - 1e-6, envelope < 1e-6
    assert inside.any() and away.any()
    assert whole.anomaly[away].max() > 0  # random weights: the unrestricted map is everywhere
    assert np.all(restricted.anomaly[away] == 0)
    np.testing.assert_allclose(restricted.anomaly[inside], whole.anomaly[inside], rtol=1e-5, atol=1e-7)
    assert not (restricted.mask.astype(bool) & away).any()
    assert restricted.notices[-1].startswith("the maps were restricted to the lungs found in this scan (")
    assert not any("restricted" in n for n in whole.notices)
    # a target that names no organ we find: the same run, voxel for voxel
    np.testing.assert_array_equal(segment_volume(tiny_executor, volume, "kidney tumor", "CT").mask,
                                  segment_volume(tiny_executor, volume, "kidney tumor", "CT",
                                                 LoopOptions(organ=False)).mask)


def test_inside_a_restricted_organ_one_lesion_keeps_its_largest_component(tiny_executor):
    from diffugts.executors.base import preset_changes
    from diffugts.postprocess import probability_to_mask

    ct, _ = corpus._phantoms(n=2)
    volume = Volume(ct.image, ct.affine, ct.id)
    probability = segment_volume(tiny_executor, volume, "lung nodule", "CT").probability
    threshold = float(np.quantile(probability[probability > 0], 0.9))  # random weights: several blobs above it
    assert cc3d.connected_components(probability > threshold, connectivity=26, return_N=True)[1] > 1
    with preset_changes(tiny_executor, organ_top_k=1, min_component_mm3=0.0, mask_threshold=threshold):
        one = segment_volume(tiny_executor, volume, "lung nodule", "CT")
        several = segment_volume(tiny_executor, volume, "lung nodules", "CT")
        whole = segment_volume(tiny_executor, volume, "lung nodule", "CT", LoopOptions(organ=False))
    assert [s.components.top_k for s in (one, several, whole)] == [1, 0, 0]  # restricted and singular only
    for seg in (one, several, whole):
        np.testing.assert_array_equal(seg.mask, probability_to_mask(seg.probability, volume.spacing, threshold,
                                                                    0.0, seg.components.top_k))
    assert cc3d.connected_components(one.mask, connectivity=26, return_N=True)[1] == 1
    assert one.notices[-1].startswith("kept the largest component of ")


def test_a_component_mostly_outside_the_organ_itself_is_dropped():
    region = np.zeros((40, 40, 40), bool)
    region[5:30, 5:35, 5:35] = True
    above = np.zeros_like(region)
    above[10:16, 10:16, 10:16] = True  # inside
    above[27:33, 20:26, 20:26] = True  # half in, half out: 3 of 6 rows inside -> not "mostly" inside
    above[26:32, 5:11, 25:31] = True  # 4 of 6 rows inside: kept
    above[33:38, 30:36, 30:36] = True  # outside (the margin)
    keep = organ_regions.mostly_inside(above, region)
    assert keep.dtype == np.float32 and keep[~above].min() == 1  # only components are ever dropped
    assert keep[12, 12, 12] == 1 and keep[28, 7, 27] == 1
    assert keep[30, 22, 22] == 0 and keep[35, 32, 32] == 0
    assert np.all(organ_regions.mostly_inside(np.zeros_like(region), region) == 1)


def test_the_loop_zeroes_the_probability_of_what_mostly_inside_drops(tiny_executor, monkeypatch):
    from diffugts import pipeline

    calls = []

    def nothing_inside(above, region):
        calls.append((above.shape, region.shape, bool(above.any())))
        return np.zeros(above.shape, np.float32)

    monkeypatch.setattr(pipeline, "mostly_inside", nothing_inside)
    ct, _ = corpus._phantoms(n=2)
    volume = Volume(ct.image, ct.affine, ct.id)
    restricted = segment_volume(tiny_executor, volume, "lung nodule", "CT")
    assert len(calls) == 1 and calls[0][0] == calls[0][1]  # on the model grid, beside the region
    assert restricted.probability.max() == 0 and not restricted.mask.any()
    assert restricted.anomaly.max() > 0  # the map is the envelope's, not the components'
    segment_volume(tiny_executor, volume, "kidney tumor", "CT")  # no organ: never called
    assert len(calls) == 1
