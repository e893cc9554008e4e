"""`diffugts evaluate`: per-case and per-prompt Dice, NSD (2 mm), the share of lesions the mask found
and its components that touch none (false positives), and AUROC and FPR95 of the anomaly map."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from .batch_inputs import manifest_modality
from .io import InputError, channel_index, read_volume
from .label_classes import lesion_mask, lesion_values
from .metrics import (auroc, dice, false_positives, fpr_at_95_tpr, lesions_found, nanmean, normalized_surface_dice,
                      share_found)
from .pipeline import LoopOptions, run_segmentation

METRICS = ("dice", "nsd", "found", "false_positives", "auroc", "fpr95")
# lesion volumes (ml) that `found_by_size` pools lesions by: small lesions are the usual misses
SIZE_BINS_ML = (1.0, 4.0, 15.0, 60.0)


def load_manifest(dataset_dir: Path, split: str = "test", prompt: str | None = None) -> list[dict]:
    """The `split` entries of an MSD `dataset.json`, each with its prompt (its own, else `prompt`:
    a Decathlon task as published has none) and the label values of its lesion (`label_classes`)."""
    manifest = dataset_dir / "dataset.json"
    if not manifest.is_file():
        raise InputError(manifest, "no dataset.json (expected the Medical Segmentation Decathlon layout)")
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(manifest, f"not valid JSON ({exc.msg}, line {exc.lineno})") from None
    entries = data.get(split)
    if not isinstance(entries, list) or not entries:
        raise InputError(manifest, f"no {split!r} entries")
    cases, modality = [], manifest_modality(data.get("modality"))  # a Decathlon task names its channels once
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise InputError(manifest, f"{split} entry {i} needs 'image' and 'label'")
        entry = {**entry, "prompt": entry.get("prompt") or prompt}
        if not entry["prompt"]:
            raise InputError(manifest, f"{split} entry {i} has no 'prompt' (--prompt gives one to every entry without)")
        try:  # which label values are the prompt's lesion (`label_classes`)
            values = lesion_values(data.get("labels"), entry["prompt"], entry.get("label_values"))
        except ValueError as exc:
            raise InputError(manifest, f"{split} entry {i}: {exc}") from None
        try:  # of a 4D image; None: the first
            channel_index(entry.get("channel"))
        except ValueError as exc:
            raise InputError(manifest, f"{split} entry {i}: {exc}") from None
        cases.append({**entry, "lesion_values": values, "modality": entry.get("modality") or modality})
    return cases


def case_metrics(seg, truth: np.ndarray, spacing) -> dict:
    lesions = lesions_found(seg.mask, truth, spacing)  # the truth's components, labelled once
    return {
        "dice": dice(seg.mask, truth),
        "nsd": normalized_surface_dice(seg.mask, truth, spacing, 2.0),
        "found": share_found(lesions),
        "false_positives": false_positives(seg.mask, truth),
        "auroc": auroc(seg.anomaly, truth),
        "fpr95": fpr_at_95_tpr(seg.anomaly, truth),
        "lesions": [[round(ml, 3), hit] for ml, hit in lesions],
    }


def summarize(cases: list[dict]) -> tuple[dict, dict]:
    mean = {m: nanmean(c[m] for c in cases) for m in METRICS + ("seconds",)}
    by_prompt = defaultdict(list)
    for c in cases:
        by_prompt[c["prompt"]].append(c)
    per_prompt = {p: {**{m: nanmean(c[m] for c in cs) for m in METRICS}, "cases": len(cs)}
                  for p, cs in sorted(by_prompt.items())}
    return mean, per_prompt


def evaluate_dataset(executor, dataset_dir: str | Path, split: str = "test", limit: int | None = None,
                     options: LoopOptions | None = None, on_case=None, segment=run_segmentation,
                     prompt: str | None = None) -> dict:
    dataset_dir = Path(dataset_dir)
    entries = load_manifest(dataset_dir, split, prompt)[:limit]
    cases, errors = [], []
    for entry in entries:
        image_path = (dataset_dir / entry["image"]).resolve()
        name = Path(entry["image"]).name
        try:
            volume = read_volume(image_path, channel=entry.get("channel"))
            label = read_volume((dataset_dir / entry["label"]).resolve())
            if label.array.shape != volume.array.shape:
                raise InputError(entry["label"], f"label shape {label.array.shape} != image {volume.array.shape}")
            start = time.perf_counter()
            seg = segment(executor, volume, entry["prompt"], entry.get("modality"), options)
            seconds = time.perf_counter() - start
            truth = lesion_mask(label.array, entry["lesion_values"])
            cases.append({"case": name, "prompt": entry["prompt"], **case_metrics(seg, truth, volume.spacing),
                          "seconds": seconds, "notices": list(seg.notices),
                          "label_values": "all" if entry["lesion_values"] is None else list(entry["lesion_values"]),
                          **({"channel": f"{volume.channel} of {volume.channels}"} if volume.channels > 1 else {})})
        except InputError as exc:
            errors.append(str(exc))
        if on_case:
            on_case(name)
    mean, per_prompt = summarize(cases)
    return {"dataset": dataset_dir.name, "split": split, "preset": executor.preset.name,
            "cases": cases, "mean": mean, "per_prompt": per_prompt, "found_by_size": found_by_size(cases),
            "errors": errors}


def _size_bin(ml: float) -> str:
    edges = (0.0,) + SIZE_BINS_ML
    for low, high in zip(edges, edges[1:]):
        if ml < high:
            return f"{low:g}-{high:g} ml"
    return f"{SIZE_BINS_ML[-1]:g} ml and over"


def found_by_size(cases: list[dict]) -> dict:
    """Every case's lesions pooled by volume: how many, and the share the masks touched."""
    bins = defaultdict(list)
    for case in cases:
        for ml, hit in case.get("lesions", []):
            bins[_size_bin(ml)].append(hit)
    order = [_size_bin(x) for x in (0.0,) + SIZE_BINS_ML]
    return {name: {"lesions": len(bins[name]), "found": float(np.mean(bins[name]))}
            for name in order if bins[name]}


