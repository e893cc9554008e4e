"""`diffugts compare`: is a change of weights or settings better, per case, than chance says?

Reads `diffugts evaluate` results. Cases are paired by (dataset, case, prompt) across the base and
the new runs, pooled over every file given; the change is the mean of the per-case differences
with a bootstrap 95% interval (resampling cases, so the pairing is kept). The project ships a
change only when that interval excludes zero. With no new runs, each file's mean and its interval.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap

from .io import InputError

MIN_CHANGE = 1e-3  # per case: smaller differences count as "same" (float noise of masks)
# a percentile bootstrap of a handful of cases is too narrow (it undercovers): no verdict below this
MIN_CASES_FOR_VERDICT = 10


def load_cases(path: str | Path, ablation: str = "full") -> dict[tuple[str, str, str], dict]:
    """The per-case rows of one `evaluate` result (a single ablation, or `ablation` of an `all` file)."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "no such results file") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(result, dict) and "ablations" in result:
        if ablation not in result["ablations"]:
            raise InputError(path, f"no ablation {ablation!r} (has {', '.join(result['ablations'])})")
        result = result["ablations"][ablation]
    if not isinstance(result, dict) or not isinstance(result.get("cases"), list):
        raise InputError(path, "not a `diffugts evaluate` result (no 'cases')")
    dataset = str(result.get("dataset", path.stem))
    return {(dataset, str(c["case"]), str(c["prompt"])): c for c in result["cases"]}


def pooled_cases(paths, ablation: str = "full") -> dict[tuple[str, str, str], dict]:
    cases = {}
    for path in paths:
        rows = load_cases(path, ablation)
        repeated = sorted(set(rows) & set(cases))
        if repeated:
            raise InputError(path, f"case {repeated[0][1]} of {repeated[0][0]} is already in an earlier file")
        cases.update(rows)
    return cases


def mean_interval(values, resamples: int = 5000, seed: int = 0) -> tuple[float, list[float] | None]:
    """The mean and its bootstrap 95% percentile interval (None with fewer than two finite values)."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if values.size == 0:
        return float("nan"), None
    if values.size < 2 or np.ptp(values) == 0:
        return float(values.mean()), None if values.size < 2 else [float(values[0])] * 2
    ci = bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=resamples, method="percentile",
                   rng=np.random.default_rng(seed)).confidence_interval
    return float(values.mean()), [float(ci.low), float(ci.high)]


# metrics where less is better: a rise is "worse"
LOWER_IS_BETTER = frozenset({"false_positives", "fpr95"})


def verdict(interval: list[float] | None, cases: int, lower_is_better: bool = False) -> str:
    if interval is None or cases < MIN_CASES_FOR_VERDICT:
        return f"too few cases (< {MIN_CASES_FOR_VERDICT})"
    if interval[0] > 0:
        return "worse" if lower_is_better else "better"
    if interval[1] < 0:
        return "better" if lower_is_better else "worse"
    return "not distinguishable from no change"


def paired_change(base: dict, new: dict, metric: str = "dice", resamples: int = 5000, seed: int = 0) -> dict:
    """The new runs against the base, case by case, pooled and per dataset and prompt."""
    missing = sorted(set(base) ^ set(new))
    if missing:
        side = "new" if missing[0] in base else "base"
        dataset, case, prompt = missing[0]
        raise InputError("--new" if side == "new" else "base", f"{len(missing)} case(s) are not in both runs: "
                         f"{dataset} {case} ({prompt!r}) is missing from the {side} run")
    keys = sorted(base)
    for key in keys:
        if metric not in base[key] or metric not in new[key]:
            raise InputError(key[1], f"no {metric!r} in the results of {key[0]}")

    def summary(group) -> dict:
        a = np.array([base[k][metric] for k in group], dtype=float)
        b = np.array([new[k][metric] for k in group], dtype=float)
        change, interval = mean_interval(b - a, resamples, seed)
        # a case without a value (`found` on a healthy case, AUROC without a lesion) is no evidence
        cases = int(np.isfinite(b - a).sum())
        return {"cases": cases, "base": float(np.nanmean(a)), "new": float(np.nanmean(b)), "change": change,
                "ci95": interval, "up": int((b - a > MIN_CHANGE).sum()), "down": int((a - b > MIN_CHANGE).sum()),
                "verdict": verdict(interval, cases, metric in LOWER_IS_BETTER)}

    groups = defaultdict(lambda: defaultdict(list))
    for key in keys:
        groups["dataset"][key[0]].append(key)
        groups["prompt"][key[2]].append(key)
    return {"metric": metric, "pooled": summary(keys),
            **{f"per_{kind}": {name: summary(g) for name, g in sorted(found.items())} for kind, found in groups.items()}}


def means(cases: dict, metric: str = "dice", resamples: int = 5000, seed: int = 0) -> dict:
    """Each dataset's mean and interval, and the pooled one (no comparison)."""
    by_dataset = defaultdict(list)
    for key, row in cases.items():
        by_dataset[key[0]].append(row.get(metric))

    def summary(values) -> dict:
        mean, interval = mean_interval(values, resamples, seed)
        finite = sum(v is not None and bool(np.isfinite(v)) for v in values)  # as in paired_change
        return {"cases": finite, "mean": mean, "ci95": interval}

    return {"metric": metric, "pooled": summary([r.get(metric) for r in cases.values()]),
            "per_dataset": {name: summary(v) for name, v in sorted(by_dataset.items())}}


def comparison_table(report: dict):
    """A rich table of `paired_change` (or `means`) output."""
    from rich.table import Table

    paired = "base" in report["pooled"]
    table = Table(title=f"{report['metric']}: " + ("new against base, paired by case" if paired else "mean per set"))
    for col in (("group", "cases", "base", "new", "change", "95% interval", "up / down", "verdict") if paired
                else ("group", "cases", "mean", "95% interval")):
        table.add_column(col)

    def interval(row) -> str:
        return "-" if row["ci95"] is None else f"[{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}]"

    def add(name: str, row: dict, bold: bool = False) -> None:
        name = f"[bold]{name}[/bold]" if bold else name
        if paired:
            table.add_row(name, str(row["cases"]), f"{row['base']:.4f}", f"{row['new']:.4f}", f"{row['change']:+.4f}",
                          interval(row), f"{row['up']} / {row['down']}", row["verdict"])
        else:
            table.add_row(name, str(row["cases"]), f"{row['mean']:.4f}", interval(row))

    add("pooled", report["pooled"], bold=True)
    for kind in ("dataset", "prompt"):
        for name, row in report.get(f"per_{kind}", {}).items():
            add(f"{kind} {name}", row)
    return table


def compare_command(args) -> int:
    """`diffugts compare BASE... [--new NEW...]`: print the table, write `--out` if asked."""
    from rich.console import Console

    from .report import write_json

    if args.resamples < 100:
        raise InputError("--resamples", f"{args.resamples} is too few for a 95% interval (at least 100)")
    base = pooled_cases(args.base, args.ablation)
    if args.new:
        report = paired_change(base, pooled_cases(args.new, args.ablation), args.metric, args.resamples)
    else:
        report = means(base, args.metric, args.resamples)
    console = Console(highlight=False)
    if not console.is_terminal:  # a pipe or log: wide enough that no interval wraps
        console = Console(highlight=False, width=140)
    console.print(comparison_table(report))
    if args.out:
        write_json(Path(args.out), {"base": [str(p) for p in args.base], "new": [str(p) for p in args.new or []],
                                    "ablation": args.ablation, **report})
    return 0
