"""Wiring of the bench's size sections on the tiny preset (the maisi run itself is a bench
section: minutes on a CPU): export, serve, one volume, per-stage seconds and peak memory; the
window counts of the cost curve."""

import pytest

from diffugts.benchmarks.sizes import cost_curve, run_maisi, shape_for_windows, window_count
from diffugts.config import get_preset
from diffugts.stages import ONNX_STAGES


@pytest.mark.parametrize("name", ["tiny", "demo", "maisi"])
def test_cost_curve_shapes_take_1_8_27_windows(name):
    preset = get_preset(name)
    assert [window_count(preset, shape_for_windows(preset, k)) for k in (1, 2, 3)] == [1, 8, 27]


def test_cost_curve_runs_the_loop(torch_executor):
    rows = cost_curve(torch_executor, torch_executor.preset, (1, 2))
    assert [r["windows"] for r in rows] == [1, 8]
    assert all(r["seconds"] > 0 for r in rows)


@pytest.mark.slow
def test_maisi_section_wiring_on_the_tiny_preset(tmp_path):
    result = run_maisi(tmp_path, "tiny", shape=(32, 32, 24), say=lambda _: None)
    assert result["windows"] == 1 and result["shape"] == [32, 32, 24]
    assert {"encode", "attention", "score", "total"} <= set(result["seconds"])
    # every stage model's own process was found and measured
    assert set(result["peak_rss_mb"]["stage_models"]) == set(ONNX_STAGES)
    assert all(v > 10 for v in result["peak_rss_mb"]["stage_models"].values())
    assert set(result["stage_runtime"]) == set(ONNX_STAGES)
