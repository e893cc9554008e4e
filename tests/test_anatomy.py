"""Lesion synthesis, domain randomization and training on a user's own MSD dataset."""

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from diffugts import train
from diffugts.augment import Anatomy, randomize_anatomy, random_crop, scanner_effects
from diffugts.config import get_preset
from diffugts.io import Volume
from diffugts.lesions import (BODY_SEEN_KINDS, BODY_UNSEEN_KINDS, KINDS, LATER_SEEN_KINDS, SEEN_KINDS, UNSEEN_KINDS,
                              LesionKind, draw_lesion)
from diffugts.preprocess import labels_to_model_grid, to_model_grid


def _head(size=48):
    """A sphere of 'brain' (label 2, organ 1) inside a shell of 'skull' (label 1), air outside."""
    r = np.sqrt(((np.indices((size,) * 3) - (size - 1) / 2) ** 2).sum(0))
    labels = (r < 0.45 * size).astype(np.int16) + 6 * (r < 0.38 * size)  # values need not be 0..n
    image = np.where(labels == 7, 0.5, np.where(labels == 1, 0.15, 0.0)).astype(np.float32)
    return Anatomy(image, labels, (labels == 7).astype(np.uint8), {1: "brain"}, "MR")


def test_seen_and_unseen_kinds_are_disjoint_and_cover_both_polarities_and_sizes():
    seen_all = set(SEEN_KINDS) | set(LATER_SEEN_KINDS) | set(BODY_SEEN_KINDS)
    unseen_all = set(UNSEEN_KINDS) | set(BODY_UNSEEN_KINDS)
    assert not seen_all & unseen_all
    assert seen_all | unseen_all == set(KINDS)
    # two unseen body kinds lie in organs no seen kind uses (as on the phantoms)
    assert {KINDS[k].organ for k in BODY_UNSEEN_KINDS} - {KINDS[k].organ for k in seen_all} == {"pancreas", "spleen"}
    seen = [KINDS[k] for k in SEEN_KINDS]
    assert {-1, 1} <= {p for k in seen for p in k.polarity}
    lo, hi = min(k.diameter_mm[0] for k in KINDS.values()), max(k.diameter_mm[1] for k in KINDS.values())
    assert lo <= 8 and hi >= 60 and lo >= 5


@pytest.mark.parametrize("prompt", list(KINDS))
def test_a_lesion_lies_in_its_organ_with_its_polarity_and_size(prompt):
    kind, anatomy = KINDS[prompt], _head()
    organ = anatomy.organs == 1
    image, label, _ = draw_lesion(anatomy.image, organ, kind, 3.0, np.random.default_rng(3))
    assert label.any() and image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
    assert not (label.astype(bool) & ~ndimage.binary_dilation(organ, iterations=2)).any()
    # equivalent diameter within the kind's range, widened by the boundary's irregularity
    diameter = 2 * (3 * label.sum() / (4 * np.pi)) ** (1 / 3) * 3.0
    assert kind.diameter_mm[0] * 0.3 <= diameter <= kind.diameter_mm[1] * (1.3 + kind.irregularity) * 1.3
    if kind.rim == 0 and kind.necrotic_core == 0 and len(kind.polarity) == 1:
        inner = ndimage.binary_erosion(label, iterations=1) if label.sum() > 30 else label.astype(bool)
        change = float(image[inner].mean()) - 0.5
        assert np.sign(change) == kind.polarity[0] and abs(change) >= 0.5 * kind.contrast[0]


def test_lesions_are_reproducible_and_mass_effect_moves_the_other_maps():
    kind = LesionKind("test mass", "brain", (30, 30), (0.2, 0.2), polarity=(1,), mass_effect_mm=(6, 6))
    anatomy = _head()
    a = draw_lesion(anatomy.image, anatomy.organs == 1, kind, 3.0, np.random.default_rng(0), [anatomy.labels])
    b = draw_lesion(anatomy.image, anatomy.organs == 1, kind, 3.0, np.random.default_rng(0), [anatomy.labels])
    np.testing.assert_array_equal(a[0], b[0])
    moved = a[2][0]
    assert moved.dtype == anatomy.labels.dtype and set(np.unique(moved)) <= {0, 1, 7}
    assert (moved != anatomy.labels).sum() > 20  # the skull/brain boundary was pushed


