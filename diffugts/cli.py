"""The `diffugts` command line: phantom, segment, evaluate (export, serve, bench, train join later)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from .io import InputError

BACKENDS = ("torch", "onnx", "openvino", "triton", "triton-bls")


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def fail(message: str) -> None:
    """One line on stderr, no traceback."""
    print(f"diffugts: error: {message}", file=sys.stderr)


def _executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--preset", default=None, help="tiny, demo (default) or maisi")
    p.add_argument("--weights", default=None, help="a diffugts safetensors file (overrides the preset's)")
    p.add_argument("--url", action="append", default=None,
                   help="Triton gRPC address for triton backends (default 127.0.0.1:8001; segment: repeatable)")
    p.add_argument("--repository", default=None, help="exported repository for the onnx and openvino backends")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-crop", action="store_true", help="inpaint the whole latent, not its bounding box")
    p.add_argument("--whole-scan", action="store_true",
                   help="do not restrict the maps and the mask to the organ the target names (brain, lung)")
    p.add_argument("--all-components", action="store_true",
                   help="keep every component of the mask past the size and air floors (no one per lesion, no "
                        "near-the-best rule for several): every candidate, more false positives")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the preset's)")
    p.add_argument("--shared-memory", action="store_true",
                   help="triton: pass tensors through system shared memory (client and server on one host)")


def _make_executor(args):
    from .executors import make_executor

    preset = args.preset or "demo"
    url = args.url[0] if args.url else None
    return make_executor(args.backend, preset, args.weights, url, args.repository, args.shared_memory)


def _options(args):
    from .pipeline import LoopOptions

    return LoopOptions(crop=not args.no_crop, seed=args.seed, steps=args.steps, organ=not args.whole_scan,
                       all_components=args.all_components)


def cmd_phantom(args) -> int:
    from rich.progress import Progress

    from .phantom import write_dataset

    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    try:
        with Progress(console=_console(True)) as progress:
            task = progress.add_task("phantoms", total=args.n)
            out = write_dataset(args.out, args.n, args.seed, categories, args.split, tuple(args.shape),
                                args.spacing, args.healthy_fraction, progress=lambda: progress.advance(task))
    except ValueError as exc:
        fail(str(exc))
        return 2
    print(f"wrote {args.n} cases to {out}")
    return 0


def cmd_segment(args) -> int:
    from .batch import segment_command

    return segment_command(args, _options(args))


def cmd_listen(args) -> int:
    from .listen import run

    return run(args, _make_executor(args), _options(args))


def cmd_evaluate(args) -> int:
    from rich.progress import Progress

    from .evaluate import ablation_markdown, evaluate_dataset, load_manifest, result_table
    from .pipeline import ABLATIONS, LoopOptions
    from .report import write_json

    total = len(load_manifest(Path(args.dataset), args.split, args.prompt)[: args.limit])
    ablations = ABLATIONS if args.ablation == "all" else (args.ablation,)
    executor = _make_executor(args)
    results = {}
    with Progress(console=_console(True)) as progress:
        for ablation in ablations:
            task = progress.add_task(f"cases ({ablation})", total=total)
            options = replace(_options(args), ablation=ablation)
            results[ablation] = evaluate_dataset(executor, args.dataset, args.split, args.limit, options,
                                                 on_case=lambda _, t=task: progress.advance(t), prompt=args.prompt)
            results[ablation]["backend"], results[ablation]["ablation"] = args.backend, ablation
    if len(results) == 1:
        result = next(iter(results.values()))
        write_json(Path(args.out), result)
        _console().print(result_table(result))
    else:
        write_json(Path(args.out), {"ablations": results})
        table = ablation_markdown(results)
        Path(args.out).with_suffix(".md").write_text(table)
        print(table)
    errors = sorted({e for r in results.values() for e in r["errors"]})
    for err in errors:
        fail(err)
    return 1 if errors else 0


def cmd_compare(args) -> int:
    from .compare import compare_command

    try:
        return compare_command(args)
    except InputError as exc:
        fail(str(exc))
        return 2


def cmd_demo(args) -> int:
    """The main job: build the repository if missing, start Triton, segment the bundled sample
    through the gRPC client loop (mask, overlay PNG, timings JSON), stop the server."""
    from diffugts.export import build_repository, is_repository

    from .config import WEIGHTS_DIR
    from .serve import TritonServer

    sample = WEIGHTS_DIR.parent / "data" / "sample_kidney_ct.nii.gz"
    argv = ["segment", str(sample), "--prompt", "kidney tumor", "--out", args.out]
    if args.backend != "triton":
        return main(argv + ["--backend", args.backend, "--preset", args.preset or "demo"])
    repository = Path(args.repository)
    if not is_repository(repository):
        print(f"exporting the {args.preset or 'demo'} preset to {repository}", file=sys.stderr)
        build_repository(repository, args.preset or "demo")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with TritonServer(repository, grpc_port=0, http_port=0, metrics_port=0,
                      log_path=Path(args.out) / "tritonserver.log") as server:
        print(f"tritonserver ready on {server.grpc_url}", file=sys.stderr)
        return main(argv + ["--backend", "triton", "--url", server.grpc_url])


def cmd_export(args) -> int:
    from rich.progress import Progress

    from diffugts.export import build_repository
    from diffugts.export.onnx_export import ExportError

    try:
        with Progress(console=_console(True)) as progress:
            task = progress.add_task("export", total=5)

            def step(name):
                progress.update(task, description=f"export {name}")
                progress.advance(task)

            out = build_repository(args.out, args.preset, args.weights, args.runtime,
                                   not args.no_dynamic_batching, args.rtol, step, args.trt_accelerator,
                                   stage_runtime=args.stage_runtime)
    except ExportError as exc:
        fail(str(exc))
        return 1
    print(f"model repository written to {out}")
    return 0


def cmd_serve(args) -> int:
    import signal
    import threading

    from diffugts.export import build_repository, is_repository
    from diffugts.serve import ServerError, TritonServer
    from diffugts.server_security import SecurityError, ServerSecurity

    try:  # before anything is built or started
        security = ServerSecurity.from_files(args.token_file, args.tls_cert, args.tls_key)
        security.check_bind(args.host)
    except SecurityError as exc:
        fail(str(exc))
        return 2
    repository = Path(args.repository)
    if not is_repository(repository):
        print(f"building {repository} (preset {args.preset}) first", file=sys.stderr)
        build_repository(repository, args.preset, args.weights)
    server = TritonServer(repository, args.host, args.grpc_port, args.http_port, args.metrics_port, args.log,
                          security=security)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
    except ServerError as exc:
        fail(str(exc))
        return 1
    print(f"tritonserver ready: grpc {server.host}:{server.grpc_port}  http {server.host}:{server.http_port}  "
          f"metrics http://{server.host}:{server.metrics_port}/metrics  log {server.log_path}"
          f"{'  token ' + args.token_file if args.token_file else ''}{'  grpc tls' if args.tls_cert else ''}",
          flush=True)
    try:
        while not stop.wait(0.5):
            if server.process.poll() is not None:
                fail(f"tritonserver exited with code {server.process.returncode}; log {server.log_path}")
                return 1
    finally:
        server.stop()
    print("tritonserver stopped", flush=True)
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_calibrate(args) -> int:
    from rich.progress import Progress

    from .calibrate import calibrate
    from .evaluate import load_manifest
    from .executors.torch_executor import TorchExecutor
    from .report import write_json

    total = sum(len(load_manifest(Path(d), args.split, args.prompt)) for d in args.dataset) * len(args.thetas)
    executor = TorchExecutor.from_preset(args.preset, args.weights)
    with Progress(console=_console(True)) as progress:
        task = progress.add_task("calibration runs", total=total)
        result = calibrate(executor, args.dataset, args.thetas, args.thresholds, args.min_components,
                           lambda: progress.advance(task), args.split, args.prompt)
    write_json(Path(args.out), result)
    for theta, row in result["dice"].items():
        for size in args.min_components:
            print(f"theta {theta:g}, min component {size:g} mm^3: "
                  + "  ".join(f"{t:g} -> {by_size[size]:.3f}" for t, by_size in row.items()))
    best = result["best"]
    print(f"best: anomaly_threshold={best['anomaly_threshold']:g} mask_threshold={best['mask_threshold']:g} "
          f"min_component_mm3={best['min_component_mm3']:g} (mean Dice {best['dice']:.3f} over {result['cases']} cases)")
    if result["on_grid_edge"]:
        print(f"note: the best lies on the edge of the grid of {', '.join(result['on_grid_edge'])}; widen it to look further")
    return 0


def _anatomy_kinds(text: str | None) -> tuple[str, ...] | None:
    return tuple(k.strip() for k in text.split(",") if k.strip()) if text else None


def cmd_train(args) -> int:
    from . import train

    work = Path(args.work)
    sources = train.Sources(Path(args.corpus) if args.corpus else None, Path(args.dataset) if args.dataset else None,
                            args.anatomy_volumes, args.device, args.amp, args.anatomy_modalities,
                            _anatomy_kinds(args.anatomy_kinds), args.prompt)
    try:
        if args.phase == "snapshot":
            report = train.weights_from_checkpoints(args.preset, work, Path(args.backbone) if args.backbone else None,
                                                    args.head_levels)
        elif args.phase == "backbone":
            report = train.train_backbone(args.preset, work, args.seed, args.vae_steps, args.unet_steps, args.volumes,
                                          sources, Path(args.init) if args.init else None,
                                          Path(args.from_volumes) if args.from_volumes else None,
                                          Path(args.save_volumes) if args.save_volumes else None,
                                          args.vae_batch, args.unet_batch)
        else:
            report = train.train_heads(args.preset, work, args.seed, args.aova_steps, args.head_steps, args.cases,
                                       Path(args.backbone) if args.backbone else None, sources=sources,
                                       head_dice=args.head_dice, head_levels=args.head_levels,
                                       head_crop=args.head_crop, head_synth=args.head_synth,
                                       head_sampling=args.head_sampling)
    except (ValueError, InputError) as exc:
        fail(str(exc))
        return 2
    if args.install and args.phase != "backbone":
        print(f"installed {train.install_weights(work)}")
    print(json.dumps(report, indent=2))
    return 0


def _print_report(make_report) -> int:
    try:
        report = make_report()
    except (ValueError, InputError) as exc:
        fail(str(exc))
        return 2
    print(json.dumps(report, indent=2))
    return 0


def cmd_join_heads(args) -> int:
    from .models.weights import join_heads

    return _print_report(lambda: join_heads([Path(p) for p in args.weights], Path(args.out), args.preset, args.mirrors))


def cmd_split_heads(args) -> int:
    from .models.weights import split_heads

    return _print_report(lambda: split_heads(Path(args.weights), Path(args.out), args.preset))


def cmd_paraphrases(args) -> int:
    from .paraphrases import fit_paraphrase_projection

    return _print_report(lambda: fit_paraphrase_projection(Path(args.weights), Path(args.out), args.preset, args.l2,
                                                           args.steps))


def cmd_lesions(args) -> int:
    from rich.progress import Progress

    from .config import get_preset
    from .lesions import UNSEEN_KINDS
    from .training_data import write_anatomy_lesions

    kinds = [k.strip() for k in args.kinds.split(",")] if args.kinds else list(UNSEEN_KINDS)
    try:
        with Progress(console=_console(True)) as progress:
            task = progress.add_task("lesions", total=args.n)
            out = write_anatomy_lesions(args.corpus, args.out, get_preset(args.preset), args.n, args.seed, kinds,
                                        progress=lambda: progress.update(task, advance=1),
                                        lesions_per_case=args.lesions_per_case)
    except (ValueError, InputError, OSError) as exc:
        fail(str(exc))
        return 2
    print(f"wrote {args.n} cases to {out}")
    return 0


def cmd_real_tumours(args) -> int:
    from rich.progress import Progress

    from .real_tumours import CASES, write_real_tumours
    from .sdists import checked_sdist

    try:
        sdist = checked_sdist("pyradiomics", args.sdist)  # before the bar: a missing file is one line, nothing else
        with Progress(console=_console(True)) as progress:
            task = progress.add_task("real tumours", total=len(CASES))
            out = write_real_tumours(args.out, sdist, progress=lambda: progress.update(task, advance=1))
    except (ValueError, InputError, OSError) as exc:
        fail(str(exc))
        return 2
    print(f"wrote {len(CASES)} real scans with expert tumour masks to {out}")
    return 0


def cmd_bench(args) -> int:
    from diffugts.benchmarks.run import run_bench

    results = run_bench(args.preset or ("tiny" if args.quick else "demo"), args.out, args.quick,
                        say=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True), theta=args.theta)
    print((Path(args.out) / "results.md").read_text())
    print(f"results in {Path(args.out) / 'results.json'} ({results['seconds']:.0f} s)")
    return 0


def cmd_soak(args) -> int:
    from diffugts.benchmarks.soak import run_soak

    result = run_soak(args.out, args.preset, args.seconds, tuple(int(v) for v in _floats(args.levels)),
                      say=lambda msg: print(f"soak: {msg}", file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2))
    return 1 if result["errors"] else 0


def cmd_real_lesion(args) -> int:
    from diffugts.benchmarks.real_lesion import run_real_lesion

    result = run_real_lesion(_make_executor(args), Path(args.out), args.prompt, _options(args))
    print(json.dumps(result, indent=2))
    return 0


def cmd_inpainting_check(args) -> int:
    from diffugts.benchmarks.inpainting import inpainting_effect

    from .executors.torch_executor import TorchExecutor
    from .report import write_json
    from .train import UNSEEN, make_cases

    if args.n < 1:
        fail("--n must be at least 1")
        return 2
    executor = TorchExecutor.from_preset(args.preset, args.weights)
    cases = make_cases(executor.preset, args.n, args.seed, list(UNSEEN))
    result = inpainting_effect(executor, cases, args.seed)
    write_json(Path(args.out), result)
    for row in result["cases"]:
        print(f"{row['prompt']:18s} contrast {row['contrast_before']:+.4f} -> {row['contrast_after']:+.4f} "
              f"(in D(E(x)) {row['contrast_reconstructed']:+.4f})  "
              f"|x - x_h| lesion {row['residual_lesion']:.4f} ring {row['residual_ring']:.4f}")
    mean = result["mean"]
    print(f"mean: contrast removed {mean['contrast_removed']:.2f}, residual lesion / ring {mean['residual_ratio']:.2f}, "
          f"contrast kept by the VAE {mean['contrast_kept_by_vae']:.2f}")
    return 0


def cmd_corpus(args) -> int:
    from .corpus import build_corpus_cli

    return build_corpus_cli(args.out, args.sources, args.phantoms, args.seed, fail)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffugts", description="DiffuGTS zero-shot tumor segmentation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a synthetic lesion dataset in the MSD layout")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--categories", default=None, help="comma-separated lesion categories (default: all)")
    p.add_argument("--split", choices=("test", "training"), default="test")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 64, 48))
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--healthy-fraction", type=float, default=0.0)
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("corpus", help="write the training corpus of real anatomy (templates, head CT, phantoms)")
    p.add_argument("--out", required=True)
    p.add_argument("--sources", default=None, help="comma-separated (default: all installed)")
    p.add_argument("--phantoms", type=int, default=6, help="healthy phantoms")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_corpus)

    p = sub.add_parser("segment", help="segment volumes for an open-vocabulary target (a resumable batch)")
    p.add_argument("inputs", nargs="+", help="NIfTI / NRRD / MHA files, folders of them or of DICOM series, "
                   "globs, an MSD dataset.json, a CSV manifest (path,prompt,modality)")
    p.add_argument("--prompt", default=None, help="target, e.g. 'kidney tumor' (for inputs without their own)")
    p.add_argument("--out", required=True)
    p.add_argument("--modality", type=str.upper, choices=("CT", "MR"), default=None, help="default: guessed")
    p.add_argument("--format", choices=("nifti", "dicom-seg", "both"), default="nifti",
                   help="dicom-seg (DICOM series input only): <name>_seg.dcm; both: SEG and NIfTI")
    p.add_argument("--series-uid", default=None, help="DICOM folder with several series: the one to segment "
                   "(default: the largest)")
    p.add_argument("--anomaly-map-dicom", action="store_true",
                   help="with dicom-seg: also the anomaly map as a DICOM Parametric Map")
    p.add_argument("--channel", type=int, default=None,
                   help="4D images (the Decathlon's multi-sequence MR): the channel to segment (default: the first)")
    _executor_args(p)
    p.add_argument("--workers", type=int, default=1, help="volumes in flight")
    p.add_argument("--resume", action="store_true", help="skip volumes OUT/run.json shows finished and unchanged")
    p.add_argument("--retries", type=int, default=3, help="per volume, on UNAVAILABLE / DEADLINE_EXCEEDED")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds, per gRPC call")
    p.add_argument("--token-file", default=None, help="file holding the servers' diffugts token")
    p.add_argument("--tls-ca", default=None, help="PEM CA certificate: talk gRPC over TLS")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("listen", help="DICOM receiver: segment each CT/MR series pushed by C-STORE, return a SEG")
    p.add_argument("--ae-title", default="DIFFUGTS")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11112, help="0 takes a free port")
    p.add_argument("--prompt", default=None, help="default prompt when no --rule matches (none: skip the series)")
    p.add_argument("--rule", action="append", metavar="PATTERN=PROMPT",
                   help="series description (regex, case-insensitive) -> prompt; the first match wins")
    p.add_argument("--out", default=None, help="folder for the SEGs")
    p.add_argument("--send", default=None, metavar="AE@HOST:PORT", help="C-STORE each SEG to this destination")
    p.add_argument("--spool", default="listen_spool", help="received instances, one folder per series")
    p.add_argument("--idle-timeout", type=float, default=30.0,
                   help="seconds without a new instance after which a series counts as complete")
    p.add_argument("--format", choices=("dicom-seg", "both"), default="dicom-seg",
                   help="both: NIfTI mask and anomaly map beside the SEG in --out")
    _executor_args(p)
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("evaluate", help="Dice, NSD, AUROC, FPR95 on an MSD-layout dataset")
    p.add_argument("dataset")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--split", default="test", help="`training` for a Decathlon task as published (its test has no labels)")
    p.add_argument("--prompt", default=None, help="the target of every entry without its own 'prompt', e.g. 'liver tumor'")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--ablation", choices=("full", "aova+attention", "aova", "baseline", "all"), default="full",
                   help="where masks come from; `all` runs the four and writes the README's table")
    _executor_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="paired change of two evaluate runs, case by case, with a bootstrap 95% interval")
    p.add_argument("base", nargs="+", help="`diffugts evaluate` results JSON of the base (several: pooled)")
    p.add_argument("--new", nargs="+", default=None,
                   help="results of the change on the same cases; without it, each set's mean and interval")
    p.add_argument("--metric", choices=("dice", "nsd", "found", "false_positives", "auroc", "fpr95"), default="dice",
                   help="found: the share of lesions the mask touches; false_positives: its components that touch none")
    p.add_argument("--ablation", default="full", help="which ablation of an `--ablation all` file (default full)")
    p.add_argument("--resamples", type=int, default=5000, help="bootstrap resamples (default 5000)")
    p.add_argument("--out", default=None, help="also write the comparison as JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("calibrate", help="choose the inpainting theta, head threshold and smallest component on seen categories")
    p.add_argument("dataset", nargs="+",
                   help="MSD-layout sets of seen categories (diffugts phantom --categories / diffugts lesions --kinds)")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--preset", default="demo")
    p.add_argument("--weights", default=None)
    p.add_argument("--split", default="test", help="`training` for a Decathlon task as published")
    p.add_argument("--prompt", default=None, help="the target of every entry without its own 'prompt'")
    p.add_argument("--thetas", type=_floats, default=[0.03, 0.05, 0.08, 0.15, 0.25, 0.4])
    p.add_argument("--thresholds", type=_floats, default=[0.15, 0.25, 0.3, 0.5, 0.7, 0.9, 0.95])
    p.add_argument("--min-components", type=_floats, default=[0, 50, 100, 200, 400], dest="min_components",
                   help="smallest component kept, mm^3 (postprocessing only: no extra loop runs)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("export", help="export every stage to ONNX and write a Triton model repository")
    p.add_argument("--out", default="model_repository")
    p.add_argument("--preset", default="demo")
    p.add_argument("--weights", default=None)
    p.add_argument("--runtime", choices=("python-ort", "onnxruntime", "openvino", "tensorrt"), default="python-ort")
    p.add_argument("--stage-runtime", choices=("auto", "onnxruntime", "openvino"), default="auto",
                   help="python-ort: each stage's engine (auto: the fastest here that matches torch)")
    p.add_argument("--trt-accelerator", action="store_true",
                   help="onnxruntime runtime: add the TensorRT execution accelerator block (GPU)")
    p.add_argument("--no-dynamic-batching", action="store_true")
    p.add_argument("--rtol", type=float, default=1e-3, help="ONNX Runtime vs torch tolerance")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="start tritonserver on a model repository (building it if missing)")
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--preset", default="demo", help="preset to build the repository from when missing")
    p.add_argument("--weights", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=8001, help="0 takes a free port")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log", default=None, help="server log file (default: beside the repository)")
    p.add_argument("--token-file", default=None,
                   help="require this token (created 0600 with a random one if missing); needed off loopback")
    p.add_argument("--tls-cert", default=None, help="gRPC TLS: PEM certificate (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="gRPC TLS: PEM private key")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="train the demo preset: `backbone` (VAE + UNet), then `heads`")
    p.add_argument("phase", choices=("backbone", "heads", "snapshot"),
                   help="snapshot: weights from the checkpoints of an unfinished `heads` run")
    p.add_argument("--preset", default="demo")
    p.add_argument("--work", default="train_work", help="checkpoints (resumable) and outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--unet-steps", type=int, default=2500)
    p.add_argument("--vae-batch", type=int, default=2, help="backbone: VAE crops per step (a GPU takes 16 or more)")
    p.add_argument("--unet-batch", type=int, default=4, help="backbone: UNet latents per step")
    p.add_argument("--volumes", type=int, default=64, help="healthy training volumes")
    p.add_argument("--aova-steps", type=int, default=1000)
    p.add_argument("--head-steps", type=int, default=6000)
    p.add_argument("--head-dice", choices=("batch", "lesion"), default="batch",
                   help="the head's Dice term: over the whole batch, or per crop that holds a lesion")
    p.add_argument("--head-crop", type=int, default=None,
                   help="heads: side of the head's training crops in voxels (default 32, or the patch if "
                        "smaller; the head runs on whole patches)")
    p.add_argument("--head-sampling", choices=("uniform", "size"), default="uniform",
                   help="heads: cases drawn for the head's crops uniformly, or by 1/sqrt(lesion size) "
                        "(small lesions more often)")
    p.add_argument("--head-synth", choices=("parcels", "tissue"), default="parcels",
                   help="heads: labels of the SynthSeg contrasts in the anatomy cases: every atlas region "
                        "(parcels) or every tissue class")
    p.add_argument("--head-levels", type=int, default=None,
                   help="heads: the residual head's UNet levels; a depth other than the loaded head's starts "
                        "a fresh head (default: the depth the weights file holds)")
    p.add_argument("--cases", type=int, default=136, help="seen-category training cases")
    p.add_argument("--install", action="store_true", help="copy the result to diffugts/weights/")
    p.add_argument("--corpus", default=None, help="real-anatomy corpus (`diffugts corpus`): randomized, with lesions")
    p.add_argument("--dataset", default=None,
                   help="your MSD dataset: healthy images (backbone); images + labels + prompt (heads)")
    p.add_argument("--prompt", default=None,
                   help="heads: the target of --dataset entries without their own 'prompt' (a Decathlon task as published)")
    p.add_argument("--anatomy-volumes", type=int, default=96, help="randomized corpus patches / lesion cases")
    p.add_argument("--anatomy-modalities", choices=("corpus", "balanced"), default="corpus",
                   help="heads: lesion cases drawn from the corpus's volumes alike (its mix: one head CT, six "
                        "brains on MR), or a modality first and then one of its volumes")
    p.add_argument("--anatomy-kinds", default=None,
                   help="heads: comma-separated seen lesion kinds to draw into the corpus's anatomy (default: the "
                        "three brain kinds; 'meningioma' adds a bright homogeneous one; 'kidney tumor,liver tumor,"
                        "lung nodule' go into real body scans)")
    p.add_argument("--init", default=None, help="backbone: start from these weights when no checkpoint exists")
    p.add_argument("--save-volumes", default=None, metavar="FILE",
                   help="backbone: prepare the training volumes (phantoms, randomized anatomy, dataset), write "
                        "them to FILE (.npz) and stop: prepare on a CPU machine, train on a GPU one")
    p.add_argument("--from-volumes", default=None, metavar="FILE",
                   help="backbone: train on volumes written by --save-volumes instead of preparing them")
    p.add_argument("--backbone", default=None,
                   help="heads: weights to start from (default WORK/backbone.safetensors); a file that also "
                        "holds AOVA and head weights (e.g. the bundled one) fine-tunes them")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (mixed precision) on the device")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("join-heads", help="one weights file whose head averages the heads of several (an ensemble)")
    p.add_argument("weights", nargs="+", help="weights files that differ in their heads only")
    p.add_argument("--out", required=True, help="the joined weights file")
    p.add_argument("--preset", default="demo")
    p.add_argument("--mirrors", type=int, default=None,
                   help="mirrorings each member averages, 1-8 (default: the first file's; two members on 4 "
                        "cost what one head on 8 does)")
    p.set_defaults(func=cmd_join_heads)

    p = sub.add_parser("split-heads", help="each head member of an ensemble file as a file of its own (to train one)")
    p.add_argument("weights", help="a weights file whose head has several members (join-heads)")
    p.add_argument("--out", required=True, help="folder for member1.safetensors, member2.safetensors, ...")
    p.add_argument("--preset", default="demo")
    p.set_defaults(func=cmd_split_heads)

    p = sub.add_parser("paraphrases", help="fit the prompt projection so that paraphrases of the seen prompts "
                                           "read as the seen prompt (no images; seen prompts unchanged)")
    p.add_argument("weights", help="a weights file")
    p.add_argument("--out", required=True, help="the weights file with the fitted projection")
    p.add_argument("--preset", default="demo")
    p.add_argument("--l2", type=float, default=1e-4, help="penalty on the projection's change")
    p.add_argument("--steps", type=int, default=4000)
    p.set_defaults(func=cmd_paraphrases)

    p = sub.add_parser("lesions", help="real anatomy with synthesized lesions, as an MSD test set (evaluation)")
    p.add_argument("--corpus", required=True, help="a corpus written by `diffugts corpus`")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--kinds", default=None, help="comma-separated lesion kinds (default: the unseen ones)")
    p.add_argument("--lesions-per-case", type=int, default=1,
                   help="N > 1: each case holds 1 to N lesions of its kind, prompted in the plural ('liver metastases')")
    p.add_argument("--preset", default="demo")
    p.set_defaults(func=cmd_lesions)

    p = sub.add_parser("real-tumours", help="pyradiomics' real scans with expert tumour masks, as an MSD test set")
    p.add_argument("--out", required=True)
    p.add_argument("--sdist", default=None, help="pyradiomics-3.0.1.tar.gz (default: where `make data-sources` puts it)")
    p.set_defaults(func=cmd_real_tumours)

    p = sub.add_parser("bench", help="latency and throughput of every executor, side by side")
    p.add_argument("--quick", action="store_true", help="tiny preset, one repeat: checks the harness only")
    p.add_argument("--preset", default=None, help="default: demo (tiny with --quick)")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--theta", type=float, default=None,
                   help="inpainting threshold for every executor (default: the preset's)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("soak", help="1-16 concurrent clients against one local server: latency, errors, RSS")
    p.add_argument("--out", default="soak_out")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seconds", type=float, default=60.0, help="per concurrency level")
    p.add_argument("--levels", default="1,2,4,8,16", help="concurrent clients, comma-separated")
    p.set_defaults(func=cmd_soak)

    p = sub.add_parser("real-lesion", help="run on pydicom-data's real MR with a marked liver lesion")
    p.add_argument("--out", default="real_lesion_out")
    p.add_argument("--prompt", default="liver lesion")
    _executor_args(p)
    p.set_defaults(func=cmd_real_lesion)

    p = sub.add_parser("inpainting-check", help="does the inpainting heal a lesion? (mask = the true lesion)")
    p.add_argument("--preset", default="demo")
    p.add_argument("--weights", default=None)
    p.add_argument("--n", type=int, default=8, help="unseen-category phantoms")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--out", default="eval_out/inpainting.json")
    p.set_defaults(func=cmd_inpainting_check)

    p = sub.add_parser("demo", help="segment the bundled sample volume (the main job of `make demo`)")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--backend", choices=BACKENDS, default="triton")
    p.add_argument("--preset", default=None, help="preset to export when the repository is missing (demo)")
    p.add_argument("--repository", default="model_repository")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        fail(str(exc))
        return 1
    except RuntimeError as exc:  # server unreachable, export mismatch: one line, no traceback
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 1
    except KeyboardInterrupt:
        fail("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
