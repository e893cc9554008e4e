"""Readers, geometry and the model-grid round trip."""

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from diffugts.io import InputError, read_volume, stem_of
from diffugts.preprocess import guess_modality, scale_intensity, to_model_grid


def smooth_volume(shape=(30, 26, 20)):
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return (400 * np.exp(-sum(g**2 for g in grid) * 2) - 600).astype(np.float32)


def test_nifti_keeps_array_and_affine(tmp_path):
    affine = np.array([[0, 0, -2.5, 10], [1.5, 0, 0, -4], [0, -2, 0, 7], [0, 0, 0, 1.0]])
    array = smooth_volume()
    nib.save(nib.Nifti1Image(array, affine), tmp_path / "x.nii.gz")
    vol = read_volume(tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, [1.5, 2.0, 2.5], atol=1e-6)


def itk_image(array, spacing=(1.5, 2.0, 2.5), origin=(3.0, -4.0, 5.0)):
    img = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def test_nrrd_is_read_in_ras(tmp_path):
    array = smooth_volume()
    sitk.WriteImage(itk_image(array), str(tmp_path / "x.nrrd"))
    vol = read_volume(tmp_path / "x.nrrd")
    np.testing.assert_array_equal(vol.array, array)
    # ITK's LPS origin (3, -4, 5) is RAS (-3, 4, 5); identity direction flips x and y
    np.testing.assert_allclose(vol.affine[:3, 3], [-3.0, 4.0, 5.0])
    np.testing.assert_allclose(np.diag(vol.affine)[:3], [-1.5, -2.0, 2.5])


def test_dicom_series_folder(tmp_path):
    array = smooth_volume((24, 20, 6)).astype(np.int16)
    img = itk_image(array, spacing=(1.0, 1.0, 3.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = tmp_path / "series"
    series.mkdir()
    for z in range(img.GetDepth()):
        sl = img[:, :, z]
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1")
        sl.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, z)))))
        sl.SetMetaData("0020|0013", str(z))
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        writer.SetFileName(str(series / f"{z:03d}.dcm"))
        writer.Execute(sl)
    vol = read_volume(series)
    assert vol.array.shape == array.shape
    np.testing.assert_allclose(vol.array, array)
    np.testing.assert_allclose(vol.spacing, [1.0, 1.0, 3.0], atol=1e-4)
    assert stem_of(series) == "series"


@pytest.mark.parametrize("case,message", [
    ("truncated", "cannot read"), ("nan", "NaN or Inf"), ("two_d", "expected a 3D volume"),
    ("five_d", "expected a 3D volume"), ("text", "cannot read"), ("unknown", "unknown format"),
    ("missing", "no such file"),
])
def test_bad_inputs_get_one_line_errors(tmp_path, case, message):
    path = tmp_path / "bad.nii.gz"
    array = smooth_volume()
    if case == "truncated":
        nib.save(nib.Nifti1Image(array, np.eye(4)), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "nan":
        array[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    elif case == "two_d":
        nib.save(nib.Nifti1Image(array[..., 0], np.eye(4)), path)
    elif case == "five_d":  # a 4D image is a stack of channels (test_a_4d_image_is_read_one_channel_at_a_time)
        nib.save(nib.Nifti1Image(np.stack([np.stack([array, array], -1)] * 2, -1), np.eye(4)), path)
    elif case == "text":
        path.write_bytes(gzip.compress(b"not an image"))
    elif case == "unknown":
        path = tmp_path / "scan.png"
        path.write_bytes(b"\x89PNG")
    else:
        path = tmp_path / "nowhere.nii.gz"
    with pytest.raises(InputError) as err:
        read_volume(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_intensity_as_maisi():
    ct = np.array([-2000, -1000, 0, 1000, 3000], np.float32)
    np.testing.assert_allclose(scale_intensity(ct, "CT"), [0, 0, 0.5, 1, 1])
    mr = np.linspace(0, 1000, 1001, dtype=np.float32)
    scaled = scale_intensity(mr, "MR")
    assert scaled.min() == 0 and scaled.max() == 1
    assert scaled[500] == pytest.approx(500 / np.percentile(mr, 99.5))
    assert guess_modality(ct) == "CT" and guess_modality(mr) == "MR"


def test_model_grid_round_trip_in_any_orientation():
    from diffugts.io import Volume

    array = smooth_volume((30, 26, 20))
    affine = np.array([[0, 0, -2.5, 0], [1.5, 0, 0, 0], [0, -2.0, 0, 0], [0, 0, 0, 1.0]])
    vol = Volume(array, affine)
    model, grid = to_model_grid(vol, "CT", (2.0, 2.0, 2.0), patch=32)
    assert all(n >= 32 and n % 4 == 0 for n in model.shape)
    # RAS axes: x <- input axis 2 (2.5 mm, 20), y <- axis 0 (1.5 mm, 30), z <- axis 1 (2 mm, 26)
    assert grid.resampled_shape == (25, 22, 26)
    back = grid.to_input_grid(model)
    assert back.shape == array.shape
    np.testing.assert_allclose(back, scale_intensity(array, "CT"), atol=0.03)


def test_real_mr_lesion_case_from_pydicom_data():
    from diffugts.benchmarks.real_lesion import DEPTH, load_case

    volume, truth = load_case()
    assert volume.array.shape == (484, 484, DEPTH) and truth.shape == volume.array.shape
    center = np.argwhere(truth[..., 0]).mean(0)
    np.testing.assert_allclose(center, [63.0, 255.5], atol=1.5)  # the circled liver lesion, not the box
    assert truth[..., 0].sum() == 920
    np.testing.assert_allclose(volume.spacing, [0.7231405, 0.7231405, 4.0], atol=1e-5)


def test_a_4d_image_is_read_one_channel_at_a_time(tmp_path):
    rng = np.random.default_rng(0)
    channels = [rng.normal(size=(6, 5, 4)).astype(np.float32) for _ in range(3)]
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.stack(channels, -1), affine), path)
    first = read_volume(path)
    np.testing.assert_array_equal(first.array, channels[0])
    assert (first.channels, first.channel) == (3, 0)
    np.testing.assert_allclose(first.affine, affine)
    third = read_volume(path, channel=2)
    np.testing.assert_array_equal(third.array, channels[2])
    assert (third.channels, third.channel) == (3, 2)
    with pytest.raises(InputError, match=r"channel 3 asked for, but the image has 3 channels \(0-2\)"):
        read_volume(path, channel=3)
    with pytest.raises(InputError, match=r"'channel' must be a channel index \(0, 1, ...\), not -1"):
        read_volume(path, channel=-1)
    single = tmp_path / "three.nii.gz"
    nib.save(nib.Nifti1Image(channels[0], affine), single)
    assert read_volume(single).channels == 1 and read_volume(single, channel=0).channel == 0
    with pytest.raises(InputError, match=r"channel 1 asked for, but the image has one channel \(0\)"):
        read_volume(single, channel=1)
    with pytest.raises(InputError, match=r"'channel' must be a channel index \(0, 1, ...\), not 'T2w'"):
        read_volume(path, channel="T2w")