def test_no_room_for_a_lesion_is_a_clear_error():
    with pytest.raises(ValueError, match="no room for a 'glioma'"):
        draw_lesion(np.zeros((16,) * 3, np.float32), np.zeros((16,) * 3, bool), KINDS["glioma"], 3.0,
                    np.random.default_rng(0))


def test_randomization_is_seeded_and_keeps_label_values():
    anatomy = _head()
    a = randomize_anatomy(anatomy, np.random.default_rng(5), 3.0, synth_probability=1.0)
    b = randomize_anatomy(anatomy, np.random.default_rng(5), 3.0, synth_probability=1.0)
    c = randomize_anatomy(anatomy, np.random.default_rng(6), 3.0, synth_probability=1.0)
    np.testing.assert_array_equal(a.image, b.image)
    assert np.abs(a.image - c.image).max() > 0.01
    assert set(np.unique(a.labels)) <= {0, 1, 7} and a.organs.max() == 1
    assert a.image.min() >= 0 and a.image.max() <= 1
    before = torch.get_rng_state()
    scanner_effects(a.image, np.random.default_rng(1), 3.0)
    assert torch.equal(before, torch.get_rng_state())  # training's own torch generator untouched


def test_synthesized_contrast_draws_one_intensity_per_label():
    import torchio as tio

    from diffugts.augment import _with_synthesized_contrast

    anatomy = _head()
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(anatomy.image[None])),
                          labels=tio.LabelMap(tensor=torch.from_numpy(anatomy.labels[None])))
    torch.manual_seed(0)
    out = _with_synthesized_contrast(subject)
    assert set(out.keys()) == {"image", "labels"}
    image = out["image"].data[0].numpy()
    means = [image[anatomy.labels == v].mean() for v in (0, 1, 7)]
    spreads = [image[anatomy.labels == v].std() for v in (0, 1, 7)]
    assert means[0] <= 0.06 + 0.03  # air stays dark
    assert max(spreads) < 0.06 and abs(means[1] - means[2]) > 0  # flat within a label, distinct between


def test_crops_have_the_patch_size_and_centre_on_the_organ():
    anatomy = _head(40)
    crop = random_crop(anatomy, 32, np.random.default_rng(0), organ_fraction=1.0)
    assert crop.image.shape == crop.labels.shape == crop.organs.shape == (32, 32, 32)
    assert crop.organs.any()
    small = random_crop(_head(20), 32, np.random.default_rng(0))
    assert small.image.shape == (32, 32, 32)


def test_label_maps_land_on_the_image_grid():
    labels = np.zeros((30, 20, 10), np.float32)
    labels[10:20, 5:15, 2:8] = 3
    affine = np.diag([2.0, -2.0, 3.0, 1.0])
    image, grid = to_model_grid(Volume(labels * 100, affine), "MR", (4.0, 4.0, 4.0), 16)
    mapped = labels_to_model_grid(Volume(labels, affine), (4.0, 4.0, 4.0), 16)
    assert mapped.shape == image.shape and mapped.dtype == np.int16
    assert set(np.unique(mapped)) == {0, 3}
    np.testing.assert_array_equal(mapped > 0, image > 0.5)


def _write_dataset(root, n=3, size=40):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        image = rng.normal(100, 5, (size,) * 3).astype(np.float32)
        label = np.zeros((size,) * 3, np.uint8)
        label[15:21, 12:18, 18:24] = 1
        image[label > 0] += 60
        affine = np.diag([4.0, 4.0, 4.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"c{i}.nii.gz"))
        entries.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz", "modality": "MR",
                        "prompt": "adrenal tumor"})
    (root / "dataset.json").write_text(json.dumps({"training": entries}))
    return root


def test_a_users_msd_dataset_trains_backbone_and_heads(tmp_path):
    from diffugts.training_data import dataset_cases

    data = _write_dataset(tmp_path / "data")
    cases = dataset_cases(data, get_preset("tiny"), need_labels=True, rng=np.random.default_rng(0))
    assert len(cases) == 3 and all(c.image.shape == (32, 32, 32) and c.label.sum() > 0 for c in cases)
    assert {c.prompt for c in cases} == {"adrenal tumor"}

    sources = train.Sources(dataset=data)
    report = train.train_backbone("tiny", tmp_path / "w", vae_steps=2, unet_steps=2, n_volumes=0, sources=sources)
    assert report["training_volumes"] == 3
    report = train.train_heads("tiny", tmp_path / "w", aova_steps=2, head_steps=2, n_cases=0, sources=sources)
    assert report["training_cases"] == 3 and (tmp_path / "w" / "demo.safetensors").exists()


