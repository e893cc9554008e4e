"""Decathlon datasets as published: multi-class label maps (Liver, Pancreas, Brain; KiTS), where the
truth is the prompt's lesion classes in `evaluate`, `calibrate` and `train heads --dataset`; and
multi-channel (4D) images, of which an entry's `channel` is read."""

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from diffugts.label_classes import lesion_mask, lesion_values

# the `labels` of the Medical Segmentation Decathlon's own dataset.json files, and KiTS23's classes
LIVER = {"0": "background", "1": "liver", "2": "cancer"}
PANCREAS = {"0": "background", "1": "pancreas", "2": "cancer"}
HEPATIC_VESSEL = {"0": "background", "1": "Vessel", "2": "Tumour"}
LUNG = {"0": "background", "1": "cancer"}
COLON = {"0": "background", "1": "colon cancer primaries"}
BRAIN = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
SPLEEN = {"0": "background", "1": "spleen"}
KITS = {"0": "background", "1": "kidney", "2": "tumor", "3": "cyst"}


@pytest.mark.parametrize("classes, target, expected", [
    (LIVER, "liver tumor", (2,)),
    (PANCREAS, "pancreatic ductal adenocarcinoma", (2,)),
    (PANCREAS, "PDAC", (2,)),  # spelt out as the loop reads it
    (HEPATIC_VESSEL, "liver tumour", (2,)),
    (LUNG, "lung nodule", (1,)),
    (COLON, "colon cancer", (1,)),
    (BRAIN, "brain tumor", (2, 3)),  # the tumour core: the halo is not the tumour, as our generator labels it
    (BRAIN, "glioma", (2, 3)),  # no finding word in common: every finding class
    (BRAIN, "peritumoral oedema", (1,)),
    (KITS, "kidney tumor", (2,)),
    (KITS, "renal cyst", (3,)),
    (KITS, "renal mass", (2, 3)),
    ({"0": "background", "1": "lesion"}, "brain metastasis", (1,)),  # our own datasets
    (SPLEEN, "spleen lesion", None),  # no class names a finding: every non-zero voxel
    (None, "kidney tumor", None),
])
def test_the_prompts_lesion_classes(classes, target, expected):
    assert lesion_values(classes, target) == expected


def test_an_entry_names_its_own_label_values_or_gets_a_clear_error():
    assert lesion_values(LIVER, "liver tumor", [1, 2, 2]) == (1, 2)
    for bad in ([], [0], ["2"], [True], 2, [1.5]):
        with pytest.raises(ValueError, match="'label_values' must be a list of positive integers"):
            lesion_values(LIVER, "liver tumor", bad)
    with pytest.raises(ValueError, match="not an integer"):
        lesion_values({"one": "tumor"}, "liver tumor")
    with pytest.raises(ValueError, match="must map label values to names"):
        lesion_values(["tumor"], "liver tumor")


def test_lesion_mask_reads_float_labels_and_all_classes_when_unnamed():
    label = np.array([0.0, 1.0, 2.0, 2.0000001, 3.0], np.float32)
    np.testing.assert_array_equal(lesion_mask(label, (2,)), [False, False, True, True, False])
    np.testing.assert_array_equal(lesion_mask(label, None), [False, True, True, True, True])


def _liver_dataset(root, labels=LIVER, entry_fields=None):
    """One case: a liver (class 1) holding a tumour (class 2); MSD layout."""
    (root / "imagesTs").mkdir(parents=True)
    (root / "labelsTs").mkdir()
    label = np.zeros((40, 40, 40), np.uint8)
    label[8:32, 8:32, 8:32] = 1
    label[16:24, 16:24, 16:24] = 2
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    image = (label * 60.0 + 40.0).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTs" / "c0.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTs" / "c0.nii.gz"))
    entry = {"image": "./imagesTs/c0.nii.gz", "label": "./labelsTs/c0.nii.gz", "modality": "CT",
             "prompt": "liver tumor", **(entry_fields or {})}
    manifest = {"test": [entry], "training": [entry]}
    if labels is not None:
        manifest["labels"] = labels
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root, label


def test_evaluate_scores_the_tumour_not_the_liver(tmp_path):
    from diffugts.evaluate import evaluate_dataset

    def tumour_mask(executor, volume, target, modality, options):  # a perfect tumour segmentation
        mask = (volume.array > 150).astype(np.uint8)
        return SimpleNamespace(mask=mask, anomaly=mask.astype(np.float32), notices=())

    executor = SimpleNamespace(preset=SimpleNamespace(name="stub"))
    named, _ = _liver_dataset(tmp_path / "named")
    (case,) = evaluate_dataset(executor, named, segment=tumour_mask)["cases"]
    assert case["dice"] == 1.0 and case["auroc"] == 1.0 and case["found"] == 1.0 and case["label_values"] == [2]
    # without `labels` every non-zero voxel is the truth: the liver too (8^3 of 24^3 voxels)
    unnamed, _ = _liver_dataset(tmp_path / "unnamed", labels=None)
    (case,) = evaluate_dataset(executor, unnamed, segment=tumour_mask)["cases"]
    assert case["dice"] == pytest.approx(2 * 8**3 / (8**3 + 24**3)) and case["label_values"] == "all"
    # an entry's own values win over the names
    both, _ = _liver_dataset(tmp_path / "both", entry_fields={"label_values": [1, 2]})
    (case,) = evaluate_dataset(executor, both, segment=tumour_mask)["cases"]
    assert case["label_values"] == [1, 2] and case["dice"] < 0.1


