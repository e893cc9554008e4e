"""The fast paths to and from the model grid give the very masks and intensities of the plain
ones: box-only resampling of the probability, in-place float32 intensity scaling."""

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from diffugts.benchmarks.real_size import ct_sized_volume
from diffugts.postprocess import mask_on_input_grid, probability_to_mask
from diffugts.preprocess import resample, scale_intensity, to_model_grid


@pytest.fixture(scope="module")
def ct():
    return ct_sized_volume(shape=(150, 140, 70), spacing=(0.9, 0.9, 2.0), seed=3)


def model_probability(shape, rng, blobs=4):
    """Several smooth blobs of different heights: components of different sizes after the threshold."""
    field = np.zeros(shape, np.float32)
    for _ in range(blobs):
        c = [rng.integers(8, s - 8) for s in shape]
        field[tuple(slice(x - 2, x + 3) for x in c)] = rng.uniform(0.6, 1.0)
    return np.clip(ndimage.gaussian_filter(field, 1.5) * 4, 0, 1).astype(np.float32)


def grid_and_probability(volume, rng, blobs=4):
    """The model grid of a CT volume (3 mm, 32^3 windows) and a blob map on it, padding included."""
    _, grid = to_model_grid(volume, "CT", (3.0, 3.0, 3.0), 32)
    padded = tuple(lo + n + hi for (lo, hi), n in zip(grid.pad, grid.resampled_shape))
    return grid, model_probability(padded, rng, blobs)


@pytest.mark.parametrize("threshold,min_mm3,top_k", [(0.5, 0.0, 0), (0.9, 200.0, 0), (0.3, 50.0, 1), (0.99, 0.0, 0)])
def test_box_mask_equals_the_full_resample_mask(ct, threshold, min_mm3, top_k):
    volume, _ = ct
    grid, prob = grid_and_probability(volume, np.random.default_rng(int(threshold * 100)))
    old = probability_to_mask(grid.to_input_grid(prob), volume.spacing, threshold, min_mm3, top_k)
    new, counts = mask_on_input_grid(grid, prob, threshold, volume.spacing, min_mm3, top_k)
    # every component over the floor is counted, kept or not
    every = probability_to_mask(grid.to_input_grid(prob), volume.spacing, threshold, min_mm3, 0)
    found = cc3d.connected_components(every, connectivity=26, return_N=True)[1]
    kept = cc3d.connected_components(new, connectivity=26, return_N=True)[1]
    assert counts == (found, 0, kept) and kept == (min(found, top_k) if top_k else found)
    assert new.shape == volume.array.shape and new.dtype == old.dtype
    if threshold < 0.99:
        assert old.any()  # a non-trivial comparison
    np.testing.assert_array_equal(new, old)


def test_an_intensity_floor_drops_light_components_the_same_on_both_paths(ct):
    """Components whose median in the scan is below the floor go, before the top-k; both paths agree."""
    volume, _ = ct
    grid, prob = grid_and_probability(volume, np.random.default_rng(11), blobs=8)
    full = grid.to_input_grid(prob)
    labels, n = cc3d.connected_components(full > 0.3, connectivity=26, return_N=True)
    sizes = np.bincount(labels.ravel())[1:]
    largest = int(np.argmax(sizes)) + 1
    # a scan where the largest component and one other are air, the rest soft tissue: the top-k must
    # then pick among the dense ones
    other = next(i for i in range(1, n + 1) if i != largest)
    rng = np.random.default_rng(12)
    image = (40.0 + rng.normal(0, 20, full.shape)).astype(np.float32)
    image[np.isin(labels, [largest, other])] = -900.0 + rng.normal(0, 20, (np.isin(labels, [largest, other])).sum())
    medians = np.array(ndimage.median(image, labels, np.arange(1, n + 1)))
    assert n > 3 and (medians < -700).sum() == 2
    for top_k in (0, 1):
        old = probability_to_mask(full, volume.spacing, 0.3, 0.0, top_k, image, -700.0)
        new, counts = mask_on_input_grid(grid, prob, 0.3, volume.spacing, 0.0, top_k, image, -700.0)
        np.testing.assert_array_equal(new, old)
        assert counts == (n - 2, 2, 1 if top_k else n - 2)
        kept = set(np.unique(labels[new.astype(bool)]))
        dense = [i for i in range(1, n + 1) if i not in (largest, other)]
        assert kept == ({max(dense, key=lambda i: sizes[i - 1])} if top_k else set(dense))


