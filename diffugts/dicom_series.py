"""DICOM series in: pick one series from a folder an archive sent, check its geometry, read it.

Archives send folders holding several series, SEG / SR / presentation objects beside the images,
and series that are not a regular grid. Our choices (README, "DICOM in and out"):
- several image series: `series_uid` picks one, otherwise the one with most slices; `choice`
  says which in one line;
- objects that are not single-frame images (SEG, SR, RTSTRUCT, KO, PR, DICOMDIR) are skipped;
- missing slices, uneven spacing, gantry tilt (sheared slices), mixed image sizes, orientations
  or pixel spacings, enhanced multi-frame images: a one-line error, nothing is read.
SimpleITK (GDCM) orders the files and reads the voxels; pydicom keeps each file's header, in
the same order, because a DICOM SEG must reference the source frame by frame.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Relative slack when comparing slice steps: scanners round positions to 0.01 mm or so.
SPACING_TOLERANCE = 0.01
TILT_TOLERANCE_DEGREES = 0.5


class SeriesError(ValueError):
    """A folder or series we will not segment, and why (one line)."""


@dataclass
class DicomSeries:
    """One image series: its files and headers in slice order (the volume's last axis)."""

    series_uid: str
    files: list[Path]
    headers: list = field(repr=False)  # pydicom Datasets without pixel data, same order as files
    choice: str = ""  # one line: which series of how many, what was skipped

    @property
    def first(self):
        return self.headers[0]

    @property
    def modality(self) -> str:
        return str(self.first.get("Modality", ""))

    @property
    def description(self) -> str:
        return str(self.first.get("SeriesDescription", ""))


NOT_IMAGES = {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "KO", "PR", "REG", "DOC"}


def _is_single_frame_image(ds) -> bool:
    """A slice we can stack: pixels with a plane position and orientation of its own."""
    if str(ds.get("Modality", "")).upper() in NOT_IMAGES:
        return False
    return all(k in ds for k in ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient"))


def scan_folder(folder: Path) -> tuple[dict[str, list[tuple[Path, object]]], Counter, int]:
    """Image headers per series UID, the skipped objects per modality, and the multi-frame count."""
    import pydicom

    series: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    skipped: Counter = Counter()
    multiframe = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not DICOM (README, thumbnails): not ours to judge
            continue
        modality = str(ds.get("Modality", "")).upper()
        if "SOPClassUID" not in ds:
            skipped["DICOMDIR" if "DirectoryRecordSequence" in ds else "other"] += 1
        elif modality not in NOT_IMAGES and int(ds.get("NumberOfFrames", 1) or 1) > 1:
            multiframe += 1  # enhanced CT/MR: positions live in per-frame groups
            skipped[f"multi-frame {modality}"] += 1
        elif _is_single_frame_image(ds):
            series[str(ds.SeriesInstanceUID)].append((path, ds))
        else:
            skipped[modality or "other"] += 1
    return dict(series), skipped, multiframe


def select_series(folder: str | Path, series_uid: str | None = None) -> DicomSeries:
    """The series to segment, ordered by GDCM, with its geometry checked; SeriesError otherwise."""
    import SimpleITK as sitk

    folder = Path(folder)
    found, skipped, multiframe = scan_folder(folder)
    if not found:
        if multiframe:
            raise SeriesError("enhanced multi-frame images are not supported: export the series as single-frame images")
        extra = f" (only {', '.join(f'{n} {m}' for m, n in sorted(skipped.items()))})" if skipped else ""
        raise SeriesError(f"no DICOM image series in this folder{extra}")
    if series_uid is not None:
        if series_uid not in found:
            raise SeriesError(f"no image series with UID {series_uid} here (found: {', '.join(sorted(found))})")
        uid, why = series_uid, "as asked"
    else:
        uid = max(sorted(found), key=lambda u: len(found[u]))
        why = "the largest" if len(found) > 1 else "the only one"
    members = dict(found[uid])
    # GDCM orders the files by position along the slice normal; objects we skipped drop out.
    ordered = [Path(p) for p in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid, False, True)]
    files = [p for p in ordered if p in members]
    if sorted(files) != sorted(members):
        files = sorted(members, key=lambda p: ordered.index(p) if p in ordered else len(ordered))
    headers = [members[p] for p in files]
    first = headers[0]
    summary = (f"{len(found)} image series; using {uid} ({first.get('Modality', '?')}, "
               f"'{first.get('SeriesDescription', '')}', {len(files)} slices, {why})")
    if skipped:
        summary += "; skipped " + ", ".join(f"{n} {m}" for m, n in sorted(skipped.items()))
    series = DicomSeries(uid, files, headers, summary)
    check_geometry(series)
    return series


def _vector(ds, key) -> np.ndarray:
    return np.asarray([float(v) for v in ds[key].value], dtype=np.float64)


def check_geometry(series: DicomSeries) -> None:
    """A regular, unsheared stack of equal slices, or a one-line SeriesError saying what is wrong."""
    headers = series.headers
    if len(headers) < 2:
        raise SeriesError(f"series {series.series_uid} has {len(headers)} slice: a volume needs at least 2")
    sizes = Counter((int(ds.Rows), int(ds.Columns)) for ds in headers)
    if len(sizes) > 1:
        raise SeriesError("mixed image sizes in one series: " + ", ".join(f"{n} of {r}x{c}" for (r, c), n in sizes.items()))
    orientation = _vector(headers[0], "ImageOrientationPatient")
    if any(not np.allclose(_vector(ds, "ImageOrientationPatient"), orientation, atol=1e-4) for ds in headers):
        raise SeriesError("mixed image orientations in one series")
    spacing = [tuple(float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])) for ds in headers]
    if len(set(spacing)) > 1:
        raise SeriesError(f"mixed pixel spacings in one series: {sorted(set(spacing))}")
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.stack([_vector(ds, "ImagePositionPatient") for ds in headers])
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    if np.any(np.abs(along) < 1e-3):
        raise SeriesError("two slices share one position (duplicate or multi-echo images in one series)")
    if not (np.all(along > 0) or np.all(along < 0)):
        raise SeriesError("slice positions do not go one way along the slice normal")
    across = np.linalg.norm(steps - along[:, None] * normal, axis=1)
    tilt = float(np.degrees(np.arctan2(across, np.abs(along))).max())
    if tilt > TILT_TOLERANCE_DEGREES:
        raise SeriesError(f"gantry tilt: slices are sheared by {tilt:.1f} degrees; resample the series to an "
                         "unsheared grid first")
    gaps = np.abs(along)
    step = float(np.min(gaps))
    uneven = np.abs(gaps - step) > SPACING_TOLERANCE * step + 0.01
    if uneven.any():
        multiples = gaps / step
        if np.allclose(multiples, np.round(multiples), atol=0.05):
            missing = int(np.round(multiples).sum() - len(gaps))
            where = int(np.argmax(uneven))
            raise SeriesError(f"{missing} missing slice(s): a gap of {gaps[where]:.2f} mm after slice {where + 1} "
                             f"where the spacing is {step:.2f} mm")
        raise SeriesError(f"uneven slice spacing: {gaps.min():.2f} to {gaps.max():.2f} mm")


