"""What `segment` (and `listen`) write for one volume, all or nothing: NIfTI mask and anomaly map,
and for a DICOM series a DICOM SEG (optionally the anomaly map as a Parametric Map)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import InputError, Volume, nifti_writer, write_files_atomic

FORMATS = ("nifti", "dicom-seg", "both")


def check_format(volume: Volume, output_format: str) -> None:
    """DICOM out needs DICOM in: the SEG references the source frames."""
    if output_format not in FORMATS:
        raise ValueError(f"unknown format {output_format!r}: {', '.join(FORMATS)}")
    if output_format != "nifti" and volume.dicom is None:
        raise InputError(volume.path, f"--format {output_format} needs a DICOM series folder as input "
                                      "(a DICOM SEG references its source images); use --format nifti")


def save_outputs(out: Path, stem: str, volume: Volume, seg, prompt: str, output_format: str = "nifti",
                 identity=None, anomaly_map_dicom: bool = False) -> dict[str, Path]:
    """Write the chosen outputs; the DICOM objects are built before any file is touched."""
    check_format(volume, output_format)
    targets, written = {}, {}
    if output_format in ("nifti", "both"):
        written["mask"], written["anomaly"] = out / f"{stem}_mask.nii.gz", out / f"{stem}_anomaly.nii.gz"
        targets[written["mask"]] = nifti_writer(seg.mask, volume.affine)
        targets[written["anomaly"]] = nifti_writer(seg.anomaly.astype(np.float32), volume.affine)
    if output_format in ("dicom-seg", "both"):
        from .dicom_seg import build_parametric_map, build_seg

        try:
            objects = {"seg": (out / f"{stem}_seg.dcm", build_seg(volume.dicom, seg.mask, prompt, identity))}
            if anomaly_map_dicom:
                objects["anomaly_map"] = (out / f"{stem}_anomaly_pm.dcm",
                                          build_parametric_map(volume.dicom, seg.anomaly, prompt, identity))
        except Exception as exc:  # source headers highdicom cannot derive from (missing attributes...)
            problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(volume.path, f"cannot write a DICOM SEG from this series: {problem}") from None
        for key, (path, dataset) in objects.items():
            written[key] = path
            targets[path] = lambda tmp, ds=dataset: ds.save_as(tmp, enforce_file_format=True)
    write_files_atomic(targets)
    return written