def test_scattered_map_with_many_boxes_gives_the_full_resample_mask(ct):
    """Speckle above the threshold all over the model grid: many clusters, boxes that touch and merge."""
    volume, _ = ct
    rng = np.random.default_rng(7)
    grid, prob = grid_and_probability(volume, rng, blobs=6)
    prob[rng.random(prob.shape) > 0.997] = 0.95  # isolated voxels, some next to each other
    for top_k in (0, 3):
        old = probability_to_mask(grid.to_input_grid(prob), volume.spacing, 0.5, 0.0, top_k)
        np.testing.assert_array_equal(mask_on_input_grid(grid, prob, 0.5, volume.spacing, 0.0, top_k)[0], old)
        assert old.any()


def test_touching_boxes_merge_and_apart_ones_stay():
    from diffugts.postprocess import _apart

    a, b = (slice(0, 4), slice(0, 4)), (slice(4, 6), slice(2, 3))  # b starts where a stops: touching
    c = (slice(10, 12), slice(10, 12))
    assert sorted(_apart([a, c, b]), key=lambda box: box[0].start) == [(slice(0, 6), slice(0, 4)), c]


def test_box_resample_has_the_full_grid_values():
    rng = np.random.default_rng(1)
    small = rng.random((17, 13, 11), dtype=np.float32)
    full = resample(small, (61, 50, 23))
    box = (slice(7, 40), slice(0, 50), slice(5, 6))
    np.testing.assert_array_equal(resample(small, (61, 50, 23), box=box), full[box])


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_intensity_scaling_matches_the_plain_formula(ct, modality):
    array = ct[0].array if modality == "CT" else np.abs(ct[0].array) * 0.7
    if modality == "CT":
        lo, hi = -1000.0, 1000.0
    else:
        lo, hi = 0.0, float(np.percentile(array, 99.5))
    plain = np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    np.testing.assert_array_equal(scale_intensity(array, modality), plain)


def test_segmentation_maps_are_computed_when_read(torch_executor):
    from diffugts.pipeline import segment_volume

    volume, _ = ct_sized_volume(shape=(60, 56, 40), spacing=(1.5, 1.5, 2.0), seed=4)
    seg = segment_volume(torch_executor, volume, "kidney tumor", "CT")
    assert callable(seg.__dict__["_anomaly"])  # not computed by the loop
    assert seg.anomaly.shape == volume.array.shape and not callable(seg.__dict__["_anomaly"])
    assert seg.probability.dtype == np.float32 and seg.healthy.shape == volume.array.shape
    # the mask is the one the full probability map gives
    preset = torch_executor.preset
    expected = probability_to_mask(seg.probability, volume.spacing, preset.mask_threshold,
                                   preset.min_component_mm3, preset.top_k_components)
    np.testing.assert_array_equal(seg.mask, expected)


