"""`diffugts segment` over many volumes: nothing lost, nothing twice.

Inputs are files, folders (NIfTI/NRRD/MHA files and DICOM series inside), globs, an MSD
`dataset.json` or a CSV manifest (`path,prompt,modality`). `workers` volumes are in flight at
once; each runs the one loop (`pipeline.run_segmentation`) against one executor bound to one
endpoint, the ready endpoint with the least outstanding work. An endpoint that fails with gRPC
UNAVAILABLE / DEADLINE_EXCEEDED is set aside with an exponential cool-down and the volume starts
again on another (the loop is seeded: a retried volume gives the same mask), a bounded number of
times. Outputs are staged and renamed into place; `OUT/run.json` is rewritten atomically as each
volume finishes and, with `resume`, lets a re-run skip a volume whose input, request, model and
outputs are unchanged.

Torch-free: the `triton` and `triton-bls` backends import nothing heavier than tritonclient.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


from diffugts.client.transports import TritonError  # numpy only: tritonclient loads on first use

from .io import ITK_SUFFIXES, NIFTI_SUFFIXES, InputError, read_volume, sha256_file, stem_of
from .outputs import check_format
from .pipeline import LoopOptions, run_segmentation
from .prompts import normalize_target

RUN_MANIFEST = "run.json"
MANIFEST_FORMAT = 1
MODALITIES = ("CT", "MR")
TRITON_BACKENDS = ("triton", "triton-bls")
# MSD's top-level "modality" names its channels; these mean MR for our prompts
MR_CHANNELS = {"MR", "MRI", "T1", "T1W", "T1GD", "T2", "T2W", "FLAIR", "ADC", "DWI"}
MAX_COOLDOWN_S = 30.0


class BatchError(ValueError):
    """The batch cannot start at all (no inputs, endpoints serving different models): one line."""


# ----------------------------------------------------------------------------- inputs

@dataclass
class BatchItem:
    input: str
    prompt: str | None = None
    modality: str | None = None
    origin: str = ""  # where the item came from, for errors: "cases.csv line 3"
    error: str | None = None  # a bad row: reported as failed, never run
    key: str = ""  # output stem, unique within the batch


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


def read_msd_dataset(path: Path, split: str = "test") -> list[BatchItem]:
    """An MSD `dataset.json`: `split` entries are image paths or objects with `image` (and our
    `prompt`, `modality`); the top-level single-channel `modality` is used where an entry has none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [BatchItem(str(path), origin=str(path), error=f"{path}: not a readable dataset.json ({exc})")]
    entries = data.get(split) if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        return [BatchItem(str(path), origin=str(path), error=f"{path}: no {split!r} entries")]
    channels = data.get("modality")
    default = None
    if isinstance(channels, dict) and len(channels) == 1:
        name = str(next(iter(channels.values()))).strip().upper()
        default = "CT" if name == "CT" else "MR" if name in MR_CHANNELS else None
    items = []
    for i, entry in enumerate(entries):
        origin = f"{path} {split}[{i}]"
        image = entry if isinstance(entry, str) else entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not image.strip():
            items.append(BatchItem("?", origin=origin, error=f"{origin}: entry has no 'image' path"))
            continue
        fields = entry if isinstance(entry, dict) else {}
        modality, error = _modality(fields.get("modality"), origin)
        items.append(BatchItem(str(path.parent / image), fields.get("prompt") or None, modality or default,
                               origin, error))
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
        identity = (os.path.abspath(item.input), item.prompt, item.modality, item.error)
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


def local_identity(backend: str, executor, weights: str | None) -> dict:
    """The model a torch or ONNX Runtime executor runs: its weights file or exported graphs."""
    preset = executor.preset
    preset_sha = hashlib.sha256(json.dumps(preset.to_dict(), sort_keys=True).encode()).hexdigest()
    identity = {"backend": backend, "preset": preset.name, "preset_sha256": preset_sha}
    if backend == "onnx":
        from diffugts.export.repository import artifacts_sha256

        identity["model_sha256"] = artifacts_sha256(executor.transport.repository)
    else:
        from .config import weights_sha256

        # None: no weights file, the preset's seeded random initialisation (tests, CI)
        identity["weights_sha256"] = weights_sha256(preset, weights)
    return identity