def result_table(result: dict):
    """A rich table: every case, the per-prompt means, the overall mean."""
    from rich.table import Table

    table = Table(title=f"{result['dataset']} ({result.get('backend', '')}, preset {result['preset']}, "
                        f"{result.get('ablation', 'full')})")
    for col in ("case", "prompt") + METRICS + ("seconds",):
        table.add_column(col)
    for c in result["cases"]:
        table.add_row(c["case"], c["prompt"], *(f"{c[m]:.3f}" for m in METRICS + ("seconds",)))
    for prompt, row in result["per_prompt"].items():
        table.add_row("[bold]per prompt[/bold]", prompt, *(f"{row[m]:.3f}" for m in METRICS), "")
    table.add_row("[bold]mean[/bold]", "", *(f"{result['mean'][m]:.3f}" for m in METRICS + ("seconds",)))
    if result.get("found_by_size"):
        table.caption = "lesions found by size: " + ", ".join(
            f"{name} {row['found']:.2f} of {row['lesions']}" for name, row in result["found_by_size"].items())
    return table


def ablation_markdown(results: dict[str, dict]) -> str:
    """Per category Dice / NSD / AUROC of each ablation, and the means over cases (with the share
    of lesions found)."""
    prompts = sorted({p for r in results.values() for p in r["per_prompt"]})
    head = ("| ablation | " + " | ".join(f"{p} Dice / NSD / AUROC" for p in prompts)
            + " | mean Dice | mean NSD | lesions found | mean AUROC |")
    lines = [head, "|" + "---|" * (len(prompts) + 5)]
    for name, r in results.items():
        cells = [" / ".join(f"{r['per_prompt'][p][m]:.3f}" for m in ("dice", "nsd", "auroc")) if p in r["per_prompt"]
                 else "-" for p in prompts]
        mean = r["mean"]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {mean['dice']:.3f} | {mean['nsd']:.3f} | {mean['found']:.2f} | {mean['auroc']:.3f} |")
    return "\n".join(lines) + "\n"