def test_one_lesion_keeps_the_largest_component_and_several_keep_all(torch_executor):
    from diffugts.executors.base import preset_changes
    from diffugts.pipeline import LoopOptions, segment_volume

    volume, _ = ct_sized_volume(shape=(60, 56, 40), spacing=(1.5, 1.5, 2.0), seed=4)
    probability = segment_volume(torch_executor, volume, "kidney tumor", "CT").probability
    threshold = float(np.quantile(probability, 0.97))  # random weights: several blobs above it
    every = probability_to_mask(probability, volume.spacing, threshold, 0.0, 0)
    found = cc3d.connected_components(every, connectivity=26, return_N=True)[1]
    assert found > 1
    with preset_changes(torch_executor, top_k_components=1, min_component_mm3=0.0, mask_threshold=threshold):
        one = segment_volume(torch_executor, volume, "kidney tumor", "CT")
        several = segment_volume(torch_executor, volume, "multiple kidney tumor", "CT")
    np.testing.assert_array_equal(one.mask, probability_to_mask(one.probability, volume.spacing, threshold, 0.0, 1))
    assert one.mask.sum() < every.sum()
    assert any(f"kept the largest component of {found} found" in n for n in one.notices)
    np.testing.assert_array_equal(several.mask, probability_to_mask(several.probability, volume.spacing, threshold, 0.0, 0))
    assert not any("largest component" in n for n in several.notices)
    # ranked by mean probability, the loop keeps what the full-resample path keeps
    with preset_changes(torch_executor, top_k_components=1, top_k_rank="mean probability", min_component_mm3=0.0,
                        mask_threshold=threshold):
        probable = segment_volume(torch_executor, volume, "kidney tumor", "CT")
    np.testing.assert_array_equal(probable.mask, probability_to_mask(probable.probability, volume.spacing, threshold,
                                                                     0.0, 1, rank="mean probability"))
    assert probable.components.rank == "mean probability"
    assert any(f"kept the most probable component of {found} found" in n for n in probable.notices)
    # several lesions outside an organ: those near the most probable one, unless every one is asked for
    with preset_changes(torch_executor, top_k_components=1, top_k_rank="mean probability", min_component_mm3=0.0,
                        mask_threshold=threshold, several_near_best=0.999):
        near = segment_volume(torch_executor, volume, "kidney tumors", "CT")
        every_one = segment_volume(torch_executor, volume, "kidney tumor", "CT", LoopOptions(all_components=True))
        every_several = segment_volume(torch_executor, volume, "kidney tumors", "CT", LoopOptions(all_components=True))
    # the plural is another prompt, so another map: its own components
    every_plural = probability_to_mask(near.probability, volume.spacing, threshold, 0.0, 0)
    found_plural = cc3d.connected_components(every_plural, connectivity=26, return_N=True)[1]
    np.testing.assert_array_equal(near.mask, probability_to_mask(near.probability, volume.spacing, threshold, 0.0, 0,
                                                                 near_best=0.999))
    assert found_plural > 1 and near.mask.sum() < every_plural.sum() and near.components.near_best == 0.999
    assert any(n.startswith(f"kept 1 of {found_plural} components found") and
               n.endswith("--all-components keeps them all") for n in near.notices), near.notices
    for kept, all_of_them in ((every_one, every), (every_several, every_plural)):  # past the floors, nothing dropped
        np.testing.assert_array_equal(kept.mask, all_of_them)
        assert (kept.components.top_k, kept.components.near_best) == (0, 0.0)
        assert not any(n.startswith("kept") for n in kept.notices)


@pytest.mark.parametrize("target,several", [
    ("kidney tumor", False), ("brain tumour", False), ("lung nodule", False), ("liver mass", False),
    ("kidney tumours", True), ("lung nodules", True), ("liver metastasis", True), ("brain mets", True), ("solitary brain metastasis", False),
    ("intracranial hemorrhage", False), ("numerous pulmonary nodules", True), ("lung cancers", True),
    ("metastatic disease of the liver", True), ("multiple liver lesions", True), ("multifocal HCC", True),
])
def test_targets_that_name_several_lesions(target, several):
    from diffugts.component_rules import component_rule, names_several_lesions
    from diffugts.config import get_preset
    from diffugts.prompts import spelt_out

    assert names_several_lesions(spelt_out(target)) is several  # the loop reads abbreviations spelt out
    preset = get_preset("demo")
    for restricted in (True, False):  # one lesion: the preset's top-k there; several: all, near the best outside
        rule = component_rule(spelt_out(target), "MR", preset, restricted)
        one = preset.organ_top_k if restricted else preset.top_k_components
        assert rule.top_k == (0 if several else one)
        assert rule.near_best == (preset.several_near_best if several and not restricted else 0.0)