# ------------------------------------------------------------------------- endpoints

class Endpoint:
    """One place volumes run: a Triton URL, or this process (torch / ONNX Runtime).

    Remote endpoints give each worker thread its own executor (an executor holds a prompt cache
    and, with shared memory, its own regions); a local one is shared and runs one volume at a time."""

    def __init__(self, url: str, connect: Callable[[str], object], index: int, shared=None):
        self.url, self.connect, self.index = url, connect, index
        self.outstanding = 0
        self.down_until = 0.0
        self.cooldown = 0.0
        self.suspect = False  # failed before: probe readiness before the next volume
        self.retired: str | None = None  # why it takes no more work (serves another model)
        self._shared = shared
        self._shared_lock = threading.Lock()
        self._local = threading.local()
        self._created: list = []
        self._lock = threading.Lock()

    def executor(self):
        if self._shared is not None:
            return self._shared
        executor = getattr(self._local, "executor", None)
        if executor is None:
            executor = self._local.executor = self.connect(self.url)
            with self._lock:
                self._created.append(executor)
        return executor

    def run(self, fn):
        if self._shared is not None:
            with self._shared_lock:
                return fn(self._shared)
        return fn(self.executor())

    def discard(self) -> None:
        """Drop this thread's executor after a failure: the next volume connects afresh."""
        executor = getattr(self._local, "executor", None)
        self._local.executor = None
        if executor is not None:
            _close(executor)
            with self._lock:
                self._created = [e for e in self._created if e is not executor]

    def close(self) -> None:
        with self._lock:
            created, self._created = self._created, []
        for executor in created:
            _close(executor)


def _close(executor) -> None:
    try:
        executor.close()
    except Exception:  # a dead server cannot unregister anything; nothing else to release
        pass


class ModelMismatch(TritonError):
    """An endpoint that came back serving another model: it takes no more work."""


class NoEndpoint(RuntimeError):
    """No endpoint can take work: all retired, or all down for longer than the retry budget."""


class EndpointDown(RuntimeError):
    """The chosen endpoint failed its readiness probe: counts as one failed attempt."""


class EndpointPool:
    """Least outstanding work among the endpoints not cooling down after a failure.

    An endpoint that fails cools down (0.5 s, doubling to 30 s) and is probed before its next
    volume. When every endpoint has been down for longer than `give_up_s`, `acquire` stops waiting:
    the remaining volumes fail fast (and a later `--resume` picks them up)."""

    def __init__(self, endpoints: list[Endpoint], probe: Callable[[Endpoint], bool] | None = None,
                 base_cooldown_s: float = 0.5, give_up_s: float = 7.5):
        self.endpoints = endpoints
        self.probe = probe
        self.base_cooldown_s, self.give_up_s = base_cooldown_s, give_up_s
        self.all_down_since: float | None = None
        self.transports: list = []  # readiness probes, closed with the pool
        self._cond = threading.Condition()

    def _live(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.retired is None]

    def acquire(self) -> Endpoint:
        with self._cond:
            while True:
                live = self._live()
                if not live:
                    raise NoEndpoint("; ".join(f"{e.url} {e.retired}" for e in self.endpoints))
                now = time.monotonic()
                ready = [e for e in live if e.down_until <= now]
                if ready:
                    chosen = min(ready, key=lambda e: (e.outstanding, e.suspect, e.index))
                    chosen.outstanding += 1
                    break
                if self.all_down_since is not None and now - self.all_down_since > self.give_up_s:
                    raise NoEndpoint(f"none of {', '.join(e.url for e in live)} has answered for "
                                     f"{now - self.all_down_since:.1f} s")
                self._cond.wait(min(e.down_until for e in live) - now)
        if chosen.suspect and self.probe is not None and not self.probe(chosen):
            self.release(chosen, failed=True)
            raise EndpointDown(f"{chosen.url} is not ready")
        return chosen

    def release(self, endpoint: Endpoint, failed: bool = False) -> None:
        with self._cond:
            endpoint.outstanding -= 1
            now = time.monotonic()
            if failed:
                if endpoint.down_until <= now:  # failures of volumes already in flight do not compound
                    endpoint.cooldown = min(max(self.base_cooldown_s, 2 * endpoint.cooldown), MAX_COOLDOWN_S)
                    endpoint.down_until = now + endpoint.cooldown
                endpoint.suspect = True
                if self.all_down_since is None and all(e.suspect for e in self._live()):
                    self.all_down_since = now
            else:
                endpoint.cooldown, endpoint.suspect = 0.0, False
                self.all_down_since = None
            self._cond.notify_all()

    def retire(self, endpoint: Endpoint, why: str) -> None:
        with self._cond:
            endpoint.retired = why
            self._cond.notify_all()

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()
        for transport in self.transports:
            _close(transport)


