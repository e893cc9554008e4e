"""Served == eager: the exported repository served by Triton against torch eager, mask Dice per
case on MSD test sets (default: `make eval`'s real-anatomy and phantom sets). Correctness, not
speed: it may run beside other work.

`python -m diffugts.benchmarks.served_vs_eager [SET ...] [--out FILE]`"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_SETS = ("eval_data/anatomy_unseen", "eval_data/unseen")


def served_vs_eager(sets, preset: str = "demo") -> dict:
    from diffugts.client.triton_executor import TritonExecutor
    from diffugts.evaluate import load_manifest
    from diffugts.executors.torch_executor import TorchExecutor
    from diffugts.export import build_repository
    from diffugts.io import read_volume
    from diffugts.metrics import dice
    from diffugts.pipeline import run_segmentation
    from diffugts.serve import TritonServer

    rows = []
    with tempfile.TemporaryDirectory() as work:
        repo = build_repository(Path(work) / "repo", preset)
        eager = TorchExecutor.from_preset(preset)
        with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_path=Path(work) / "server.log") as server:
            served = TritonExecutor(server.grpc_url)
            for root in map(Path, sets):
                for entry in load_manifest(root):
                    volume = read_volume(root / entry["image"])
                    a = run_segmentation(eager, volume, entry["prompt"], entry["modality"]).mask
                    b = run_segmentation(served, volume, entry["prompt"], entry["modality"]).mask
                    rows.append({"set": root.name, "case": entry["image"], "dice": dice(a, b),
                                 "voxels_eager": int(a.sum()), "voxels_served": int(b.sum())})
            served.close()
    scores = [r["dice"] for r in rows]
    return {"preset": preset, "cases": len(rows), "mean_dice": float(np.mean(scores)),
            "min_dice": float(np.min(scores)), "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="*", default=list(DEFAULT_SETS))
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--out", default="eval_out/served_vs_eager.json")
    args = parser.parse_args(argv)
    result = served_vs_eager(args.sets, args.preset)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{result['cases']} cases: mask Dice served vs eager mean {result['mean_dice']:.4f}, min {result['min_dice']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
