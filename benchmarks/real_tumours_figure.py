"""One picture of the real tumours: per case, the axial slice with most tumour, the expert mask
(green outline) and ours (red), radiological view, with the case's Dice and AUROC from an
`evaluate` result. Reads what `make eval` wrote; runs nothing.

`python -m diffugts.benchmarks.real_tumours_figure [--dataset D] [--masks M] [--results R] [--out PNG]`"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def real_tumours_figure(dataset: Path, masks: Path, results: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from diffugts.evaluate import load_manifest
    from diffugts.io import read_volume
    from diffugts.report import display_window, outline, radiological

    result = json.loads(results.read_text())
    cases = {c["case"]: c for c in result.get("ablations", {"full": result})["full"]["cases"]}
    entries = load_manifest(dataset)
    fig, axes = plt.subplots(1, len(entries), figsize=(4 * len(entries), 4.4), squeeze=False)
    for ax, entry in zip(axes[0], entries):
        name = Path(entry["image"]).name
        stem = name.removesuffix(".nii.gz")
        image = read_volume(dataset / entry["image"])
        truth, mask = (read_volume(p).array > 0 for p in (dataset / entry["label"], masks / f"{stem}_mask.nii.gz"))
        image_r, truth_r, mask_r = radiological(image.affine, image.array, truth.astype(np.uint8), mask.astype(np.uint8))
        z = int(np.argmax(truth_r.reshape(-1, truth_r.shape[-1]).sum(0)))
        # CT: lung and mediastinum at once
        lo, hi = (-1000.0, 400.0) if entry.get("modality") == "CT" else display_window(image_r, entry.get("modality"))
        ax.imshow(image_r[..., z].T, cmap="gray", vmin=lo, vmax=hi, origin="upper")
        ax.imshow(np.ma.masked_where(mask_r[..., z].T == 0, mask_r[..., z].T), cmap="autumn", alpha=0.6, origin="upper")
        outline(ax, truth_r[..., z].T)
        case = cases.get(name, {})
        ax.set_title(f"{stem}: '{entry['prompt']}' ({entry.get('modality', '')})\n"
                     f"Dice {case.get('dice', float('nan')):.2f}, AUROC {case.get('auroc', float('nan')):.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("pyradiomics' real tumours: expert mask (green outline), our mask (red), "
                 "the slice with most tumour; radiological view", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=70)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="eval_data/real_tumours")
    parser.add_argument("--masks", default="eval_out/real_tumours", help="`diffugts segment`'s output folder")
    parser.add_argument("--results", default="eval_out/real_tumours.json", help="`diffugts evaluate`'s result")
    parser.add_argument("--out", default="eval_out/real_tumours_overlay.png")
    args = parser.parse_args(argv)
    print(real_tumours_figure(Path(args.dataset), Path(args.masks), Path(args.results), Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