@dataclass
class ClientOptions:
    """How to reach Triton: per-call deadline, token, TLS root certificate, shared memory."""
    backend: str = "triton"
    timeout_s: float = 300.0
    token: str | None = None
    root_certificates: str | None = None
    shared_memory: bool = False


def give_up_after(retries: int, base_cooldown_s: float) -> float:
    """How long every endpoint may be down before the batch stops waiting: the cool-downs a
    volume would sit through in its `retries`."""
    return base_cooldown_s * (2 ** (retries + 1) - 1)


def triton_pool(urls: list[str], client: ClientOptions, retries: int = 3,
                base_cooldown_s: float = 0.5) -> tuple[EndpointPool, dict]:
    """Probe every endpoint once: the ready ones must serve the same model (its identity is
    returned); the others start cooling down and are probed again before they get work."""
    from diffugts.client.transports import GrpcTransport
    from diffugts.client.triton_executor import BlsClient, TritonExecutor, remote_identity

    probes = {url: GrpcTransport(url, min(client.timeout_s, 10.0), token=client.token,
                                 root_certificates=client.root_certificates) for url in urls}
    identities, unreachable = {}, []
    for url, transport in probes.items():
        if transport.is_ready():
            identities[url] = remote_identity(transport)
        else:
            unreachable.append(url)
    if not identities:
        raise BatchError(f"no endpoint is ready: {', '.join(urls)}")
    models = {json.dumps(v, sort_keys=True) for v in identities.values()}
    if len(models) > 1:
        raise BatchError("the endpoints serve different models: " + "; ".join(
            f"{url} {v['preset']} {(v['model_sha256'] or v['preset_sha256'])[:12]}" for url, v in identities.items()))
    identity = {"backend": client.backend, **next(iter(identities.values()))}

    def connect(url: str):
        if client.backend == "triton-bls":
            executor = BlsClient(url, client.timeout_s, client.token, client.root_certificates)
        else:
            executor = TritonExecutor(url, client.shared_memory, client.timeout_s, client.token,
                                      client.root_certificates)
        served = {"backend": client.backend, **remote_identity(executor.transport)}
        if served != identity:
            _close(executor)
            raise ModelMismatch(f"{url} serves another model than the batch started with")
        return executor

    endpoints = [Endpoint(url, connect, i) for i, url in enumerate(urls)]
    for endpoint in endpoints:
        if endpoint.url in unreachable:
            endpoint.suspect = True
            endpoint.cooldown = base_cooldown_s
            endpoint.down_until = time.monotonic() + base_cooldown_s

    def probe(endpoint: Endpoint) -> bool:
        return probes[endpoint.url].is_ready()

    pool = EndpointPool(endpoints, probe, base_cooldown_s, give_up_after(retries, base_cooldown_s))
    pool.transports = list(probes.values())
    return pool, identity


# ---------------------------------------------------------------------------- run.json

