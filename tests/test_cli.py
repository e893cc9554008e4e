"""The command line end to end on the tiny preset, and its handling of bad input."""

import json

import nibabel as nib
import numpy as np
import pytest

from diffugts.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_phantom_dataset_layout(tmp_path, capsys):
    code, out, _ = run(capsys, "phantom", "--out", tmp_path, "--n", 3, "--seed", 5,
                       "--categories", "liver tumor,brain tumor", "--shape", 24, 24, 20)
    assert code == 0
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    assert [c["prompt"] for c in manifest["test"]] == ["liver tumor", "brain tumor", "liver tumor"]
    assert [c["modality"] for c in manifest["test"]] == ["CT", "MR", "CT"]
    for case in manifest["test"]:
        image = nib.load(tmp_path / case["image"])
        label = nib.load(tmp_path / case["label"])
        assert image.shape == label.shape == (24, 24, 20)
        np.testing.assert_array_equal(image.affine, label.affine)
        assert label.get_fdata().sum() > 0
    code, _, err = run(capsys, "phantom", "--out", tmp_path / "x", "--categories", "toe tumor")
    assert code == 2 and "unknown categories" in err


def test_segment_writes_masks_on_the_input_grid(phantom_dir, tmp_path, capsys):
    image = phantom_dir / "imagesTs" / "case_000.nii.gz"
    code, _, _ = run(capsys, "segment", image, "--prompt", "kidney tumor", "--out", tmp_path, "--preset", "tiny")
    assert code == 0
    mask = nib.load(tmp_path / "case_000_mask.nii.gz")
    source = nib.load(image)
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine)
    assert set(np.unique(mask.get_fdata())) <= {0.0, 1.0}
    assert (tmp_path / "case_000_anomaly.nii.gz").exists()
    timings = json.loads((tmp_path / "case_000_timings.json").read_text())
    assert timings["seconds"]["total"] > 0
    assert (tmp_path / "case_000_overlay.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs_fail_alone_with_one_line(phantom_dir, tmp_path, capsys):
    good = phantom_dir / "imagesTs" / "case_001.nii.gz"
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:2000])
    nan = tmp_path / "nan.nii.gz"
    data = nib.load(good).get_fdata().astype(np.float32)
    data[1, 2, 3] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), nan)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(data[..., 0], np.eye(4)), flat)
    out = tmp_path / "out"
    code, _, err = run(capsys, "segment", truncated, good, nan, flat, "--prompt", "liver cyst",
                       "--out", out, "--preset", "tiny")
    assert code == 1
    assert f"{truncated}: cannot read" in err.replace("\n", "")
    assert "NaN or Inf" in err and "expected a 3D volume" in err
    assert "Traceback" not in err
    written = sorted(p.name for p in out.iterdir())
    assert written == ["case_001_anomaly.nii.gz", "case_001_mask.nii.gz", "case_001_overlay.png",
                       "case_001_timings.json", "run.json"]
    statuses = {v["key"]: v["status"] for v in json.loads((out / "run.json").read_text())["volumes"]}
    assert statuses == {"truncated": "failed", "case_001": "done", "nan": "failed", "flat": "failed"}


