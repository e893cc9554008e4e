"""DICOM in and out: series picked from archive folders, geometry checks, the DICOM SEG (and the
anomaly Parametric Map) read back with highdicom, mapped voxel by voxel through its own plane
geometry onto the NIfTI mask's grid, and validated by dciodvfy."""

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from diffugts.cli import main
from diffugts.dicom_seg import AlgorithmIdentity, finding_code
from diffugts.dicom_series import write_series
from diffugts.io import InputError, read_volume
from diffugts.outputs import save_outputs

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
IDENTITY = AlgorithmIdentity("0.1.0", "tiny", "none (random init)")


def rotation(axis, degrees):
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def affine_of(rotation3, spacing, origin):
    affine = np.eye(4)
    affine[:3, :3] = rotation3 @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


GEOMETRIES = {
    # a scanner's axial series: LPS rows/columns, slices foot to head
    "axial": affine_of(np.diag([-1.0, -1.0, 1.0]), (1.5, 1.2, 3.0), (40.0, 30.0, -20.0)),
    # oblique: rotated about two axes
    "oblique": affine_of(rotation(0, 20) @ rotation(2, -35), (1.4, 1.6, 2.5), (-10.0, 55.0, 7.0)),
    # slices stored head to foot (against the slice normal), files named and numbered backwards
    "reverse": affine_of(np.diag([-1.0, -1.0, -1.0]), (1.5, 1.5, 3.0), (12.0, -8.0, 60.0)),
}


def asymmetric_mask(shape):
    """An L-shaped blob on some slices and a dot on another: any flip or slice swap changes it."""
    mask = np.zeros(shape, np.uint8)
    mask[3:9, 2:5, 2:5] = 1
    mask[3:5, 5:11, 3:5] = 1
    mask[12, 9, 6] = 1
    return mask