def read_series(folder: str | Path, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray, DicomSeries]:
    """(voxels as (X, Y, Z) with Z = the series' slice order, RAS affine, the series)."""
    import SimpleITK as sitk

    from .io import _itk_to_array

    series = select_series(folder, series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in series.files])
    array, affine = _itk_to_array(reader.Execute())
    # The SEG maps frame k to header k: the grid ITK built must put slice k where header k says.
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    for k in (0, len(series.headers) - 1):
        expected = _vector(series.headers[k], "ImagePositionPatient")
        if not np.allclose((lps @ [0, 0, k, 1])[:3], expected, atol=0.05):
            raise SeriesError(f"slice {k} is not where its header puts it; the series cannot be stacked")
    return array, affine, series


def write_series(array: np.ndarray, affine: np.ndarray, folder: str | Path, modality: str = "MR",
                 description: str = "diffugts test series", reverse_files: bool = False,
                 study_uid: str | None = None, series_uid: str | None = None,
                 frame_of_reference_uid: str | None = None, patient_id: str = "DIFFUGTS-0001") -> list[Path]:
    """Write a volume (X, Y, Z; RAS affine without shear) as single-frame CT or MR images.

    For tests, demos and the README's check. `reverse_files` names and numbers the files against
    their slice order, as some scanners store them.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if modality not in ("CT", "MR"):
        raise ValueError(f"modality {modality!r}: CT or MR")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    sop_class = pydicom.uid.CTImageStorage if modality == "CT" else pydicom.uid.MRImageStorage
    study_uid, series_uid = study_uid or generate_uid(), series_uid or generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    pixels = np.clip(np.rint(array), -32768, 32767).astype(np.int16)
    depth = array.shape[2]
    paths = []
    for k in range(depth):
        number = depth - k if reverse_files else k + 1
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Diffugts", patient_id, "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, number
        ds.SeriesDescription, ds.Manufacturer = description, "diffugts"
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [round(float(v), 4) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in np.concatenate([row_dir, col_dir])]
        ds.PixelSpacing = [round(float(spacing[1]), 4), round(float(spacing[0]), 4)]  # rows, columns
        ds.SliceThickness = round(float(spacing[2]), 4)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = array.shape[1], array.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
            ds.KVP = 120
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
            ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = "3D", 10, 500, 1
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()  # (rows = Y, columns = X)
        path = folder / f"{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