def test_a_4d_image_segments_one_channel(phantom_dir, tmp_path, capsys):
    """The Decathlon's multi-sequence MR is one 4D NIfTI: the first channel by default, --channel
    another, an index it lacks a one-line error."""
    image = phantom_dir / "imagesTs" / "case_000.nii.gz"
    source = nib.load(image)
    scan = source.get_fdata().astype(np.float32)
    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([scan, scan[::-1]], axis=-1), source.affine), four)
    code, _, _ = run(capsys, "segment", image, "--prompt", "kidney tumor", "--out", tmp_path / "3d", "--preset", "tiny")
    assert code == 0
    masks = {}
    for name, extra, channel in (("first", [], 0), ("second", ["--channel", "1"], 1)):
        code, out, err = run(capsys, "segment", four, "--prompt", "kidney tumor", "--out", tmp_path / name,
                             "--preset", "tiny", *extra)
        assert code == 0, err
        assert f"four.nii.gz: channel {channel} of 2 (--channel picks another)" in (out + err).replace("\n", "")
        masks[name] = nib.load(tmp_path / name / "four_mask.nii.gz").get_fdata()
        assert masks[name].shape == scan.shape
    np.testing.assert_array_equal(masks["first"], nib.load(tmp_path / "3d" / "case_000_mask.nii.gz").get_fdata())
    assert not np.array_equal(masks["first"], masks["second"])
    # an MSD entry's own channel is read as --channel is
    (tmp_path / "dataset.json").write_text(json.dumps({"test": [{"image": "four.nii.gz", "channel": 1,
                                                                 "prompt": "kidney tumor"}]}))
    code, _, err = run(capsys, "segment", tmp_path / "dataset.json", "--out", tmp_path / "entry", "--preset", "tiny")
    assert code == 0, err
    np.testing.assert_array_equal(nib.load(tmp_path / "entry" / "four_mask.nii.gz").get_fdata(), masks["second"])
    # --resume reruns a volume whose entry now names another channel, and skips it otherwise
    statuses = {}
    for channel in (1, 0):
        (tmp_path / "dataset.json").write_text(json.dumps({"test": [{"image": "four.nii.gz", "channel": channel,
                                                                     "prompt": "kidney tumor"}]}))
        assert run(capsys, "segment", tmp_path / "dataset.json", "--out", tmp_path / "entry", "--preset", "tiny",
                   "--resume")[0] == 0
        statuses[channel] = json.loads((tmp_path / "entry" / "run.json").read_text())["volumes"][0]["status"]
    assert statuses == {1: "skipped", 0: "done"}
    np.testing.assert_array_equal(nib.load(tmp_path / "entry" / "four_mask.nii.gz").get_fdata(), masks["first"])
    code, _, err = run(capsys, "segment", four, "--prompt", "kidney tumor", "--out", tmp_path / "bad",
                       "--preset", "tiny", "--channel", "2")
    assert code == 1 and "channel 2 asked for, but the image has 2 channels (0-1)" in err.replace("\n", "")


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "  "], "prompt is empty"),
    (["--prompt", "liver tumor", "--weights", "nowhere.safetensors"], "nowhere.safetensors: weights file not found"),
])
def test_bad_prompt_or_weights(phantom_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code, _, err = run(capsys, "segment", phantom_dir / "imagesTs" / "case_000.nii.gz", "--out", out,
                       "--preset", "tiny", *argv)
    assert code != 0
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_paraphrases_refuses_a_missing_weights_file_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "fit.safetensors"
    code, _, err = run(capsys, "paraphrases", tmp_path / "nowhere.safetensors", "--out", out, "--preset", "tiny")
    assert code == 2 and "nowhere.safetensors: weights file not found" in err and "Traceback" not in err
    assert not out.exists()


def test_evaluate_reports_cases_and_means(phantom_dir, tmp_path, capsys):
    result_path = tmp_path / "eval.json"
    code, out, _ = run(capsys, "evaluate", phantom_dir, "--out", result_path, "--preset", "tiny", "--limit", 2)
    assert code == 0
    result = json.loads(result_path.read_text())
    assert len(result["cases"]) == 2
    for case in result["cases"]:
        assert {"case", "prompt", "dice", "nsd", "found", "false_positives", "auroc", "fpr95", "seconds"} <= set(case)
        assert 0 <= case["dice"] <= 1 and 0 <= case["auroc"] <= 1
        assert case["false_positives"] >= 0 and float(case["false_positives"]).is_integer()
    assert set(result["mean"]) >= {"dice", "nsd", "found", "false_positives", "auroc", "fpr95"}
    lesions = [ml for c in result["cases"] for ml, _ in c["lesions"]]
    assert sum(row["lesions"] for row in result["found_by_size"].values()) == len(lesions) > 0
    assert result["mean"]["dice"] == pytest.approx(np.mean([c["dice"] for c in result["cases"]]))
    assert "mean" in out


def test_evaluate_on_a_foreign_msd_dataset(tmp_path, capsys):
    """A dataset not written by `diffugts phantom`: LPS-oriented NRRD images, other names."""
    import SimpleITK as sitk

    (tmp_path / "imgs").mkdir()
    (tmp_path / "segs").mkdir()
    array = np.full((36, 36, 30), -800.0, np.float32)
    array[8:28, 8:28, 6:24] = 40.0
    label = np.zeros(array.shape, np.uint8)
    label[15:20, 15:20, 12:16] = 1
    array[label > 0] = -20.0
    for arr, path in ((array, tmp_path / "imgs" / "p1.nrrd"), (label, tmp_path / "segs" / "p1.nrrd")):
        img = sitk.GetImageFromArray(np.transpose(arr, (2, 1, 0)))
        img.SetSpacing((3.5, 3.5, 4.5))
        sitk.WriteImage(img, str(path))
    manifest = {"test": [{"image": "./imgs/p1.nrrd", "label": "./segs/p1.nrrd", "modality": "CT",
                          "prompt": "liver tumour"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    code, _, _ = run(capsys, "evaluate", tmp_path, "--out", tmp_path / "r.json", "--preset", "tiny")
    assert code == 0
    case = json.loads((tmp_path / "r.json").read_text())["cases"][0]
    assert case["case"] == "p1.nrrd" and 0 <= case["dice"] <= 1


def test_evaluate_all_ablations_writes_a_table(phantom_dir, tmp_path, capsys):
    out = tmp_path / "ablations.json"
    code, stdout, _ = run(capsys, "evaluate", phantom_dir, "--out", out, "--preset", "tiny", "--limit", 1,
                          "--ablation", "all")
    assert code == 0
    results = json.loads(out.read_text())["ablations"]
    assert list(results) == ["full", "aova+attention", "aova", "baseline"]
    table = out.with_suffix(".md").read_text()
    assert table.count("\n") == 6 and "| baseline |" in table and "kidney tumor Dice / NSD / AUROC" in table


def test_calibrate_sweeps_theta_threshold_and_component_size_and_keeps_the_best(phantom_dir, tmp_path, capsys):
    out = tmp_path / "calibration.json"
    code, printed, _ = run(capsys, "calibrate", phantom_dir, "--out", out, "--preset", "tiny",
                           "--thetas", "0.3,0.6", "--thresholds", "0.2,0.5,0.8", "--min-components", "0,1e9")
    assert code == 0
    result = json.loads(out.read_text())
    grid = {(float(a), float(b), float(m)): d for a, row in result["dice"].items()
            for b, by_size in row.items() for m, d in by_size.items()}
    assert len(grid) == 12 and all(0.0 <= d <= 1.0 for d in grid.values())
    # a component of 1e9 mm^3 keeps nothing: the size reaches the postprocessing
    assert all(d == 0.0 for (_, _, m), d in grid.items() if m == 1e9)
    best = result["best"]
    key = (best["anomaly_threshold"], best["mask_threshold"], best["min_component_mm3"])
    assert grid[key] == max(grid.values()) == best["dice"]
    assert result["cases"] == 4 and "best: anomaly_threshold=" in printed and "min_component_mm3=" in printed
    # each knob's best is checked against its grid's ends
    ends = {"thetas": (0.3, 0.6), "thresholds": (0.2, 0.8), "min components": (0.0, 1e9)}
    expected = [name for name, value in zip(ends, key) if value in ends[name]]
    assert result["on_grid_edge"] == expected
    assert ("widen it" in printed) == bool(expected)


def test_calibrate_needs_lesions(tmp_path, capsys):
    from diffugts.phantom import write_dataset

    healthy = write_dataset(tmp_path / "healthy", 1, seed=1, healthy_fraction=1.0, shape=(32, 32, 32), spacing=4.0)
    code, _, err = run(capsys, "calibrate", healthy, "--out", tmp_path / "c.json", "--preset", "tiny")
    assert code != 0 and "no case with a lesion" in err and not (tmp_path / "c.json").exists()
    code, _, err = run(capsys, "calibrate", tmp_path / "missing", "--out", tmp_path / "c.json", "--preset", "tiny")
    assert code != 0 and "dataset.json" in err
