"""What a batch runs: files, folders, globs, an MSD `dataset.json` or a CSV manifest, expanded
into items, each with its prompt, modality and a unique output stem. A bad argument or row becomes
an item carrying its error (reported as failed, never run), so one typo does not stop a batch.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .io import ITK_SUFFIXES, NIFTI_SUFFIXES, channel_index, sha256_file, stem_of
from .prompts import normalize_target

MODALITIES = ("CT", "MR")
# MSD's top-level "modality" names its channels; these mean MR for our prompts
MR_CHANNELS = {"MR", "MRI", "T1", "T1W", "T1GD", "T2", "T2W", "FLAIR", "ADC", "DWI"}


@dataclass
class BatchItem:
    input: str
    prompt: str | None = None
    modality: str | None = None
    origin: str = ""  # where the item came from, for errors: "cases.csv line 3"
    error: str | None = None  # a bad row: reported as failed, never run
    key: str = ""  # output stem, unique within the batch
    channel: int | None = None  # of a 4D image (an MSD entry's own); None: the batch's --channel, else the first


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES + ITK_SUFFIXES)


def expand_folder(folder: Path) -> list[Path]:
    """Volume files in the folder and below it, and every folder holding DICOM files. A folder
    that holds DICOM files itself is one input, subfolders included: an archive whose series
    `read_volume` chooses among (--series-uid, else the largest)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths = [Path(root) / f for f in sorted(files) if not f.startswith(".")]
        volumes = [p for p in paths if _is_volume_file(p)]
        found += volumes
        if any(_is_dicom(p) for p in paths if p not in volumes):
            found.append(Path(root))
            dirs[:] = []
    return found


def _modality(value, origin: str) -> tuple[str | None, str | None]:
    text = (value or "").strip().upper()
    if not text:
        return None, None
    if text not in MODALITIES:
        return None, f"{origin}: modality {value!r} is not CT or MR"
    return text, None


def read_csv_manifest(path: Path) -> list[BatchItem]:
    """Rows `path,prompt,modality` (a header row naming those columns is optional); relative
    paths are taken from the CSV's folder."""
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [BatchItem(str(path), origin=str(path), error=f"{path}: cannot read the CSV manifest ({exc})")]
    start = 1 if rows and [c.strip().lower() for c in rows[0][:1]] == ["path"] else 0
    items = []
    for number, row in enumerate(rows[start:], start + 1):
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        origin = f"{path} line {number}"
        if len(row) > 3 or not row[0].strip():
            items.append(BatchItem(row[0].strip() or "?", origin=origin,
                                   error=f"{origin}: expected `path,prompt,modality`, got {len(row)} fields"))
            continue
        target = Path(row[0].strip())
        target = target if target.is_absolute() else path.parent / target
        prompt = row[1].strip() if len(row) > 1 and row[1].strip() else None
        modality, error = _modality(row[2] if len(row) > 2 else "", origin)
        items.append(BatchItem(str(target), prompt, modality, origin, error))
    if not items:
        items.append(BatchItem(str(path), origin=str(path), error=f"{path}: the CSV manifest has no rows"))
    return items


def manifest_modality(channels) -> str | None:
    """An MSD `dataset.json`'s top-level `modality` ({"0": "FLAIR", "1": "T1w", ...}) as CT or MR
    when its channels are all one of them; None (guessed per scan) otherwise."""
    if not isinstance(channels, dict) or not channels:
        return None
    names = {str(name).strip().upper() for name in channels.values()}
    return "CT" if names == {"CT"} else "MR" if names <= MR_CHANNELS else None


def read_msd_dataset(path: Path, split: str = "test") -> list[BatchItem]:
    """An MSD `dataset.json`: `split` entries are image paths or objects with `image` (and our
    `prompt`, `modality`, `channel`); the top-level `modality` is used where an entry has none,
    when its channels are all CT or all MR (the Decathlon's Brain: FLAIR, T1w, T1gd, T2w)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [BatchItem(str(path), origin=str(path), error=f"{path}: not a readable dataset.json ({exc})")]
    entries = data.get(split) if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        return [BatchItem(str(path), origin=str(path), error=f"{path}: no {split!r} entries")]
    default = manifest_modality(data.get("modality"))
    items = []
    for i, entry in enumerate(entries):
        origin = f"{path} {split}[{i}]"
        image = entry if isinstance(entry, str) else entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not image.strip():
            items.append(BatchItem("?", origin=origin, error=f"{origin}: entry has no 'image' path"))
            continue
        fields = entry if isinstance(entry, dict) else {}
        modality, error = _modality(fields.get("modality"), origin)
        try:
            channel = channel_index(fields.get("channel"))
        except ValueError as exc:
            error, channel = error or f"{origin}: {exc}", None
        items.append(BatchItem(str(path.parent / image), fields.get("prompt") or None, modality or default,
                               origin, error, channel=channel))
    return items


def collect_inputs(specs: list[str], prompt: str | None = None, modality: str | None = None,
                   split: str = "test") -> list[BatchItem]:
    """Every volume the arguments name, once, each with its prompt and modality (its own, else the
    command's), and a unique output stem. A bad argument or row becomes an item with an error."""
    items: list[BatchItem] = []
    for spec in specs:
        path = Path(spec)
        if path.is_file() and path.suffix.lower() == ".csv":
            items += read_csv_manifest(path)
        elif path.is_file() and path.suffix.lower() == ".json":
            items += read_msd_dataset(path, split)
        elif path.is_dir() and (path / "dataset.json").is_file():
            items += read_msd_dataset(path / "dataset.json", split)
        elif path.is_dir():
            found = expand_folder(path)
            items += [BatchItem(str(p), origin=spec) for p in found] or [
                BatchItem(spec, origin=spec, error=f"{spec}: no NIfTI/NRRD/MHA files or DICOM series in this folder")]
        elif path.exists():
            items.append(BatchItem(spec, origin=spec))
        elif glob.has_magic(spec):
            matches = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
            found = [p for m in matches for p in (expand_folder(m) if m.is_dir() else [m])]
            items += [BatchItem(str(p), origin=spec) for p in found] or [
                BatchItem(spec, origin=spec, error=f"{spec}: no file matches")]
        else:
            items.append(BatchItem(spec, origin=spec, error=f"{spec}: no such file or folder"))
    seen, unique, stems = set(), [], {}
    for item in items:
        item.prompt = item.prompt or prompt
        item.modality = item.modality or modality
        if item.error is None:
            if not item.prompt:
                item.error = f"{item.origin or item.input}: no prompt (give --prompt or a prompt column)"
            else:
                try:
                    item.prompt = normalize_target(item.prompt)
                except ValueError as exc:
                    item.error = f"{item.origin or item.input}: {exc}"
        identity = (os.path.abspath(item.input), item.prompt, item.modality, item.channel, item.error)
        if identity in seen:  # the same volume named twice (a file and a glob): run it once
            continue
        seen.add(identity)
        stem = stem_of(item.input.rstrip("/")) or "volume"
        count = stems[stem] = stems.get(stem, 0) + 1
        item.key = stem if count == 1 else f"{stem}_{count}"
        unique.append(item)
    return unique


# ------------------------------------------------------------------------- checksums

def input_checksum(path: str | Path) -> str:
    """sha256 of a file, or of a DICOM folder's files (names and bytes, in name order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f.name.encode() + b"\0")
        sha256_file(f, digest)
    return digest.hexdigest()