def seg_on_grid(seg, affine, shape):
    """Place each SEG (or Parametric Map) frame's pixels by the SEG's own plane position / orientation / spacing onto
    the voxel grid of `affine` (RAS); returns (values, covered)."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    row_spacing, col_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    rows, cols = np.mgrid[0:seg.Rows, 0:seg.Columns]
    to_voxel = np.linalg.inv(affine)
    values, covered = np.zeros(shape, pixels.dtype), np.zeros(shape, bool)
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        origin = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        lps = (origin[:, None, None] + orientation[:3, None, None] * col_spacing * cols
               + orientation[3:, None, None] * row_spacing * rows)
        ras = lps * np.array([-1.0, -1.0, 1.0])[:, None, None]
        ijk = np.tensordot(to_voxel[:3, :3], ras, axes=1) + to_voxel[:3, 3, None, None]
        index = np.rint(ijk).astype(int)
        np.testing.assert_allclose(ijk, index, atol=1e-3)  # frames lie exactly on the grid
        values[index[0], index[1], index[2]] = frame
        covered[index[0], index[1], index[2]] = True
    return values, covered


def dciodvfy_errors(path):
    exe = shutil.which("dciodvfy") or str(Path(__import__("sys").executable).parent / "dciodvfy")
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def assert_references(seg, source: Path):
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(source.glob("*.dcm"))]
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [sources[0].SeriesInstanceUID]
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced == {s.SOPInstanceUID for s in sources}  # every source frame
    per_frame = [item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                 for item in seg.PerFrameFunctionalGroupsSequence]
    assert sorted(per_frame) == sorted(s.SOPInstanceUID for s in sources)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_seg_frames_hold_the_mask_voxels(tmp_path, geometry):
    affine = GEOMETRIES[geometry]
    truth = asymmetric_mask((16, 14, 9))
    # the mask travels inside the image's intensities, so reading decides the grid, not this test
    write_series(truth * 1000.0, affine, tmp_path / "series", "MR", reverse_files=geometry == "reverse")
    volume = read_volume(tmp_path / "series")
    mask = (volume.array > 500).astype(np.uint8)
    anomaly = np.where(mask, 0.9, 0.1).astype(np.float32)
    written = save_outputs(tmp_path / "out", "case", volume, SimpleNamespace(mask=mask, anomaly=anomaly),
                           "liver cyst", "both", IDENTITY, anomaly_map_dicom=True)
    assert sorted(written) == ["anomaly", "anomaly_map", "mask", "seg"]
    assert not list((tmp_path / "out").glob(".partial-*"))

    seg = hd.seg.segread(written["seg"])
    description = seg.get_segment_description(1)
    assert description.segment_label == "liver cyst"
    assert description.segmented_property_type.value == "367643001"  # SNOMED CT cyst
    assert [c.value for c in description.anatomic_regions] == ["10200004"]  # liver
    algorithm = description.algorithm_identification
    assert algorithm[0].AlgorithmName == "diffugts" and algorithm[0].AlgorithmVersion == "0.1.0"
    assert "preset=tiny" in algorithm[0].AlgorithmParameters
    assert_references(seg, tmp_path / "series")

    nifti = nib.load(written["mask"])
    on_nifti, covered = seg_on_grid(seg, nifti.affine, nifti.shape)
    assert covered.all()
    np.testing.assert_array_equal(on_nifti, np.asarray(nifti.dataobj))
    # and onto the grid the series was written from: slice order and orientation survive
    on_truth, covered = seg_on_grid(seg, affine, truth.shape)
    assert covered.all()
    np.testing.assert_array_equal(on_truth, truth)

    assert dciodvfy_errors(written["seg"]) == []
    assert dciodvfy_errors(written["anomaly_map"]) == []
    pm = pydicom.dcmread(written["anomaly_map"])
    on_nifti, covered = seg_on_grid(pm, nifti.affine, nifti.shape)
    assert covered.all()
    np.testing.assert_array_equal(on_nifti, np.asarray(nib.load(written["anomaly"]).dataobj))


def test_finding_codes_map_categories_and_fall_back_to_lesion():
    assert finding_code("kidney tumor").value == "108369006"  # neoplasm
    assert finding_code("intracranial haemorrhage").value == "50960005"
    assert finding_code("lung nodule").value == "27925004"
    assert finding_code("liver metastases").value == "14799000"
    assert finding_code("something odd").value == "52988006"  # generic: lesion


@pytest.fixture(scope="module")
def mr_series(tmp_path_factory):
    """A brain-tumour MR phantom written as an MR DICOM series (the issue's check)."""
    from diffugts.phantom import CATEGORIES, make_case

    root = tmp_path_factory.mktemp("mr")
    image, label, modality = make_case(np.random.default_rng(3), CATEGORIES["brain tumor"], (48, 48, 32), 3.0)
    assert modality == "MR" and label.sum() > 0
    affine = affine_of(np.diag([-1.0, -1.0, 1.0]), (3.0, 3.0, 3.0), (70.0, 70.0, -45.0))
    write_series(image, affine, root / "mr_series", "MR", description="T1 AX brain")
    return root / "mr_series", label, affine


def test_segment_both_writes_a_valid_seg_of_the_nifti_mask(mr_series, tmp_path, capsys):
    series, _, _ = mr_series
    code = main(["segment", str(series), "--prompt", "brain tumor", "--out", str(tmp_path), "--format", "both",
                 "--preset", "demo"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "1 image series; using" in out + err
    nifti = nib.load(tmp_path / "mr_series_mask.nii.gz")
    mask = np.asarray(nifti.dataobj)
    assert mask.sum() > 0  # the demo weights find the seen category
    seg = hd.seg.segread(tmp_path / "mr_series_seg.dcm")
    assert_references(seg, series)
    on_nifti, covered = seg_on_grid(seg, nifti.affine, nifti.shape)
    assert covered.all()
    np.testing.assert_array_equal(on_nifti, mask)
    assert seg.get_segment_description(1).segment_label == "brain tumor"
    params = seg.get_segment_description(1).algorithm_identification[0].AlgorithmParameters
    assert "preset=demo" in params and "weights_sha256=" in params and "random init" not in params
    assert dciodvfy_errors(tmp_path / "mr_series_seg.dcm") == []


def assert_no_outputs(out):
    """Nothing of the volume is written; the batch's run.json records it as failed."""
    import json

    files = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert files in ([], ["run.json"]), files
    if files:
        assert {v["status"] for v in json.loads((out / "run.json").read_text())["volumes"]} == {"failed"}


def test_dicom_seg_from_nifti_is_one_line_and_writes_nothing(phantom_dir, tmp_path, capsys):
    code = main(["segment", str(phantom_dir / "imagesTs" / "case_000.nii.gz"), "--prompt", "kidney tumor",
                 "--out", str(tmp_path / "out"), "--format", "dicom-seg", "--preset", "tiny"])
    out, err = capsys.readouterr()
    assert code == 1
    lines = [line for line in (out + err).splitlines() if "error" in line]
    assert len(lines) == 1 and "needs a DICOM series folder" in lines[0]
    assert_no_outputs(tmp_path / "out")


# ---- archives: several series, other objects, broken geometry ------------------------------------

def small_series(folder, depth=6, **kw):
    volume = np.random.default_rng(0).normal(100, 10, (12, 10, depth)).astype(np.float32)
    return write_series(volume, GEOMETRIES["axial"], folder, "CT", **kw)


def write_seg_and_sr(folder, series_files):
    source = read_volume(series_files[0].parent)
    seg = save_outputs(folder / "derived", "x", source, SimpleNamespace(
        mask=np.zeros(source.array.shape, np.uint8), anomaly=np.zeros(source.array.shape, np.float32)),
        "lesion", "dicom-seg", IDENTITY)["seg"]
    shutil.move(seg, folder / "seg.dcm")
    shutil.rmtree(folder / "derived")
    sr = pydicom.dcmread(series_files[0])  # an SR that shares the images' series UID
    del sr.PixelData, sr.Rows, sr.Columns, sr.ImagePositionPatient, sr.ImageOrientationPatient
    sr.Modality, sr.SOPClassUID = "SR", pydicom.uid.BasicTextSRStorage
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.save_as(folder / "sr.dcm")


def test_folder_with_several_series_picks_the_largest_or_the_asked(tmp_path, capsys):
    archive = tmp_path / "archive"
    small = small_series(archive / "a", depth=5, series_uid="1.2.826.0.1.3680043.8.498.1")
    large = small_series(archive / "b", depth=8, series_uid="1.2.826.0.1.3680043.8.498.2")
    write_seg_and_sr(archive, large)
    volume = read_volume(archive)
    assert volume.array.shape == (12, 10, 8)
    assert volume.dicom.series_uid == "1.2.826.0.1.3680043.8.498.2"
    assert "2 image series" in volume.dicom.choice and "the largest" in volume.dicom.choice
    assert "skipped 1 SEG, 1 SR" in volume.dicom.choice
    assert read_volume(archive, "1.2.826.0.1.3680043.8.498.1").array.shape == (12, 10, 5)
    with pytest.raises(InputError, match="no image series with UID 9.9"):
        read_volume(archive, "9.9")
    assert len(small) == 5

    code = main(["segment", str(archive), "--prompt", "liver tumor", "--out", str(tmp_path / "out"),
                 "--format", "dicom-seg", "--series-uid", "1.2.826.0.1.3680043.8.498.1", "--preset", "tiny"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "using 1.2.826.0.1.3680043.8.498.1" in out + err and "as asked" in out + err
    seg = hd.seg.segread(tmp_path / "out" / "archive_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.826.0.1.3680043.8.498.1"
    assert int(seg.NumberOfFrames) == 5


def _shift(path, dz=0.0, dy=0.0):
    ds = pydicom.dcmread(path)
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y + dy, z + dz]
    ds.save_as(path)


def _damage(files, case):
    if case == "missing slice":
        files[3].unlink()
    elif case == "uneven spacing":
        _shift(files[3], dz=1.2)
        for f in files[4:]:
            _shift(f, dz=1.2)
    elif case == "mixed sizes":
        ds = pydicom.dcmread(files[2])
        ds.Rows, ds.Columns = 6, 12
        ds.PixelData = np.zeros((6, 12), np.int16).tobytes()
        ds.save_as(files[2])
    elif case == "gantry tilt":
        for k, f in enumerate(files):
            _shift(f, dy=0.8 * k)  # each slice moves along y: a sheared stack
    elif case == "only a SEG":
        source = files[0].parent
        write_seg_and_sr(source, files)
        for f in files:
            f.unlink()
        (source / "sr.dcm").unlink()


@pytest.mark.parametrize("case,message", [
    ("missing slice", "1 missing slice(s): a gap of 6.00 mm"),
    ("uneven spacing", "uneven slice spacing"),
    ("mixed sizes", "mixed image sizes"),
    ("gantry tilt", "gantry tilt: slices are sheared by 14.9 degrees"),
    ("only a SEG", "no DICOM image series in this folder (only 1 SEG)"),
])
def test_broken_series_get_one_line_errors_and_nothing_written(tmp_path, capsys, case, message):
    files = small_series(tmp_path / "series", depth=7)
    _damage(files, case)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_volume(tmp_path / "series")
    code = main(["segment", str(tmp_path / "series"), "--prompt", "lesion", "--out", str(tmp_path / "out"),
                 "--format", "both", "--preset", "tiny"])
    out, err = capsys.readouterr()
    assert code == 1
    errors = [line for line in (out + err).splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0]
    assert_no_outputs(tmp_path / "out")


def test_series_highdicom_cannot_derive_from_is_one_line_and_writes_nothing(tmp_path, capsys):
    files = small_series(tmp_path / "series", depth=4)
    for f in files:  # a frame of reference is Type 1 for a SEG's source
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    volume = read_volume(tmp_path / "series")
    with pytest.raises(InputError, match="cannot write a DICOM SEG from this series"):
        save_outputs(tmp_path / "out", "x", volume, SimpleNamespace(
            mask=np.zeros(volume.array.shape, np.uint8), anomaly=np.zeros(volume.array.shape, np.float32)),
            "lesion", "both", IDENTITY)
    assert_no_outputs(tmp_path / "out")