def _write_json_atomic(path: Path, data) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, default=float)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class RunManifest:
    """`OUT/run.json`: this run's finished volumes in input order, rewritten whole (temp + rename)
    after each one, so that a killed client leaves a manifest a re-run can trust."""

    def __init__(self, out: Path, model: dict, order: list[str]):
        self.path = out / RUN_MANIFEST
        self.model = model
        self.order = {key: i for i, key in enumerate(order)}
        self.entries: dict[str, dict] = {}
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._lock = threading.Lock()

    @staticmethod
    def previous(out: Path) -> dict:
        try:
            data = json.loads((out / RUN_MANIFEST).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) and isinstance(data.get("volumes"), list) else {}

    def record(self, key: str, entry: dict) -> None:
        with self._lock:
            self.entries[key] = entry
            volumes = sorted(self.entries.items(), key=lambda kv: self.order[kv[0]])
            _write_json_atomic(self.path, {
                "format": MANIFEST_FORMAT, "model": self.model, "started": self.started,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "volumes": [v for _, v in volumes]})


def outputs_intact(out: Path, outputs: dict) -> bool:
    try:
        return bool(outputs) and all(sha256_file(out / name) == sha for name, sha in outputs.items())
    except OSError:
        return False


# ------------------------------------------------------------------------------ outputs

_plot_lock = threading.Lock()  # pyplot keeps global state: one figure at a time


@dataclass(frozen=True)
class OutputSpec:
    """What each volume writes: `format` nifti | dicom-seg | both (outputs.py), the series to read
    from a DICOM folder holding several, and whether the anomaly map also goes out as DICOM."""

    format: str = "nifti"
    series_uid: str | None = None
    anomaly_map_dicom: bool = False


def algorithm_of(model: dict):
    """The SEG's algorithm identification from the batch's model identity (local or served)."""
    from . import __version__
    from .dicom_seg import AlgorithmIdentity

    digest = model.get("weights_sha256") or model.get("model_sha256") or "none (random init)"
    return AlgorithmIdentity(__version__, model.get("preset", "?"), digest, model.get("backend", "?"))


def write_outputs(out: Path, key: str, volume, seg, prompt: str, meta: dict,
                  spec: OutputSpec = OutputSpec(), model: dict | None = None) -> dict[str, str]:
    """The chosen outputs (outputs.py), overlay PNG and timings, written in a staging folder, then
    renamed into `out` (same filesystem: each rename is atomic). Returns {file name: sha256}."""
    from .outputs import save_outputs
    from .report import write_overlay

    staging = Path(tempfile.mkdtemp(prefix=f".partial-{key}-", dir=out))
    try:
        identity = algorithm_of(model or {}) if spec.format != "nifti" else None
        save_outputs(staging, key, volume, seg, prompt, spec.format, identity, spec.anomaly_map_dicom)
        with _plot_lock:
            write_overlay(staging / f"{key}_overlay.png", volume.array, seg.mask, seg.anomaly,
                          title=f"{key}: {prompt} ({seg.modality})", modality=seg.modality, affine=volume.affine)
        (staging / f"{key}_timings.json").write_text(json.dumps(
            {**meta, "seconds": seg.timings, "mask_voxels": int(seg.mask.sum())}, indent=2, default=float))
        outputs = {f.name: sha256_file(f) for f in sorted(staging.iterdir())}
        for name in outputs:
            os.replace(staging / name, out / name)
        return outputs
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------ the run

@dataclass
class BatchResult:
    volumes: list[dict] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(v["status"] == status for v in self.volumes)

    @property
    def exit_code(self) -> int:
        return 1 if self.count("failed") else 0


def _request(item: BatchItem, options: LoopOptions, spec: OutputSpec) -> dict:
    return {"prompt": item.prompt, "modality": item.modality, "seed": options.seed, "crop": options.crop,
            "steps": options.steps, "format": spec.format, "series_uid": spec.series_uid,
            "anomaly_map_dicom": spec.anomaly_map_dicom}


