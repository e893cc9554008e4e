"""The `diffugts` command line: phantom, segment, evaluate (export, serve, bench, train join later)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .io import InputError

BACKENDS = ("torch", "onnx", "triton", "triton-bls")


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
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address for triton backends")
    p.add_argument("--repository", default=None, help="exported repository for the onnx backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-crop", action="store_true", help="inpaint the whole latent, not its bounding box")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the preset's)")
    p.add_argument("--shared-memory", action="store_true",
                   help="triton: pass tensors through system shared memory (client and server on one host)")


def _make_executor(args):
    from .executors import make_executor

    preset = args.preset or "demo"
    return make_executor(args.backend, preset, args.weights, args.url, args.repository, args.shared_memory)


def _options(args):
    from .pipeline import LoopOptions

    return LoopOptions(crop=not args.no_crop, seed=args.seed, steps=args.steps)


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
    from rich.progress import Progress

    from .io import read_volume, stem_of, write_nifti_atomic
    from .pipeline import run_segmentation
    from .prompts import normalize_target
    from .report import write_json, write_overlay

    try:
        normalize_target(args.prompt)
    except ValueError as exc:
        fail(str(exc))
        return 2
    executor = _make_executor(args)
    out = Path(args.out)
    failures = 0
    with Progress(console=_console(True), transient=False) as progress:
        volumes = progress.add_task("volumes", total=len(args.inputs))
        for path in args.inputs:
            stage = progress.add_task(f"  {Path(path).name}", total=None)
            try:
                volume = read_volume(path)
                seg = run_segmentation(executor, volume, args.prompt, args.modality, _options(args),
                                     on_stage=lambda _: progress.advance(stage))
                stem = stem_of(path)
                write_nifti_atomic({out / f"{stem}_mask.nii.gz": seg.mask,
                                    out / f"{stem}_anomaly.nii.gz": seg.anomaly.astype("float32")}, volume.affine)
                write_overlay(out / f"{stem}_overlay.png", volume.array, seg.mask, seg.anomaly,
                              title=f"{stem}: {args.prompt} ({seg.modality})", modality=seg.modality)
                write_json(out / f"{stem}_timings.json", {"backend": args.backend, "preset": executor.preset.name,
                                                          "seconds": seg.timings,
                                                          "mask_voxels": int(seg.mask.sum())})
                progress.console.print(f"{path}: {int(seg.mask.sum())} mask voxels -> {out / (stem + '_mask.nii.gz')}")
            except InputError as exc:
                failures += 1
                progress.console.print(f"[red]diffugts: error: {exc}[/red]")
            progress.remove_task(stage)
            progress.advance(volumes)
    return 1 if failures else 0


def cmd_evaluate(args) -> int:
    from rich.progress import Progress

    from .evaluate import ablation_markdown, evaluate_dataset, load_manifest, result_table
    from .pipeline import ABLATIONS, LoopOptions
    from .report import write_json

    total = len(load_manifest(Path(args.dataset), args.split)[: args.limit])
    ablations = ABLATIONS if args.ablation == "all" else (args.ablation,)
    executor = _make_executor(args)
    results = {}
    with Progress(console=_console(True)) as progress:
        for ablation in ablations:
            task = progress.add_task(f"cases ({ablation})", total=total)
            options = LoopOptions(crop=not args.no_crop, seed=args.seed, steps=args.steps, ablation=ablation)
            results[ablation] = evaluate_dataset(executor, args.dataset, args.split, args.limit, options,
                                                 on_case=lambda _, t=task: progress.advance(t))
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
                                   not args.no_dynamic_batching, args.rtol, step, args.trt_accelerator)
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
                          security)
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

    total = len(load_manifest(Path(args.dataset))) * len(args.thetas)
    executor = TorchExecutor.from_preset(args.preset, args.weights)
    with Progress(console=_console(True)) as progress:
        task = progress.add_task("calibration runs", total=total)
        result = calibrate(executor, args.dataset, args.thetas, args.thresholds, lambda: progress.advance(task))
    write_json(Path(args.out), result)
    for theta, row in result["dice"].items():
        print(f"theta {theta:g}: " + "  ".join(f"{t:g} -> {d:.3f}" for t, d in row.items()))
    best = result["best"]
    print(f"best: anomaly_threshold={best['anomaly_threshold']:g} mask_threshold={best['mask_threshold']:g} "
          f"(mean Dice {best['dice']:.3f} over {result['cases']} cases)")
    return 0


def cmd_train(args) -> int:
    from . import train

    work = Path(args.work)
    if args.phase == "backbone":
        report = train.train_backbone(args.preset, work, args.seed, args.vae_steps, args.unet_steps, args.volumes)
    else:
        report = train.train_heads(args.preset, work, args.seed, args.aova_steps, args.head_steps, args.cases)
        if args.install:
            print(f"installed {train.install_weights(work)}")
    print(json.dumps(report, indent=2))
    return 0


def cmd_bench(args) -> int:
    from diffugts.benchmarks.run import run_bench

    results = run_bench(args.preset or ("tiny" if args.quick else "demo"), args.out, args.quick,
                        say=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True), theta=args.theta)
    print((Path(args.out) / "results.md").read_text())
    print(f"results in {Path(args.out) / 'results.json'} ({results['seconds']:.0f} s)")
    return 0


def cmd_real_lesion(args) -> int:
    from diffugts.benchmarks.real_lesion import run_real_lesion

    result = run_real_lesion(_make_executor(args), Path(args.out), args.prompt)
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

    p = sub.add_parser("segment", help="segment volumes for an open-vocabulary target")
    p.add_argument("inputs", nargs="+", help="NIfTI / NRRD / MHA files or DICOM series folders")
    p.add_argument("--prompt", required=True, help="target, e.g. 'kidney tumor'")
    p.add_argument("--out", required=True)
    p.add_argument("--modality", type=str.upper, choices=("CT", "MR"), default=None, help="default: guessed")
    _executor_args(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("evaluate", help="Dice, NSD, AUROC, FPR95 on an MSD-layout dataset")
    p.add_argument("dataset")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--ablation", choices=("full", "aova+attention", "aova", "baseline", "all"), default="full",
                   help="where masks come from; `all` runs the four and writes the README's table")
    _executor_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="choose the inpainting theta and head threshold on seen categories")
    p.add_argument("dataset", help="MSD-layout phantoms of seen categories (diffugts phantom --categories ...)")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--preset", default="demo")
    p.add_argument("--weights", default=None)
    p.add_argument("--thetas", type=_floats, default=[0.03, 0.05, 0.08, 0.15])
    p.add_argument("--thresholds", type=_floats, default=[0.3, 0.5, 0.7, 0.8, 0.9, 0.95])
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("export", help="export every stage to ONNX and write a Triton model repository")
    p.add_argument("--out", default="model_repository")
    p.add_argument("--preset", default="demo")
    p.add_argument("--weights", default=None)
    p.add_argument("--runtime", choices=("python-ort", "onnxruntime", "tensorrt"), default="python-ort")
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
    p.add_argument("phase", choices=("backbone", "heads"))
    p.add_argument("--preset", default="demo")
    p.add_argument("--work", default="train_work", help="checkpoints (resumable) and outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--unet-steps", type=int, default=2500)
    p.add_argument("--volumes", type=int, default=64, help="healthy training volumes")
    p.add_argument("--aova-steps", type=int, default=1000)
    p.add_argument("--head-steps", type=int, default=6000)
    p.add_argument("--cases", type=int, default=136, help="seen-category training cases")
    p.add_argument("--install", action="store_true", help="copy the result to diffugts/weights/")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="latency and throughput of every executor, side by side")
    p.add_argument("--quick", action="store_true", help="tiny preset, one repeat: checks the harness only")
    p.add_argument("--preset", default=None, help="default: demo (tiny with --quick)")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--theta", type=float, default=None,
                   help="inpainting threshold for every executor (default: the preset's)")
    p.set_defaults(func=cmd_bench)

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
