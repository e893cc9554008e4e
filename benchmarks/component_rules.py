"""What the component rules cost and save: `evaluate`'s Dice, lesions found and false-positive
components a case, on MSD test sets, with the shipped preset, with a plural keeping every component
(`several_near_best` 0, the rule before it), and with `--all-components` (no rule at all). One
process, the same networks: only the rule differs. Quality, not speed.

`python -m diffugts.benchmarks.component_rules SET [SET ...] [--out FILE]`"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

METRICS = ("dice", "found", "false_positives")


def component_rules(sets, preset: str = "demo") -> dict:
    from diffugts.evaluate import evaluate_dataset
    from diffugts.executors import make_executor
    from diffugts.executors.base import preset_changes
    from diffugts.pipeline import LoopOptions

    executor = make_executor("torch", preset, None, None, None, False)
    rules = {"plurals keep all": ({"several_near_best": 0.0}, LoopOptions()), "shipped": ({}, LoopOptions()),
             "--all-components": ({}, LoopOptions(all_components=True))}
    runs = {}
    for dataset in sets:
        for name, (changes, options) in rules.items():
            with preset_changes(executor, **changes):
                cases = evaluate_dataset(executor, dataset, options=options)["cases"]
            row = runs[f"{Path(dataset).name} | {name}"] = {m: float(np.nanmean([c[m] for c in cases])) for m in METRICS}
            print(Path(dataset).name, name, {m: round(v, 3) for m, v in row.items()}, flush=True)
    return {"preset": preset, "metrics": "means over cases: " + ", ".join(METRICS), "runs": runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+", help="MSD test sets (diffugts lesions / phantom)")
    parser.add_argument("--out", default=None, help="write the figures here (JSON)")
    parser.add_argument("--preset", default="demo")
    args = parser.parse_args(argv)
    report = component_rules(args.sets, args.preset)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
