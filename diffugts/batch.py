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

Inputs are collected in `batch_inputs.py`; endpoints and their pool live in `endpoints.py`.

Torch-free: the `triton` and `triton-bls` backends import nothing heavier than tritonclient.
"""

from __future__ import annotations

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

from .batch_inputs import BatchItem, collect_inputs, input_checksum
from .endpoints import (BatchError, ClientOptions, Endpoint, EndpointDown, EndpointPool, ModelMismatch, NoEndpoint,
                        triton_pool)
from .io import InputError, read_volume, sha256_file
from .outputs import check_format
from .pipeline import LoopOptions, run_segmentation
from .prompts import normalize_target
from .report import write_json

RUN_MANIFEST = "run.json"
MANIFEST_FORMAT = 1
TRITON_BACKENDS = ("triton", "triton-bls")


# ------------------------------------------------------------------------- identity

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


# ---------------------------------------------------------------------------- run.json

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
            write_json(self.path, {
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
    from a DICOM folder holding several, the channel of a 4D image (None: the first), and whether
    the anomaly map also goes out as DICOM."""

    format: str = "nifti"
    series_uid: str | None = None
    anomaly_map_dicom: bool = False
    channel: int | None = None


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
            note = "".join(f"\nnote: {n[:90]}{'...' if len(n) > 90 else ''}" for n in seg.notices)
            write_overlay(staging / f"{key}_overlay.png", volume.array, seg.mask, seg.anomaly,
                          title=f"{key}: {prompt} ({seg.modality}){note}", modality=seg.modality, affine=volume.affine)
        (staging / f"{key}_timings.json").write_text(json.dumps(
            {**meta, "seconds": seg.timings, "mask_voxels": int(seg.mask.sum()), "notices": list(seg.notices)},
            indent=2, default=float))
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


def read_channel(item: BatchItem, spec: OutputSpec) -> int | None:
    """The channel of a 4D image this item reads: its own (an MSD entry's), else the batch's."""
    return spec.channel if item.channel is None else item.channel


def _request(item: BatchItem, options: LoopOptions, spec: OutputSpec) -> dict:
    return {"prompt": item.prompt, "modality": item.modality, "channel": read_channel(item, spec),
            "seed": options.seed, "crop": options.crop, "organ": options.organ,
            "all_components": options.all_components, "steps": options.steps,
            "format": spec.format, "series_uid": spec.series_uid, "anomaly_map_dicom": spec.anomaly_map_dicom}


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
            volume = read_volume(item.input, spec.series_uid, read_channel(item, spec))
            if volume.dicom is not None:
                say(f"{item.input}: {volume.dicom.choice}", False)
            if volume.channels > 1:
                how = "the entry's channel" if item.channel is not None else "--channel picks another"
                say(f"{item.input}: channel {volume.channel} of {volume.channels} ({how})", False)
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
                           attempts=tries, mask_voxels=int(seg.mask.sum()), notices=list(seg.notices))
            say(f"{item.input}: {entry['mask_voxels']} mask voxels -> {out / (item.key + '_mask.nii.gz')}", False)
            for notice in seg.notices:
                say(f"{item.input}: note: {notice}", False)
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

def segment_command(args, options: LoopOptions) -> int:
    """The `segment` subcommand: arguments -> inputs, endpoints, run with `options` (the loop's, from
    the same arguments); a one-line error and exit code 2 when the batch cannot start, 1 when any
    volume failed."""
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
            spec = OutputSpec(args.format, args.series_uid, args.anomaly_map_dicom, args.channel)
            result = run_batch(items, args.out, pool, model, options, args.workers, args.resume, args.retries,
                               say, on_done, spec=spec)
        finally:
            pool.close()
    print(f"{result.count('done')} done, {result.count('skipped')} skipped, {result.count('failed')} failed; "
          f"manifest {Path(args.out) / RUN_MANIFEST}", file=sys.stderr)
    return result.exit_code