def test_a_malformed_label_values_names_the_entry(tmp_path):
    from diffugts.evaluate import load_manifest
    from diffugts.io import InputError

    root, _ = _liver_dataset(tmp_path / "bad", entry_fields={"label_values": "2"})
    with pytest.raises(InputError, match=r"test entry 0: 'label_values' must be a list of positive integers"):
        load_manifest(root)


def test_heads_train_on_the_tumour_classes_of_a_users_dataset(tmp_path):
    from diffugts.config import get_preset
    from diffugts.training_data import dataset_cases

    root, label = _liver_dataset(tmp_path / "data")
    (case,) = dataset_cases(root, get_preset("tiny"), need_labels=True, rng=np.random.default_rng(0))
    # the tiny preset's 4 mm grid is the label's own: the tumour's 8^3 voxels, not the liver's 24^3
    assert case.label.sum() == (label == 2).sum() == 8**3
    # a Decathlon task as published has no prompts: `train heads --prompt` gives them
    manifest = json.loads((root / "dataset.json").read_text())
    del manifest["training"][0]["prompt"]
    (root / "dataset.json").write_text(json.dumps(manifest))
    (case,) = dataset_cases(root, get_preset("tiny"), need_labels=True, rng=np.random.default_rng(0),
                            prompt="hepatocellular carcinoma")
    assert case.prompt == "hepatocellular carcinoma" and case.label.sum() == 8**3


def test_evaluate_reads_an_entrys_channel_of_a_4d_image(tmp_path):
    from diffugts.evaluate import evaluate_dataset, load_manifest
    from diffugts.io import InputError

    root, label = _liver_dataset(tmp_path / "four", entry_fields={"channel": 1})
    path = root / "imagesTs" / "c0.nii.gz"
    scan = nib.load(path)
    # channel 0 is blank; channel 1 shows the tumour
    nib.save(nib.Nifti1Image(np.stack([np.zeros(scan.shape, np.float32), scan.get_fdata(dtype=np.float32)], -1),
                             scan.affine), str(path))

    def bright(executor, volume, target, modality, options):
        mask = (volume.array > 150).astype(np.uint8)
        return SimpleNamespace(mask=mask, anomaly=volume.array, notices=())

    executor = SimpleNamespace(preset=SimpleNamespace(name="stub"))
    (case,) = evaluate_dataset(executor, root, segment=bright)["cases"]
    assert case["channel"] == "1 of 2" and case["dice"] == 1.0
    manifest = json.loads((root / "dataset.json").read_text())
    for bad, error in ((None, None), (5, "channel 5 asked for, but the image has 2 channels (0-1)"),
                       ("1", "'channel' must be a channel index"), (-1, "'channel' must be a channel index")):
        manifest["test"][0]["channel"] = bad
        (root / "dataset.json").write_text(json.dumps(manifest))
        if bad is None:  # the first channel: blank, so nothing is found
            (case,) = evaluate_dataset(executor, root, segment=bright)["cases"]
            assert case["channel"] == "0 of 2" and case["dice"] == 0.0 and case["found"] == 0.0
        elif isinstance(bad, int) and bad >= 0:  # the case fails alone, with the reason
            result = evaluate_dataset(executor, root, segment=bright)
            assert result["cases"] == [] and error in result["errors"][0]
        else:
            with pytest.raises(InputError, match=error):
                load_manifest(root)


def test_evaluate_runs_on_a_decathlon_task_as_published(tmp_path, capsys):
    """Task03 Liver's own dataset.json: no prompts, string test entries without labels, classes
    liver and cancer. `--split training --prompt` evaluates it as it is."""
    from diffugts.cli import main

    root, _ = _liver_dataset(tmp_path / "Task03_Liver")
    manifest = json.loads((root / "dataset.json").read_text())
    entry = {k: manifest["training"][0][k] for k in ("image", "label")}
    (root / "dataset.json").write_text(json.dumps({
        "name": "Liver", "modality": {"0": "CT"}, "labels": LIVER, "numTraining": 1, "numTest": 1,
        "training": [entry], "test": ["./imagesTs/c0.nii.gz"]}))
    out = tmp_path / "liver.json"
    assert main(["evaluate", str(root), "--split", "training", "--out", str(out), "--preset", "tiny"]) != 0
    assert "training entry 0 has no 'prompt' (--prompt gives one to every entry without)" in capsys.readouterr().err
    assert main(["evaluate", str(root), "--split", "training", "--prompt", "liver tumor", "--out", str(out),
                 "--preset", "tiny"]) == 0
    (case,) = json.loads(out.read_text())["cases"]
    assert case["prompt"] == "liver tumor" and case["label_values"] == [2]
    from diffugts.evaluate import load_manifest

    (entry,) = load_manifest(root, "training", "liver tumor")
    assert entry["modality"] == "CT"  # the top-level channel names, where the entry has none


def test_calibrate_reads_a_decathlon_task_as_published(tmp_path, torch_executor):
    from diffugts.calibrate import calibrate

    root, _ = _liver_dataset(tmp_path / "Task03_Liver")
    manifest = json.loads((root / "dataset.json").read_text())
    entry = {k: manifest["training"][0][k] for k in ("image", "label")}
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": LIVER, "training": [entry]}))
    result = calibrate(torch_executor, [root], [0.5], [0.5], [0.0], split="training", prompt="liver tumor")
    assert result["cases"] == 1 and 0.0 <= result["best"]["dice"] <= 1.0
