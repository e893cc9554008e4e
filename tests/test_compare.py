"""`diffugts compare`: paired per-case change of two evaluate runs with a bootstrap interval."""

import json

import numpy as np
import pytest

from diffugts.cli import main
from diffugts.compare import mean_interval, means, paired_change, pooled_cases
from diffugts.io import InputError


def _result(dataset, dice, prompts=("glioma", "brain cyst")):
    cases = [{"case": f"case_{i:03d}.nii.gz", "prompt": prompts[i % len(prompts)], "dice": float(d), "nsd": 0.0,
              "auroc": 0.9, "fpr95": 0.1, "seconds": 1.0} for i, d in enumerate(dice)]
    return {"dataset": dataset, "split": "test", "preset": "demo", "cases": cases, "mean": {}, "per_prompt": {},
            "errors": []}


def _write(path, result):
    path.write_text(json.dumps(result))
    return str(path)


def test_interval_matches_a_percentile_bootstrap_by_hand():
    values = np.random.default_rng(3).normal(0.02, 0.1, size=40)
    mean, (low, high) = mean_interval(values, resamples=20000)
    rng = np.random.default_rng(11)
    by_hand = values[rng.integers(len(values), size=(20000, len(values)))].mean(1)
    assert mean == pytest.approx(values.mean())
    assert low == pytest.approx(np.percentile(by_hand, 2.5), abs=0.004)
    assert high == pytest.approx(np.percentile(by_hand, 97.5), abs=0.004)
    assert mean_interval([0.5]) == (0.5, None)  # one case: no interval
    assert mean_interval([0.3, 0.3, 0.3]) == (pytest.approx(0.3), [0.3, 0.3])


def test_paired_change_pairs_cases_across_files_and_judges_the_interval(tmp_path):
    rng = np.random.default_rng(0)
    base_a, base_b = rng.uniform(0.2, 0.8, 20), rng.uniform(0.2, 0.8, 12)
    base = pooled_cases([_write(tmp_path / "a.json", _result("seen77", base_a)),
                         _write(tmp_path / "b.json", {"ablations": {"full": _result("seen78", base_b)}})])
    # every case up by 0.05 +- 0.01: clearly better; a per-case shuffle of the base: no change on average
    better = {k: {**row, "dice": row["dice"] + 0.05 + rng.uniform(-0.01, 0.01)} for k, row in base.items()}
    report = paired_change(base, better)
    pooled = report["pooled"]
    assert pooled["cases"] == 32 and pooled["up"] == 32 and pooled["down"] == 0
    assert pooled["base"] == pytest.approx(np.concatenate([base_a, base_b]).mean())
    assert pooled["change"] == pytest.approx(np.mean([better[k]["dice"] - base[k]["dice"] for k in base]))
    assert 0.04 < pooled["ci95"][0] < pooled["change"] < pooled["ci95"][1] < 0.06
    assert pooled["verdict"] == "better"
    assert set(report["per_dataset"]) == {"seen77", "seen78"} and report["per_dataset"]["seen78"]["cases"] == 12
    assert set(report["per_prompt"]) == {"glioma", "brain cyst"}
    few = paired_change({k: base[k] for k in sorted(base)[:9]}, {k: better[k] for k in sorted(base)[:9]})["pooled"]
    assert few["ci95"][0] > 0 and few["verdict"] == "too few cases (< 10)"

    keys = sorted(base)
    swapped = dict(zip(keys, [base[keys[i]] for i in rng.permutation(len(keys))]))
    mixed = paired_change(base, {k: {**base[k], "dice": swapped[k]["dice"]} for k in keys})["pooled"]
    assert mixed["ci95"][0] < 0 < mixed["ci95"][1] and mixed["verdict"] == "not distinguishable from no change"
    worse = paired_change(better, base)["pooled"]
    assert worse["verdict"] == "worse" and worse["down"] == 32