def test_component_notices_only_when_something_was_dropped():
    from diffugts.component_rules import ComponentRule
    from diffugts.postprocess import ComponentCounts

    one, two, floor = ComponentRule(top_k=1), ComponentRule(top_k=2), ComponentRule(min_median=-700.0)
    assert ComponentRule().notices(ComponentCounts(5, 3, 5)) == ()
    assert one.notices(ComponentCounts(1, 0, 1)) == () and one.notices(ComponentCounts(0, 0, 0)) == ()
    assert one.notices(ComponentCounts(3, 0, 1))[0].startswith("kept the largest component of 3 found")
    assert ComponentRule(1, None, "lung nodule").notices(ComponentCounts(3, 0, 1))[0].endswith(
        "ask for 'multiple lung nodule' or --all-components to keep them all")
    assert "the 2 largest components of 4" in two.notices(ComponentCounts(4, 0, 2))[0]
    assert ComponentRule(1, None, "kidney tumor", "mean probability").notices(ComponentCounts(3, 0, 1))[0].startswith(
        "kept the most probable component of 3 found")
    assert floor.notices(ComponentCounts(2, 0, 2)) == ()
    assert floor.notices(ComponentCounts(2, 6, 2))[0].startswith("dropped 6 component(s) of aerated lung or air "
                                                              "(median below -700 HU)")


@pytest.mark.parametrize("target,modality,restricted,rule", [
    ("lung nodule", "CT", True, (1, -700.0, "size")), ("lung nodule", "CT", False, (1, -700.0, "mean probability")),
    ("lung nodules", "CT", True, (0, -700.0, "size")), ("brain tumor", "MR", True, (1, None, "size")),
    ("lung cyst", "CT", True, (1, None, "size")), ("cavitary lung lesion", "CT", True, (1, None, "size")),
    ("ground-glass nodule", "CT", True, (1, None, "size")),
    ("kidney tumor", "CT", False, (1, -700.0, "mean probability")),
    ("kidney tumors", "CT", False, (0, -700.0, "mean probability")),
    ("kidney cyst", "CT", False, (1, -700.0, "mean probability")),  # a cyst outside the lungs is fluid
])
def test_the_demo_rule_for_a_target(target, modality, restricted, rule):
    from diffugts.component_rules import component_rule
    from diffugts.config import get_preset

    got = component_rule(target, modality, get_preset("demo"), restricted)
    assert (got.top_k, got.min_median, got.rank) == rule


@pytest.mark.parametrize("target,restricted,near_best", [
    ("liver metastasis", False, 0.8), ("kidney tumors", False, 0.8), ("multiple liver lesions", False, 0.8),
    ("kidney tumor", False, 0.0), ("lung nodules", True, 0.0), ("brain metastases", True, 0.0),
    ("lung nodules", False, 0.8),  # the lungs not found: nothing restricted
])
def test_several_lesions_outside_a_restricted_organ_keep_those_near_the_best(target, restricted, near_best):
    from diffugts.component_rules import component_rule
    from diffugts.config import get_preset

    preset = get_preset("demo").with_(several_near_best=0.8)
    assert component_rule(target, "CT", preset, restricted).near_best == near_best
    assert component_rule(target, "CT", preset.with_(several_near_best=0.0), restricted).near_best == 0.0


