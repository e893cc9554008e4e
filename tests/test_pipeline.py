"""The one loop: pieces with known answers, RePaint blending, determinism, torch-free import."""

import subprocess
import sys

import numpy as np
import pytest

from diffugts.io import read_volume
from diffugts.pipeline import (LoopOptions, crop_box, inpaint_latent, inpainting_mask,
                               refine_with_attention, segment_volume)
from diffugts.prompts import build_prompt_set, organ_of, spelt_out
from diffugts.schedulers import make_sampler

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; "


def test_loop_and_client_side_modules_import_without_torch():
    code = BLOCK_TORCH + (
        "import diffugts.pipeline, diffugts.schedulers, diffugts.io, diffugts.windows, diffugts.cli, "
        "diffugts.evaluate, diffugts.phantom, diffugts.executors, diffugts.batch, diffugts.batch_inputs, "
        "diffugts.endpoints; "
        "import importlib.util; assert importlib.util.find_spec('torch') is None or 'torch' not in "
        "[m for m in sys.modules if sys.modules[m] is not None]; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_prompt_sets():
    prompts = build_prompt_set("  Kidney   tumor ", "ct")
    assert organ_of("kidney tumor") == "kidney"
    assert prompts.abnormal == (False,) * 3 + (True,) * 3
    assert "a CT scan of healthy kidney" in prompts.texts
    assert "kidney tumor" in prompts.texts
    with pytest.raises(ValueError, match="empty"):
        build_prompt_set("   ")
    with pytest.raises(ValueError, match="modality"):
        build_prompt_set("liver tumor", "PET")


def test_clinical_abbreviations_are_read_spelt_out_and_nothing_else_moves():
    assert build_prompt_set("RCC", "CT") == build_prompt_set("renal cell carcinoma", "CT")
    assert build_prompt_set("left ccRCC", "CT").texts[4] == "left clear cell renal cell carcinoma"
    assert build_prompt_set("Gbm", "MR") == build_prompt_set("glioblastoma", "MR")
    # whole words only, and every trained prompt as it was
    assert build_prompt_set("rich gbmx lesion", "MR").texts[4] == "rich gbmx lesion"
    for target in ("kidney tumor", "liver tumor", "lung nodule", "brain tumor", "glioma", "brain cyst"):
        assert spelt_out(target) == target


def test_attention_refinement_known_answers(rng):
    anomaly = rng.random((16, 16, 16)).astype(np.float32)
    assert refine_with_attention(anomaly, np.eye(64), steps=0, weight=0.5) is anomaly
    # uniform attention spreads the mass evenly: the refined part is flat at the coarse peak
    uniform = np.full((64, 64), 1 / 64)
    refined = refine_with_attention(anomaly, uniform, steps=2, weight=1.0)
    coarse_peak = anomaly.reshape(4, 4, 4, 4, 4, 4).mean((1, 3, 5)).max()
    np.testing.assert_allclose(refined, coarse_peak, rtol=1e-5)
    with pytest.raises(ValueError, match="does not tile"):
        refine_with_attention(anomaly, np.eye(27), steps=1, weight=0.5)


def test_inpainting_mask_and_crop_box():
    anomaly = np.zeros((32, 32, 32), np.float32)
    anomaly[9:14, 20:23, 4:6] = 0.9
    mask = inpainting_mask(anomaly, 4, 0.5, dilation=1)
    assert mask.shape == (8, 8, 8)
    assert mask[2:4, 5, 1].all() and not mask[7, 0, 7]
    box = crop_box(mask, margin=1, multiple=4)
    for sl, n in zip(box, mask.shape):
        assert (sl.stop - sl.start) % 4 == 0 and 0 <= sl.start < sl.stop <= n
    inside = np.zeros_like(mask)
    inside[box] = True
    assert inside[mask].all() and inside.sum() < mask.size


def test_a_map_that_flags_most_of_the_window_inpaints_nothing():
    anomaly = np.zeros((32, 32, 32), np.float32)
    anomaly[:16, :16, :16] = 0.9  # 64 of the 512 latent voxels: 12.5%
    flagged = inpainting_mask(anomaly, 4, 0.5, dilation=0)
    assert flagged.sum() == 64
    np.testing.assert_array_equal(inpainting_mask(anomaly, 4, 0.5, dilation=0, max_fraction=0.125), flagged)
    assert not inpainting_mask(anomaly, 4, 0.5, dilation=1, max_fraction=0.12).any()
    # the share is taken before dilation: a mask that dilation grows past the limit is kept, grown
    grown = inpainting_mask(anomaly, 4, 0.5, dilation=1, max_fraction=0.125)
    assert grown.sum() == 64 + 3 * 16 and grown[flagged].all()  # one face-connected layer on 3 open faces


def test_repaint_keeps_the_known_region_exactly(torch_executor, rng):
    preset = torch_executor.preset
    latent = rng.standard_normal((1, 4, 8, 8, 8)).astype(np.float32)
    mask = np.zeros((1, 1, 8, 8, 8), np.float32)
    mask[..., 2:6, 2:6, 2:6] = 1
    out = inpaint_latent(torch_executor, make_sampler(preset), latent, mask, 0.8, np.random.default_rng(1))
    np.testing.assert_array_equal(out[..., mask[0, 0] == 0], latent[..., mask[0, 0] == 0])
    assert not np.allclose(out[..., mask[0, 0] == 1], latent[..., mask[0, 0] == 1])


def test_segment_volume_is_deterministic_and_on_the_input_grid(torch_executor, phantom_dir):
    volume = read_volume(phantom_dir / "imagesTs" / "case_000.nii.gz")
    first = segment_volume(torch_executor, volume, "kidney tumor", "CT", LoopOptions(seed=3))
    again = segment_volume(torch_executor, volume, "kidney tumor", "CT", LoopOptions(seed=3))
    assert first.mask.shape == volume.array.shape and first.mask.dtype == np.uint8
    assert set(np.unique(first.mask)) <= {0, 1}
    np.testing.assert_array_equal(first.mask, again.mask)
    np.testing.assert_array_equal(first.probability, again.probability)
    assert {"encode", "attention", "inpaint", "score", "postprocess"} <= set(first.timings)


class ShapeSpy:
    """Delegates to a real executor and records the latent shapes the UNet and the decoder see,
    and the map the head scores with."""

    def __init__(self, executor, preset):
        self.inner, self.preset, self.unet_shapes, self.decode_shapes = executor, preset, [], []
        self.head_maps = []

    def encode(self, image, prompts):
        return self.inner.encode(image, prompts)

    def unet(self, latent, timestep, attention=True):
        self.unet_shapes.append(latent.shape[2:])
        return self.inner.unet(latent, timestep, attention)

    def decode(self, latent):
        self.decode_shapes.append(latent.shape)
        return self.inner.decode(latent)

    def score(self, image, healthy, anomaly, encoded, prompts):
        self.head_maps.append(anomaly)
        return self.inner.score(image, healthy, anomaly, encoded, prompts)


def test_cropping_runs_the_loop_on_the_bounding_box(torch_executor, phantom_dir):
    from diffugts.io import Volume
    from diffugts.preprocess import scale_intensity

    volume = read_volume(phantom_dir / "imagesTs" / "case_001.nii.gz")
    volume = Volume(volume.array[:32, :32, :32], volume.affine)  # one window at the tiny preset's 4 mm
    encoded = torch_executor.encode(scale_intensity(volume.array, "CT")[None, None],
                                    build_prompt_set("liver cyst", "CT"))
    threshold = float(np.quantile(encoded.anomaly, 0.998))  # a few latent voxels
    preset = torch_executor.preset.with_(anomaly_threshold=threshold, refine_weight=0.0,
                                         mask_dilation=0, crop_margin=0)
    shapes, decoded = {}, {}
    for crop in (True, False):
        spy = ShapeSpy(torch_executor, preset)
        seg = segment_volume(spy, volume, "liver cyst", "CT", LoopOptions(crop=crop))
        shapes[crop] = spy.unet_shapes[1:]  # the first call is the attention probe on the full latent
        decoded[crop] = spy.decode_shapes
        assert seg.mask.shape == volume.array.shape
    assert all(s == (8, 8, 8) for s in shapes[False]) and shapes[False]
    assert len(shapes[True]) == len(shapes[False])
    assert all(np.prod(s) < 8**3 and all(n % 4 == 0 for n in s) for s in shapes[True])
    # one batch-2 decode (the box before and after inpainting), of the box the loop ran on
    assert decoded[False] == [(2, 4, 8, 8, 8)]
    assert len(decoded[True]) == 1 and decoded[True][0][:2] == (2, 4) and decoded[True][0][2:] == shapes[True][0]


def test_segment_volume_skips_inpainting_where_the_map_flags_too_much(torch_executor, phantom_dir):
    from diffugts.io import Volume

    volume = read_volume(phantom_dir / "imagesTs" / "case_001.nii.gz")
    volume = Volume(volume.array[:32, :32, :32], volume.affine)  # one window at the tiny preset's 4 mm
    # theta below every map value: every latent voxel is flagged
    flag_all = torch_executor.preset.with_(anomaly_threshold=-1.0)
    calls, segs, head_maps = {}, {}, {}
    for limit in (1.0, 0.5):
        spy = ShapeSpy(torch_executor, flag_all.with_(inpaint_max_fraction=limit))
        segs[limit] = segment_volume(spy, volume, "liver cyst", "CT", LoopOptions())
        calls[limit] = (len(spy.unet_shapes), len(spy.decode_shapes))
        (head_maps[limit],) = spy.head_maps
    assert calls[1.0][0] > 1 and calls[1.0][1] == 1  # probe + the inpainting steps, one decode
    assert calls[0.5] == (1, 0)  # the attention probe only: nothing inpainted, nothing decoded
    # nor does the head see the flooded map: it reads the scan alone (the map is still reported)
    assert head_maps[1.0].any() and not head_maps[0.5].any()
    np.testing.assert_array_equal(segs[0.5].anomaly, segs[1.0].anomaly)
    # without inpainting the head scores the scan against itself: x_h is the scan, as the map-only
    # ablation reports it
    scan = segment_volume(torch_executor, volume, "liver cyst", "CT", LoopOptions(ablation="aova")).healthy
    np.testing.assert_array_equal(segs[0.5].healthy, scan)
    assert not np.array_equal(segs[1.0].healthy, scan)
    assert not np.array_equal(segs[0.5].probability, segs[1.0].probability)
    # the reader is told (one window, every latent voxel flagged); a run that inpainted is not
    assert segs[1.0].notices == ()
    assert segs[0.5].notices == ("caution: the anomaly map for 'liver cyst' flagged more than 50% of 1 of 1 windows (up to "
                                 "100%), so nothing was inpainted there and the head read the scan alone: a prompt "
                                 "unlike the trained ones can raise the map over the whole scan; read this mask "
                                 "with care",)


def test_loop_notices_count_the_gated_windows_only():
    from diffugts.pipeline import loop_notices

    assert loop_notices("brain tumor", [0.0, 0.05, 0.15], 0.15) == ()  # at the limit is not over it
    assert loop_notices("brain tumor", [], 0.15) == ()
    (notice,) = loop_notices("brain abscess", [0.02, 0.31, 0.4, 0.1], 0.15)
    assert notice.startswith("caution: the anomaly map for 'brain abscess' flagged more than 15% of 2 of 4 windows (up to 40%)")


def test_an_empty_mask_says_why_and_a_mask_does_not(torch_executor, phantom_dir):
    import re

    from diffugts.executors.base import preset_changes
    from diffugts.notices import is_caution

    volume = read_volume(phantom_dir / "imagesTs" / "case_001.nii.gz")
    segs = {}
    for name, changes in {"under": dict(mask_threshold=2.0),  # a sigmoid never reaches 2
                          "dropped": dict(mask_threshold=-1.0, min_component_mm3=1e12),
                          "everything": dict(mask_threshold=-1.0, min_component_mm3=0.0)}.items():
        with preset_changes(torch_executor, **changes):
            segs[name] = segment_volume(torch_executor, volume, "liver tumor", "MR", LoopOptions())
    assert not segs["under"].mask.any() and not segs["dropped"].mask.any() and segs["everything"].mask.all()
    empty = [n for n in segs["under"].notices if "is empty" in n]
    assert len(empty) == 1 and is_caution(empty[0])
    peak = float(re.search(r"nothing reached the threshold 2 \(highest ([0-9.]+)\)", empty[0]).group(1))
    assert 0.0 < peak <= 1.0 and empty[0].endswith("an empty mask is not proof that no lesion is there")
    assert [n for n in segs["dropped"].notices if "is empty" in n] == [
        "caution: the mask for 'liver tumor' is empty: what reached the threshold -1 was dropped (under 1e+12 "
        "mm^3, air on CT, or mostly outside the organ); an empty mask is not proof that no lesion is there"]
    assert not any("is empty" in n for n in segs["everything"].notices)


def test_pseudo_healthy_is_the_scan_plus_the_inpainting_change(torch_executor):
    from diffugts.pipeline import pixel_region, pseudo_healthy

    preset = torch_executor.preset
    rng = np.random.default_rng(0)
    image = rng.random((1, 1, 32, 32, 32), dtype=np.float32)
    latent = rng.standard_normal((1, 4, 4, 4, 4)).astype(np.float32)
    box = (slice(2, 6), slice(0, 4), slice(4, 8))
    # an inpainting that changed nothing gives the scan back exactly, reconstruction error and all
    unchanged = pseudo_healthy(torch_executor, image, latent, latent.copy(), box, preset)
    np.testing.assert_allclose(unchanged, image[pixel_region(box, 4)][0], atol=1e-6)
    # a change is the decoder's difference, added to the scan
    healed = latent + 0.5
    got = pseudo_healthy(torch_executor, image, latent, healed, box, preset)
    d = torch_executor.decode(np.concatenate([latent, healed]) / preset.scale_factor)
    want = np.clip(image[pixel_region(box, 4)][0] + d[1] - d[0], 0, 1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(got - image[pixel_region(box, 4)][0]).max() > 1e-3


def test_intensity_outlier_baseline_finds_a_blob():
    from diffugts.pipeline import intensity_outlier

    rng = np.random.default_rng(0)
    patch = 0.5 + 0.01 * rng.standard_normal((32, 32, 32)).astype(np.float32)
    patch[14:18, 14:18, 14:18] += 0.3
    prob = intensity_outlier(patch)
    assert prob[15, 15, 15] > 0.9
    assert (prob > 0.5).sum() < 200
    assert prob[2, 2, 2] < 0.5


@pytest.mark.parametrize("ablation", ["aova", "aova+attention", "baseline"])
def test_ablations_skip_the_later_stages(torch_executor, phantom_dir, ablation):
    volume = read_volume(phantom_dir / "imagesTs" / "case_000.nii.gz")
    seg = segment_volume(torch_executor, volume, "kidney tumor", "CT", LoopOptions(ablation=ablation))
    assert seg.mask.shape == volume.array.shape
    assert "score" not in seg.timings and "inpaint" not in seg.timings
    if ablation == "aova":
        np.testing.assert_allclose(seg.probability, seg.anomaly)
    with pytest.raises(ValueError, match="unknown ablation"):
        LoopOptions(ablation="none")


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_score_without_inpainting_skips_the_encoder_and_matches_the_ensemble(torch_executor, tiny_repository,
                                                                              backend):
    from diffugts.executors.onnx_executor import OnnxExecutor

    executor = torch_executor if backend == "torch" else OnnxExecutor.from_repository(tiny_repository)
    prompts = build_prompt_set("liver cyst", "CT")
    image = np.random.default_rng(0).random((1, 1, 32, 32, 32), dtype=np.float32)
    encoded = executor.encode(image, prompts)
    refined = np.clip(encoded.anomaly * 1.5, 0, 1).astype(np.float32)
    shortcut = executor.score(image, None, refined, encoded, prompts)  # x_h is x: residual head only
    full = executor.score(image, image.copy(), refined, encoded, prompts)  # encoder on x_h, then the head
    np.testing.assert_allclose(shortcut, full, rtol=1e-4, atol=1e-4)
