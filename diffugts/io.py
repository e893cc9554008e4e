"""Reading scans (NIfTI, NRRD/MHA, DICOM series) and writing masks atomically.

A `Volume` is a 3D float32 array with its 4x4 voxel-to-RAS affine (nibabel's convention).
Every failure is an `InputError` naming the file and the problem in one line.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MAX_VOXELS = 1024**3


def sha256_file(path: Path, digest=None):
    """Hex SHA-256 of a file, read in 1 MiB blocks; with `digest`, feeds that one and returns it."""
    own = digest is None
    digest = digest or hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() if own else digest


class InputError(ValueError):
    """Bad input a user can fix: the message is one line naming the file and the problem."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


@dataclass
class Volume:
    array: np.ndarray  # (X, Y, Z) float32
    affine: np.ndarray  # (4, 4) voxel -> RAS mm
    path: str = ""
    dicom: object = None  # dicom_series.DicomSeries when read from a DICOM series (slice k = header k)
    channels: int = 1  # a 4D image's channel count (the Decathlon's multi-sequence MR); `array` is one of them
    channel: int = 0

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def stem_of(path: str | Path) -> str:
    """'case_001.nii.gz' -> 'case_001'; a DICOM folder -> its name."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


def _itk_to_array(image) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)  # (z, y, x)
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()}")
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.transpose(array, (2, 1, 0)), LPS_TO_RAS @ affine


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    return _itk_to_array(sitk.ReadImage(str(path)))


def read_volume(path: str | Path, series_uid: str | None = None, channel: int | None = None) -> Volume:
    """Read a scan; for a DICOM folder `series_uid` picks the series (default: the largest); for a
    4D image `channel` picks the channel (default: the first, the Decathlon's primary sequence)."""
    path = Path(path)
    name = path.name.lower()
    if not path.exists():
        raise InputError(path, "no such file or folder")
    dicom = None
    from .dicom_series import SeriesError, read_series

    try:
        if path.is_dir():
            array, affine, dicom = read_series(path, series_uid)
        elif name.endswith(NIFTI_SUFFIXES):
            array, affine = _read_nifti(path)
        elif name.endswith(ITK_SUFFIXES) or name.endswith(".dcm"):
            array, affine = _read_itk(path)
        else:
            raise ValueError("unknown format (NIfTI, NRRD, MHA or a DICOM series folder)")
        array = np.asarray(array)
    except InputError:
        raise
    except SeriesError as exc:  # our own checks already say it in one line
        raise InputError(path, str(exc)) from None
    except Exception as exc:  # every reader fails differently; the user needs one line
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"cannot read: {problem}") from None
    array, channels, channel = one_channel(path, array, channel)
    return Volume(validate_array(path, array), validate_affine(path, affine), str(path), dicom, channels, channel)


def channel_index(value) -> int | None:
    """A channel as a manifest or a caller gives it: None, or a non-negative integer; ValueError else."""
    if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0):
        raise ValueError(f"'channel' must be a channel index (0, 1, ...), not {value!r}")
    return None if value is None else int(value)


def one_channel(path, array: np.ndarray, channel: int | None) -> tuple[np.ndarray, int, int]:
    """`array`'s channel `channel` (None: the first) when it is 4D, channels on the last axis as the
    Decathlon stores FLAIR, T1w, T1gd, T2w; with the channel count and the channel taken. Other
    shapes pass through (`validate_array` says what is wrong with them)."""
    try:
        channel = channel_index(channel)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
    array = without_trailing_unit_axes(array)
    if array.ndim > 4:
        return array, 1, 0
    channels = array.shape[-1] if array.ndim == 4 else 1
    taken = 0 if channel is None else channel
    if not 0 <= taken < channels:
        raise InputError(path, f"channel {channel} asked for, but the image has "
                               + (f"{channels} channels (0-{channels - 1})" if channels > 1 else "one channel (0)"))
    return (array[..., taken] if array.ndim == 4 else array), channels, taken


def without_trailing_unit_axes(array: np.ndarray) -> np.ndarray:
    """(X, Y, Z, 1, ...) -> (X, Y, Z): a 3D volume stored with unit axes after it."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def validate_array(path, array: np.ndarray) -> np.ndarray:
    array = without_trailing_unit_axes(array)  # the server reads arrays, not files
    if array.ndim != 3:
        raise InputError(path, f"expected a 3D volume, got shape {tuple(array.shape)}")
    if min(array.shape) < 2:
        raise InputError(path, f"volume shape {tuple(array.shape)} is too thin to be 3D")
    if array.size > MAX_VOXELS:
        raise InputError(path, f"volume of {array.size} voxels is larger than {MAX_VOXELS}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(path, f"unsupported voxel type {array.dtype}")
    array = array.astype(np.float32)
    bad = ~np.isfinite(array)
    if bad.any():
        raise InputError(path, f"{int(bad.sum())} voxels are NaN or Inf")
    return array


def validate_affine(path, affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(path, "the voxel-to-world transform is missing or degenerate")
    return affine


def write_files_atomic(targets: dict[Path, Callable[[str], None]]) -> None:
    """Write several files so that either all appear or none: each writer fills a temp name in
    the target's folder, then every temp file is renamed into place."""
    staged: list[tuple[str, Path]] = []
    try:
        for target, write in targets.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            suffix = ".nii.gz" if target.name.endswith(".nii.gz") else target.suffix
            fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=target.parent)
            os.close(fd)
            staged.append((tmp, target))
            write(tmp)
        for tmp, target in staged:
            os.replace(tmp, target)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def nifti_writer(array: np.ndarray, affine: np.ndarray) -> Callable[[str], None]:
    import nibabel as nib

    return lambda tmp: nib.save(nib.Nifti1Image(array, affine), tmp)


def write_nifti_atomic(targets: dict[Path, np.ndarray], affine: np.ndarray) -> None:
    """Write several NIfTI files so that either all appear or none: temp names, then rename."""
    write_files_atomic({target: nifti_writer(array, affine) for target, array in targets.items()})