def test_near_the_best_keeps_the_components_within_a_share_of_the_best_score_on_both_paths(ct):
    from diffugts.component_rules import ComponentRule
    from diffugts.config import get_preset
    from diffugts.postprocess import ComponentCounts, kept_components

    sizes, scores = np.array([50, 9, 7, 90]), np.array([0.95, 0.9, 0.5, 0.7])
    assert list(kept_components(sizes, 0, 0, None, scores, 0.9)) == [0, 1]  # 0.9 >= 0.9 x 0.95
    assert list(kept_components(sizes, 8, 0, None, scores, 0.9)) == [0, 1]
    assert list(kept_components(sizes, 10, 0, None, scores, 0.9)) == [0]  # the floor first: 0.7 < 0.9 x 0.95
    assert list(kept_components(sizes, 0, 0, np.array([False, True, True, True]), scores, 0.75)) == [1, 3]
    assert list(kept_components(sizes, 0, 1, None, scores, 0.5, rank="size")) == [3]  # near the best, then the largest
    assert list(kept_components(sizes, 0, 1, None, scores, 0.5, rank="mean probability")) == [0]
    with pytest.raises(ValueError, match="near_best compares the components' scores: none were given"):
        kept_components(sizes, 0, 0, None, None, 0.9)
    volume, _ = ct
    grid, prob = grid_and_probability(volume, np.random.default_rng(5), blobs=8)
    full = grid.to_input_grid(prob)
    labels, n = cc3d.connected_components(full > 0.3, connectivity=26, return_N=True)
    means = np.asarray(ndimage.mean(full, labels, np.arange(1, n + 1)))
    share = float(np.sort(means)[-3] / means.max()) - 1e-6  # keeps exactly the three most probable
    old = probability_to_mask(full, volume.spacing, 0.3, near_best=share)
    new, counts = mask_on_input_grid(grid, prob, 0.3, volume.spacing, near_best=share)
    np.testing.assert_array_equal(new, old)
    assert set(np.unique(labels[new.astype(bool)])) == set(np.argsort(means)[-3:] + 1) and counts == (n, 0, 3)
    notice = ComponentRule(0, None, "liver metastasis", "mean probability", 0.9).notices(ComponentCounts(n, 0, 3))
    assert notice == (f"kept 3 of {n} components found: those whose mean probability is at least 90% of the most "
                      "probable one's; --all-components keeps them all",)
    assert ComponentRule(0, None, "liver metastasis", "size", 0.9).notices(ComponentCounts(3, 0, 3)) == ()
    with pytest.raises(ValueError, match="several_near_best is a share of the best component's mean probability, "
                                         "0 to 1, not 1.5"):
        get_preset("demo").with_(several_near_best=1.5)


def test_an_unknown_rank_is_refused_on_every_path(ct):
    from diffugts.component_rules import ComponentRule, component_rule
    from diffugts.config import get_preset

    from diffugts.config import Preset

    message = "component rank 'peak' is not one of size, mean probability"
    with pytest.raises(ValueError, match=message):  # a preset, as a deployed config is read at load
        get_preset("demo").with_(top_k_rank="peak")
    with pytest.raises(ValueError, match=message):
        Preset.from_dict({**get_preset("demo").to_dict(), "top_k_rank": "peak"})
    assert component_rule("kidney tumor", "CT", get_preset("demo"), False).rank == "mean probability"
    with pytest.raises(ValueError, match=message):
        ComponentRule(1, None, "kidney tumor", "peak")
    volume, _ = ct
    grid, prob = grid_and_probability(volume, np.random.default_rng(5))
    with pytest.raises(ValueError, match=message):
        mask_on_input_grid(grid, prob, 0.3, volume.spacing, 0.0, 1, rank="peak")
    with pytest.raises(ValueError, match=message):
        probability_to_mask(grid.to_input_grid(prob), volume.spacing, 0.3, 0.0, 1, rank="peak")


def test_equal_mean_probabilities_go_to_the_larger_component():
    from diffugts.postprocess import kept_components

    sizes, scores = np.array([5, 9, 7, 9]), np.array([1.0, 1.0, 0.5, 1.0])
    assert list(kept_components(sizes, 0, 2, None, scores)) in ([1, 3], [3, 1])  # the two of 9, then size
    assert list(kept_components(sizes, 0, 3, None, scores))[2] == 0  # score before size
    assert list(kept_components(sizes, 6, 1, None, scores)) in ([1], [3])  # the floor first