def run_batch(items: list[BatchItem], out: str | Path, pool: EndpointPool, model: dict,
              options: LoopOptions | None = None, workers: int = 1, resume: bool = False,
              retries: int = 3, say: Callable[[str, bool], None] | None = None,
              on_done: Callable[[dict], None] | None = None,
              on_window: Callable[[BatchItem, Endpoint], None] | None = None,
              spec: OutputSpec = OutputSpec()) -> BatchResult:
    """Segment every item, `workers` at a time, over the pool's endpoints; see the module doc.

    `say(line, is_error)` reports each volume; `on_done(entry)` follows each manifest update
    (a progress bar); `on_window(item, endpoint)` runs before each sliding window of the loop."""
    options = options or LoopOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = RunManifest.previous(out) if resume else {}
    same_model = previous.get("model") == model
    before = {v.get("key"): v for v in previous.get("volumes", []) if isinstance(v, dict)} if same_model else {}
    manifest = RunManifest(out, model, [item.key for item in items])
    say = say or (lambda line, error: None)

    def finish(item: BatchItem, status: str, start: float, **fields) -> dict:
        entry = {"input": item.input, "key": item.key, "prompt": item.prompt, "modality": item.modality,
                 "status": status, "error": None, "outputs": {}, "seconds": round(time.monotonic() - start, 3),
                 "checksum": None, "request": _request(item, options, spec), **fields}
        manifest.record(item.key, entry)
        if status == "failed":
            say(entry["error"], True)
        if on_done:
            on_done(entry)
        return entry

    def attempt(item: BatchItem, volume, endpoint: Endpoint):
        hook = (lambda _stage: on_window(item, endpoint)) if on_window else None
        return endpoint.run(lambda executor: run_segmentation(executor, volume, item.prompt, item.modality,
                                                              options, on_stage=hook))

    def process(item: BatchItem) -> dict:
        start = time.monotonic()
        if item.error:
            return finish(item, "failed", start, error=item.error)
        if not Path(item.input).exists():
            return finish(item, "failed", start, error=f"{item.input}: no such file or folder")
        try:
            checksum = input_checksum(item.input)
        except OSError as exc:
            return finish(item, "failed", start, error=f"{item.input}: cannot read ({exc.strerror})")
        old = before.get(item.key)
        if (old and old.get("status") in ("done", "skipped") and old.get("checksum") == checksum
                and old.get("request") == _request(item, options, spec) and outputs_intact(out, old.get("outputs") or {})):
            entry = finish(item, "skipped", start, checksum=checksum, outputs=old["outputs"],
                           endpoint=old.get("endpoint"), mask_voxels=old.get("mask_voxels"))
            say(f"{item.input}: unchanged since the last run, skipped", False)
            return entry
        try:
            volume = read_volume(item.input, spec.series_uid)
            if volume.dicom is not None:
                say(f"{item.input}: {volume.dicom.choice}", False)
            check_format(volume, spec.format)  # before any server time is spent on it
        except InputError as exc:
            return finish(item, "failed", start, checksum=checksum, error=str(exc))
        errors = []
        for tries in range(1, retries + 2):
            try:
                endpoint = pool.acquire()
            except NoEndpoint as exc:
                return finish(item, "failed", start, checksum=checksum, attempts=tries - 1,
                              error=f"{item.input}: no endpoint left ({exc})")
            except EndpointDown as exc:
                errors.append(str(exc))
                continue
            try:
                seg = attempt(item, volume, endpoint)
            except TritonError as exc:
                pool.release(endpoint, failed=exc.transient)
                endpoint.discard()
                if isinstance(exc, ModelMismatch):
                    pool.retire(endpoint, "serves another model")
                elif not exc.transient:
                    return finish(item, "failed", start, checksum=checksum, attempts=tries, error=f"{item.input}: {exc}")
                errors.append(str(exc))
                continue
            except (InputError, ValueError) as exc:  # the volume itself is bad: no retry
                pool.release(endpoint)
                return finish(item, "failed", start, checksum=checksum, attempts=tries, error=f"{item.input}: {exc}")
            except BaseException:
                pool.release(endpoint)
                raise
            pool.release(endpoint)
            meta = {"backend": model.get("backend"), "preset": model.get("preset"), "endpoint": endpoint.url}
            try:
                outputs = write_outputs(out, item.key, volume, seg, item.prompt, meta, spec, model)
            except InputError as exc:  # a series highdicom cannot derive a SEG from: nothing written
                return finish(item, "failed", start, checksum=checksum, attempts=tries, error=str(exc))
            entry = finish(item, "done", start, checksum=checksum, outputs=outputs, endpoint=endpoint.url,
                           attempts=tries, mask_voxels=int(seg.mask.sum()))
            say(f"{item.input}: {entry['mask_voxels']} mask voxels -> {out / (item.key + '_mask.nii.gz')}", False)
            return entry
        return finish(item, "failed", start, checksum=checksum, attempts=retries + 1,
                      error=f"{item.input}: failed {retries + 1} times; last: {errors[-1]}")

    def guarded(item: BatchItem) -> dict:
        try:
            return process(item)
        except Exception as exc:  # one volume's surprise must not stop the batch or lose the manifest
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return finish(item, "failed", time.monotonic(), error=f"{item.input}: {type(exc).__name__}: {text}")

    threads = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="diffugts-batch")
    try:
        results = list(threads.map(guarded, items))
    except KeyboardInterrupt:  # the volumes in flight finish and are recorded; queued ones never start
        threads.shutdown(wait=True, cancel_futures=True)
        raise
    threads.shutdown()
    return BatchResult(results)