def test_cases_without_a_value_are_not_counted_toward_a_verdict(tmp_path):
    """`found` is NaN on a healthy case: 12 cases of which 4 healthy are 8 cases of evidence."""
    base = pooled_cases([_write(tmp_path / "a.json", _result("seen77", np.full(12, 0.5)))])
    keys = sorted(base)
    found = {k: {**row, "found": float("nan") if i < 4 else 0.0} for i, (k, row) in enumerate(base.items())}
    more = {k: {**row, "found": float("nan") if i < 4 else 1.0} for i, (k, row) in enumerate(base.items())}
    pooled = paired_change(found, more, metric="found")["pooled"]
    assert pooled["cases"] == 8 and pooled["up"] == 8 and pooled["change"] == 1.0
    assert pooled["verdict"] == "too few cases (< 10)" and len(keys) == 12
    assert means(found, "found")["pooled"]["cases"] == 8  # the run alone counts the same way


def test_more_false_positives_is_worse_and_fewer_is_better(tmp_path):
    base = pooled_cases([_write(tmp_path / "a.json", _result("body", np.full(12, 0.5)))])
    none = {k: {**row, "false_positives": 0.0} for k, row in base.items()}
    three = {k: {**row, "false_positives": 3.0 + i % 2} for i, (k, row) in enumerate(base.items())}
    assert paired_change(none, three, metric="false_positives")["pooled"]["verdict"] == "worse"
    assert paired_change(three, none, metric="false_positives")["pooled"]["verdict"] == "better"
    assert paired_change(three, none, metric="fpr95")["pooled"]["verdict"] == "not distinguishable from no change"


def test_unpaired_or_foreign_results_are_refused(tmp_path):
    base = pooled_cases([_write(tmp_path / "a.json", _result("seen77", [0.5, 0.6, 0.7]))])
    fewer = pooled_cases([_write(tmp_path / "b.json", _result("seen77", [0.5, 0.6]))])
    with pytest.raises(InputError, match=r"1 case\(s\) are not in both runs: seen77 case_002.nii.gz"):
        paired_change(base, fewer)
    with pytest.raises(InputError, match="already in an earlier file"):
        pooled_cases([tmp_path / "a.json", tmp_path / "a.json"])
    with pytest.raises(InputError, match=r"no ablation 'full' \(has aova\)"):
        pooled_cases([_write(tmp_path / "c.json", {"ablations": {"aova": _result("x", [0.1])}})])
    with pytest.raises(InputError, match="not a `diffugts evaluate` result"):
        pooled_cases([_write(tmp_path / "d.json", {"theta": 0.25})])


def test_cli_writes_the_comparison_or_one_line_error_and_nothing(tmp_path, capsys):
    base = _write(tmp_path / "base.json", _result("seen77", np.linspace(0.2, 0.8, 12)))
    new = _write(tmp_path / "new.json", _result("seen77", np.linspace(0.2, 0.8, 12) + 0.1))
    out = tmp_path / "cmp.json"
    assert main(["compare", base, "--new", new, "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["pooled"]["change"] == pytest.approx(0.1) and written["pooled"]["verdict"] == "better"
    assert "better" in capsys.readouterr().out

    short = _write(tmp_path / "short.json", _result("seen77", [0.3]))
    refused = tmp_path / "refused.json"
    assert main(["compare", base, "--new", short, "--out", str(refused)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffugts: error: --new: 11 case(s) are not in both runs") and "\n" not in err
    assert not refused.exists()
    assert main(["compare", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such results file" in capsys.readouterr().err

    assert main(["compare", base]) == 0  # one run: its mean and interval
    assert "0.5000" in capsys.readouterr().out


def test_compare_offers_every_metric_evaluate_records():
    """The CLI lists the metrics literally (evaluate is not imported to build the parser): the two
    must not drift apart."""
    from diffugts.cli import build_parser
    from diffugts.compare import LOWER_IS_BETTER
    from diffugts.evaluate import METRICS

    compare = build_parser()._subparsers._group_actions[0].choices["compare"]
    (metric,) = [a for a in compare._actions if a.dest == "metric"]
    assert tuple(metric.choices) == METRICS and LOWER_IS_BETTER <= set(METRICS)