def test_the_most_probable_component_is_kept_the_same_on_both_paths(ct):
    """Ranked by mean probability, the top-1 is the component whose input-grid probability is
    highest on average, not the largest; both paths pick it."""
    volume, _ = ct
    grid, prob = grid_and_probability(volume, np.random.default_rng(5), blobs=8)
    full = grid.to_input_grid(prob)
    labels, n = cc3d.connected_components(full > 0.3, connectivity=26, return_N=True)
    sizes = np.bincount(labels.ravel())[1:]
    means = np.asarray(ndimage.mean(full, labels, np.arange(1, n + 1)))
    assert n > 3 and np.argmax(means) != np.argmax(sizes)  # a ranking that matters
    old = probability_to_mask(full, volume.spacing, 0.3, 0.0, 1, rank="mean probability")
    new, counts = mask_on_input_grid(grid, prob, 0.3, volume.spacing, 0.0, 1, rank="mean probability")
    np.testing.assert_array_equal(new, old)
    assert set(np.unique(labels[new.astype(bool)])) == {int(np.argmax(means)) + 1} and counts == (n, 0, 1)
    largest = probability_to_mask(full, volume.spacing, 0.3, 0.0, 1)
    assert set(np.unique(labels[largest.astype(bool)])) == {int(np.argmax(sizes)) + 1}


def test_the_loop_drops_light_components_on_ct_only_and_not_for_an_air_finding(torch_executor):
    from diffugts.executors.base import preset_changes
    from diffugts.io import Volume
    from diffugts.pipeline import segment_volume

    volume, _ = ct_sized_volume(shape=(60, 56, 40), spacing=(1.5, 1.5, 2.0), seed=4)
    probability = segment_volume(torch_executor, volume, "kidney tumor", "CT").probability
    threshold = float(np.quantile(probability, 0.97))
    every = probability_to_mask(probability, volume.spacing, threshold, 0.0, 0)
    labels, n = cc3d.connected_components(every, connectivity=26, return_N=True)
    medians = np.array(ndimage.median(volume.array, labels, np.arange(1, n + 1)))
    floor = float(np.max(medians))  # every component but the densest is lighter
    assert n > 1 and (medians < floor).sum() == n - 1
    with preset_changes(torch_executor, min_component_hu=floor, min_component_mm3=0.0, mask_threshold=threshold):
        ct = segment_volume(torch_executor, volume, "kidney tumor", "CT")
        air = segment_volume(torch_executor, volume, "emphysematous kidney lesion", "CT")
        mr = segment_volume(torch_executor, Volume(volume.array - volume.array.min(), volume.affine, "mr"),
                            "kidney tumor", "MR")
    np.testing.assert_array_equal(ct.mask, probability_to_mask(ct.probability, volume.spacing, threshold, 0.0, 0,
                                                                volume.array, floor))
    assert ct.components.min_median == floor and np.all(medians[np.unique(labels[ct.mask.astype(bool)]) - 1] >= floor)
    assert any(note.startswith(f"dropped {n - 1} component(s) of aerated lung or air") for note in ct.notices)
    assert air.components.min_median is None and mr.components.min_median is None
    np.testing.assert_array_equal(air.mask, probability_to_mask(air.probability, volume.spacing, threshold, 0.0, 0))
    assert not any("aerated" in note for note in air.notices + mr.notices)


def test_real_size_section_wiring(torch_executor):
    from diffugts.benchmarks.real_size import run_real_size

    volume, _ = ct_sized_volume(shape=(64, 60, 40), spacing=(1.2, 1.2, 2.5), seed=6)
    result = run_real_size(torch_executor, volume=volume)
    assert result["shape"] == [64, 60, 40]
    assert {"preprocess", "encode", "postprocess", "total"} <= set(result["seconds"])
    assert 0 < result["pre_post_fraction"] < 1 and result["peak_rss_mb"] > 0