# -------------------------------------------------------------------- `diffugts segment`

def segment_command(args) -> int:
    """The `segment` subcommand: arguments -> inputs, endpoints, run; a one-line error and exit
    code 2 when the batch cannot start, 1 when any volume failed."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from diffugts.client.transports import read_token

    def fail(message: str, code: int) -> int:
        print(f"diffugts: error: {message}", flush=True, file=sys.stderr)
        return code

    if args.prompt is not None:
        try:
            normalize_target(args.prompt)
        except ValueError as exc:
            return fail(str(exc), 2)
    if args.workers < 1 or args.retries < 0 or args.timeout <= 0:
        return fail("--workers must be >= 1, --retries >= 0 and --timeout > 0", 2)
    items = collect_inputs(args.inputs, args.prompt, args.modality)
    options = LoopOptions(crop=not args.no_crop, seed=args.seed, steps=args.steps)
    urls = args.url or ["127.0.0.1:8001"]
    try:
        if args.backend in TRITON_BACKENDS:
            token = read_token(args.token_file) if args.token_file else None
            if args.tls_ca and not Path(args.tls_ca).is_file():
                return fail(f"{args.tls_ca}: no such CA certificate file", 2)
            client = ClientOptions(args.backend, args.timeout, token, args.tls_ca, args.shared_memory)
            pool, model = triton_pool(urls, client, args.retries)
        else:
            from .executors import make_executor

            executor = make_executor(args.backend, args.preset or "demo", args.weights, None, args.repository)
            model = local_identity(args.backend, executor, args.weights)
            pool = EndpointPool([Endpoint("local", None, 0, shared=executor)])
    except (BatchError, TritonError) as exc:
        return fail(str(exc), 2)

    console = Console(stderr=True, highlight=False)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("volumes", total=len(items))

        def say(line: str, error: bool) -> None:
            # soft wrap: a path or an error stays on one line, whatever the terminal's width
            progress.console.print(f"[red]diffugts: error: {escape(line)}[/red]" if error else escape(line),
                                   soft_wrap=True)

        def on_done(entry: dict) -> None:
            counts[entry["status"]] += 1
            progress.update(task, advance=1, description="volumes (" + ", ".join(
                f"{n} {s}" for s, n in counts.items() if n) + ")")

        try:
            spec = OutputSpec(args.format, args.series_uid, args.anomaly_map_dicom)
            result = run_batch(items, args.out, pool, model, options, args.workers, args.resume, args.retries,
                               say, on_done, spec=spec)
        finally:
            pool.close()
    print(f"{result.count('done')} done, {result.count('skipped')} skipped, {result.count('failed')} failed; "
          f"manifest {Path(args.out) / RUN_MANIFEST}", file=sys.stderr)
    return result.exit_code