def test_a_dataset_without_labels_cannot_train_heads(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"training": [{"image": "./x.nii.gz"}]}))
    from diffugts.io import InputError

    with pytest.raises(InputError, match="needs 'image' and 'label'"):
        train.head_cases(get_preset("tiny"), 0, 0, train.Sources(dataset=root))


def test_cuda_without_a_gpu_is_a_one_line_error_and_amp_runs_on_cpu(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train.train_backbone("tiny", tmp_path, vae_steps=1, unet_steps=1, n_volumes=2,
                                 sources=train.Sources(device="cuda"))
    report = train.train_backbone("tiny", tmp_path / "amp", vae_steps=2, unet_steps=2, n_volumes=2,
                                  sources=train.Sources(amp=True))
    assert np.isfinite(report["vae"]["final_loss"]) and np.isfinite(report["unet"]["final_loss"])


def test_training_accumulates_when_resumed_with_more_steps(tmp_path):
    first = train.train_backbone("tiny", tmp_path, vae_steps=2, unet_steps=2, n_volumes=2)
    more = train.train_backbone("tiny", tmp_path, vae_steps=4, unet_steps=3, n_volumes=2)
    assert first["vae"]["resumed_at"] == 0 and more["vae"]["resumed_at"] == 2 and more["unet"]["resumed_at"] == 2


@pytest.fixture(scope="module")
def mni_corpus(tmp_path_factory):
    from diffugts.corpus import build_corpus

    out = tmp_path_factory.mktemp("corpus")
    build_corpus(out, sources=["nilearn-mni152", "phantom"], n_phantoms=3)
    return out


def test_real_anatomy_lesion_sets_are_deterministic_and_hold_real_anatomy_only(mni_corpus, tmp_path):
    from diffugts.evaluate import load_manifest
    from diffugts.io import read_volume
    from diffugts.training_data import write_anatomy_lesions

    preset = get_preset("tiny")
    a = write_anatomy_lesions(mni_corpus, tmp_path / "a", preset, 3, 11, list(UNSEEN_KINDS))
    b = write_anatomy_lesions(mni_corpus, tmp_path / "b", preset, 3, 11, list(UNSEEN_KINDS))
    entries = load_manifest(a)
    assert [e["prompt"] for e in entries] == list(UNSEEN_KINDS) and {e["modality"] for e in entries} == {"MR"}
    for entry in entries:
        image_a, image_b = read_volume(a / entry["image"]).array, read_volume(b / entry["image"]).array
        label = read_volume(a / entry["label"]).array
        np.testing.assert_array_equal(image_a, image_b)
        assert label.sum() > 0 and image_a.shape == (32, 32, 32)
        assert image_a.max() > 100  # written back in scanner units (MR x1000), not [0, 1]
    with pytest.raises(ValueError, match="unknown lesion kinds"):
        write_anatomy_lesions(mni_corpus, tmp_path / "c", preset, 1, 0, ["not a kind"])


def test_the_lesions_command_writes_a_set_of_several_lesions_a_case(mni_corpus, tmp_path, capsys):
    """`diffugts lesions --lesions-per-case 3`: plural prompts, labels of 1 to 3 lesions, what
    `evaluate` scores by lesion (`found`); a count under 1 is a one-line error and writes nothing."""
    import cc3d

    from diffugts.cli import main
    from diffugts.evaluate import load_manifest
    from diffugts.io import read_volume

    out = tmp_path / "several"
    args = ["lesions", "--corpus", str(mni_corpus), "--out", str(out), "--n", "4", "--seed", "5",
            "--kinds", "brain cyst", "--preset", "tiny"]
    assert main(args + ["--lesions-per-case", "3"]) == 0
    entries = load_manifest(out)
    assert {e["prompt"] for e in entries} == {"brain cysts"}
    counts = [cc3d.connected_components((read_volume(out / e["label"]).array > 0).astype(np.uint8),
                                        connectivity=26, return_N=True)[1] for e in entries]
    assert all(1 <= n <= 3 for n in counts) and max(counts) > 1
    assert "1 to 3 lesions a case" in json.loads((out / "dataset.json").read_text())["description"]
    assert main(args[:4] + [str(tmp_path / "none")] + args[5:] + ["--lesions-per-case", "0"]) == 2
    assert "--lesions-per-case must be at least 1, not 0" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_training_cases_mix_randomized_anatomy_and_phantoms(mni_corpus):
    from diffugts.training_data import anatomy_cases, anatomy_on_model_grid

    preset = get_preset("tiny")
    anatomies = anatomy_on_model_grid(mni_corpus, preset)
    assert {a.source for a in anatomies} == {"nilearn-mni152", "phantom"}
    cases = anatomy_cases(anatomies, preset, 4, 0, list(SEEN_KINDS), synth_probability=1.0)
    assert all(c.image.shape == (32, 32, 32) and c.label.sum() > 0 for c in cases)
    assert [c.prompt for c in cases] == [*SEEN_KINDS, SEEN_KINDS[0]]
    healthy = anatomy_cases(anatomies, preset, 2, 0)
    assert all(c.label.sum() == 0 for c in healthy)


def test_an_unfinished_heads_run_still_gives_weights_from_its_checkpoints(tmp_path):
    from diffugts.models import build_models
    from diffugts.models.weights import load_weights

    train.train_backbone("tiny", tmp_path, vae_steps=1, unet_steps=1, n_volumes=2)
    train.train_heads("tiny", tmp_path, aova_steps=2, head_steps=3, n_cases=3)
    finished = build_models(get_preset("tiny"))
    load_weights(finished, tmp_path / "demo.safetensors")
    (tmp_path / "demo.safetensors").unlink()
    report = train.weights_from_checkpoints("tiny", tmp_path)
    assert report["checkpoint_steps"] == {"aova": 2, "head": 3}
    snapshot = build_models(get_preset("tiny"))
    load_weights(snapshot, tmp_path / "demo.safetensors")
    for a, b in zip(finished.head.state_dict().values(), snapshot.head.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="no checkpoint"):
        train.weights_from_checkpoints("tiny", tmp_path / "nothing")
    # a head-only fine-tune (no AOVA phase): the AOVA comes from the file it started from
    (tmp_path / "aova.pt").unlink()
    report = train.weights_from_checkpoints("tiny", tmp_path, backbone=tmp_path / "backbone.safetensors")
    assert report["checkpoint_steps"] == {"head": 3}
    started = build_models(get_preset("tiny"))
    load_weights(started, tmp_path / "backbone.safetensors")
    load_weights(snapshot, tmp_path / "demo.safetensors")
    for a, b in zip(started.aova.state_dict().values(), snapshot.aova.state_dict().values()):
        torch.testing.assert_close(a.half().float(), b)  # the snapshot is written in fp16


def test_training_cases_look_as_inference_preprocessing_makes_them(mni_corpus, tmp_path):
    """A case written to disk and preprocessed as `evaluate` does gives back the image the heads
    train on: MR is rescaled to its own 99.5th percentile on both sides of that line."""
    from diffugts.io import read_volume
    from diffugts.training_data import anatomy_cases, anatomy_on_model_grid, write_cases

    preset = get_preset("tiny")
    anatomies = [a for a in anatomy_on_model_grid(mni_corpus, preset) if a.modality == "MR"]
    cases = anatomy_cases(anatomies, preset, 2, 5, list(SEEN_KINDS), synth_probability=1.0)
    out = write_cases(cases, tmp_path / "set", preset.spacing[0], "test")
    for i, case in enumerate(cases):
        assert np.percentile(case.image, 99.5) == pytest.approx(1.0, abs=1e-3)
        seen, _ = to_model_grid(read_volume(out / "imagesTs" / f"case_{i:03d}.nii.gz"), "MR", preset.spacing, preset.patch)
        np.testing.assert_allclose(seen, case.image, atol=2e-3)


def test_a_retuned_heads_run_reuses_the_loop_outputs_and_trains_the_same(tmp_path, monkeypatch):
    train.train_backbone("tiny", tmp_path, vae_steps=1, unet_steps=1, n_volumes=2)
    first = train.train_heads("tiny", tmp_path / "a", aova_steps=2, head_steps=3, n_cases=3,
                              backbone=tmp_path / "backbone.safetensors")
    cache = tmp_path / "a" / "loop_outputs.pt"
    assert cache.exists()
    (tmp_path / "b").mkdir()
    for name in ("aova.pt", "loop_outputs.pt"):  # same AOVA, same cases: the loop need not run again
        (tmp_path / "b" / name).write_bytes((tmp_path / "a" / name).read_bytes())
    monkeypatch.setattr(train, "Recorder", None)  # running the loop now would fail
    again = train.train_heads("tiny", tmp_path / "b", aova_steps=2, head_steps=3, n_cases=3,
                              backbone=tmp_path / "backbone.safetensors")
    assert again["head"]["final_loss"] == pytest.approx(first["head"]["final_loss"], rel=1e-6)
    # one more case: the loop runs for the cases the cache does not hold (and fails here)
    with pytest.raises(TypeError):
        train.train_heads("tiny", tmp_path / "b", aova_steps=2, head_steps=3, n_cases=4,
                          backbone=tmp_path / "backbone.safetensors")


def test_a_longer_case_list_runs_the_loop_only_for_the_cases_past_the_cached_prefix(tmp_path, monkeypatch):
    from diffugts.models import build_models
    from diffugts.prompts import build_prompt_set

    preset = get_preset("tiny")
    torch.manual_seed(0)
    models = build_models(preset).eval()
    cases = train.make_cases(preset, 4, 3, list(train.SEEN))
    prompt_sets = [build_prompt_set(c.prompt, c.modality) for c in cases]
    reference = train.loop_outputs(models, cases, prompt_sets, 0, tmp_path / "all.pt")

    calls, segment_patch = [], train.segment_patch
    monkeypatch.setattr(train, "segment_patch", lambda *a, **k: (calls.append(1), segment_patch(*a, **k))[1])
    cache = tmp_path / "loop_outputs.pt"
    train.loop_outputs(models, cases[:2], prompt_sets[:2], 0, cache)
    calls.clear()
    longer = train.loop_outputs(models, cases, prompt_sets, 0, cache)
    assert len(calls) == 2  # cases 2 and 3 only
    for got, want in zip(longer, reference, strict=True):
        torch.testing.assert_close(got, want)
    calls.clear()
    assert len(train.loop_outputs(models, cases[:3], prompt_sets[:3], 0, cache)) == 3 and not calls
    # a case changed at position 1: only case 0 comes from the cache
    changed = replace(cases[1], image=np.clip(cases[1].image + 0.05, 0, 1))
    train.loop_outputs(models, [cases[0], changed], prompt_sets[:2], 0, cache)
    assert len(calls) == 1
    # another seed (every case's loop noise) or other networks: nothing is reused
    calls.clear()
    train.loop_outputs(models, cases[:2], prompt_sets[:2], 1, cache)
    assert len(calls) == 2
    calls.clear()
    with torch.no_grad():
        next(models.aova.parameters()).add_(0.01)
    train.loop_outputs(models, cases[:2], prompt_sets[:2], 1, cache)
    assert len(calls) == 2


def test_tissue_synthesis_gives_the_atlas_regions_of_one_tissue_one_intensity():
    import torchio as tio

    from diffugts.augment import _with_synthesized_contrast
    from diffugts.corpus import ATLAS_OFFSETS, CSF, GREY_MATTER, WHITE_MATTER, tissue_classes

    # CSF in the middle, grey matter split into four Harvard-Oxford regions, white matter into two JHU tracts
    labels = np.zeros((32, 32, 32), np.int16)
    labels[4:28, 4:28, 4:28] = CSF
    for i in range(4):
        labels[4 + 6 * i:10 + 6 * i, 4:16, 4:28] = ATLAS_OFFSETS["harvard_oxford"] + 1 + i
    for i in range(2):
        labels[4 + 12 * i:16 + 12 * i, 16:22, 4:28] = ATLAS_OFFSETS["jhu"] + 3 + i
    tissue = tissue_classes(labels)
    assert set(np.unique(tissue)) == {0, CSF, GREY_MATTER, WHITE_MATTER}
    assert (tissue[labels == CSF] == CSF).all() and labels.max() > 400  # own classes kept, input untouched

    def synthesized(kind):
        subject = tio.Subject(image=tio.ScalarImage(tensor=torch.zeros((1,) + labels.shape)),
                              labels=tio.LabelMap(tensor=torch.from_numpy(labels[None])))
        torch.manual_seed(3)
        image = _with_synthesized_contrast(subject, kind)["image"].data[0].numpy()
        return [image[labels == ATLAS_OFFSETS["harvard_oxford"] + 1 + i].mean() for i in range(4)]

    assert np.ptp(synthesized("tissue")) < 0.03  # one grey matter, up to the per-voxel spread
    assert np.ptp(synthesized("parcels")) > 0.1  # a patchwork of regions


def test_unknown_synth_labels_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown synth labels 'atlas'"):
        randomize_anatomy(_head(), np.random.default_rng(0), 3.0, 1.0, "atlas")
    with pytest.raises(ValueError, match="unknown head synth labels 'atlas'"):
        train.train_heads("tiny", work=tmp_path / "work", head_synth="atlas")
    assert not (tmp_path / "work").exists()


def test_a_bright_mr_brain_keeps_its_contrast_through_the_scanner_effects():
    """MR has no intensity ceiling before its 99.5th-percentile rescale: a bias field or a bright
    lesion over 1 must not flatten the brain, or a lesion in it, to one value (clipped at 1, 8-34%
    of this brain read 1.0 in three of these eight cases)."""
    from diffugts.training_data import anatomy_cases

    head = _head(40)
    ramp = np.broadcast_to(np.linspace(0.55, 0.97, 40, dtype=np.float32)[:, None, None], (40,) * 3)
    bright = Anatomy(np.where(head.organs == 1, ramp, head.image).astype(np.float32), head.labels, head.organs,
                     head.organ_names, "MR")
    cases = anatomy_cases([bright], get_preset("tiny"), 8, 4, ["brain metastasis"], synth_probability=0.0)
    for case in cases:
        lesion = case.label > 0
        brain = (case.image > 0.3) & ~lesion  # the skull reads 0.15 or less, air 0
        assert lesion.any() and case.image.max() <= 1.0
        assert (case.image[brain] >= 0.999).mean() < 0.05  # the brain is not saturated
        assert case.image[lesion].mean() > np.median(case.image[brain])  # the bright lesion stays bright


def test_balanced_modalities_draw_ct_as_often_as_mr_and_the_default_keeps_the_corpus_mix():
    """One CT head against six MR brains: the corpus mix gives the head ~1 CT lesion case in 7;
    "balanced" draws the modality first. The default draws the same cases when run again (the
    balanced branch is the only new use of the random stream: evaluation sets use the default)."""
    from diffugts.training_data import anatomy_cases

    mr = [_head(32) for _ in range(6)]
    ct = replace(_head(32), modality="CT")
    preset, kinds = get_preset("tiny"), ["brain cyst"]
    drawn = {m: [c.modality for c in anatomy_cases(mr + [ct], preset, 60, 3, kinds, randomize=False, modalities=m)]
             for m in ("corpus", "balanced")}
    assert 2 <= drawn["corpus"].count("CT") <= 18  # ~60 / 7
    assert 20 <= drawn["balanced"].count("CT") <= 40  # ~60 / 2
    again = anatomy_cases(mr + [ct], preset, 60, 3, kinds, randomize=False)
    assert [c.modality for c in again] == drawn["corpus"]
    with pytest.raises(ValueError, match="unknown modality draw 'ct-only'"):
        anatomy_cases(mr, preset, 1, 0, kinds, modalities="ct-only")


def test_a_crop_for_a_lesion_holds_the_organ_the_lesion_needs():
    """A body holds several organs: the crop centres on the kind's own organ, not on any organ."""
    organs = np.zeros((96, 40, 40), np.uint8)
    organs[4:20, 10:30, 10:30] = 1  # a large organ at one end
    organs[80:84, 18:22, 18:22] = 2  # a small one at the other
    anatomy = Anatomy(np.zeros(organs.shape, np.float32), organs.astype(np.int16), organs, {1: "liver", 2: "spleen"},
                      "CT")
    for seed in range(20):
        crop = random_crop(anatomy, 32, np.random.default_rng(seed), organ_fraction=1.0, organ=2)
        assert (crop.organs == 2).sum() >= 8, seed


def test_training_refuses_unseen_kinds():
    sources = train.Sources(corpus=None, kinds=("kidney tumor", "spleen lesion"))
    with pytest.raises(ValueError, match="spleen lesion is an unseen kind"):
        train.head_cases(get_preset("tiny"), 0, 0, sources)
    with pytest.raises(ValueError, match="spleen tumour unknown"):
        train.head_cases(get_preset("tiny"), 0, 0, train.Sources(kinds=("spleen tumour",)))
    # a seen kind added later is trainable (past the kind check, no source gives no cases), never a default
    with pytest.raises(ValueError, match="no training cases"):
        train.head_cases(get_preset("tiny"), 0, 0, train.Sources(kinds=("glioma", "meningioma")))
    assert not set(LATER_SEEN_KINDS) & set(SEEN_KINDS)


def test_the_homogeneous_bright_seen_kind_shares_no_settings_with_an_unseen_kind():
    """The meningioma was added for a look (bright, homogeneous) the seen kinds lacked; the unseen
    kinds must keep settings it does not have: hemorrhage a subtler contrast, the others a rim or halo."""
    meningioma = KINDS["meningioma"]
    for prompt in UNSEEN_KINDS:
        kind = KINDS[prompt]
        disjoint_contrast = kind.contrast[1] < meningioma.contrast[0] or kind.contrast[0] > meningioma.contrast[1]
        assert disjoint_contrast or kind.rim > 0 or kind.oedema > 0 or kind.polarity != meningioma.polarity, prompt
    assert meningioma.rim == meningioma.oedema == meningioma.necrotic_core == 0


@pytest.mark.parametrize("prompt, plural", [("liver tumor", "liver tumors"), ("liver metastasis", "liver metastases"),
                                            ("intracranial hemorrhage", "intracranial hemorrhages"),
                                            ("brain abscess", "brain abscesses"), ("lung nodules", "lung nodules")])
def test_a_set_of_several_lesions_is_prompted_in_the_plural(prompt, plural):
    from diffugts.component_rules import names_several_lesions
    from diffugts.lesions import plural_prompt

    assert plural_prompt(prompt) == plural
    assert names_several_lesions(plural)  # the loop reads it as several: every kept rule sees a plural


def test_several_lesions_a_case_are_apart_inside_the_organ_and_one_draw_keeps_the_old_stream():
    """`lesions_per_case` N: 1 to N separate lesions (26-connected components of the label, at
    least SEPARATION_MM apart), all inside the organ, prompted in the plural; N = 1 draws the very
    cases it drew before (every evaluation set on record was drawn so)."""
    import cc3d

    from diffugts.lesions import SEPARATION_MM
    from diffugts.training_data import anatomy_cases

    preset, head = get_preset("tiny"), _head(32)  # the tiny preset's patch: the crop is the whole head
    several = anatomy_cases([head], preset, 12, 7, ["brain cyst"], randomize=False, lesions_per_case=3)
    counts = []
    for case in several:
        label = case.label > 0
        lesions, n = cc3d.connected_components(label.astype(np.uint8), connectivity=26, return_N=True)
        counts.append(n)
        assert case.prompt == "brain cysts" and 1 <= n <= 3
        assert (label & ~ndimage.binary_dilation(head.organs > 0, iterations=3)).sum() == 0
        if n > 1:  # the gap between two lesions, in mm on the model grid
            gap = ndimage.distance_transform_edt(lesions != 1)[lesions == 2].min() * preset.spacing[0]
            assert gap > SEPARATION_MM - preset.spacing[0]
    assert set(counts) >= {1, 2, 3}

    one = anatomy_cases([head], preset, 4, 7, ["brain cyst"], randomize=False)
    again = anatomy_cases([head], preset, 4, 7, ["brain cyst"], randomize=False, lesions_per_case=1)
    assert all(np.array_equal(a.label, b.label) and np.array_equal(a.image, b.image) for a, b in zip(one, again))
    assert [c.prompt for c in one] == ["brain cyst"] * 4
    with pytest.raises(ValueError, match="lesions per case must be at least 1, not 0"):
        anatomy_cases([head], preset, 1, 0, ["brain cyst"], lesions_per_case=0)
