"""int8 (NNCF on OpenVINO): calibration inputs recorded from the loop, a quantized stage that
stays close to fp32, and shipping that switches only the named stages' configs."""

import json
import shutil

import numpy as np
import pytest

from diffugts.client.runtimes import INT8_MODEL, open_session
from diffugts.client.transports import LocalTransport
from diffugts.export.quantize import QUANTIZED_STAGES, calibration_samples, quantize_stage, ship
from diffugts.export.repository import parse_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tiny_repository, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "repo"
    shutil.copytree(tiny_repository, out)
    return out


@pytest.fixture(scope="module")
def samples(repo, phantom_dir):
    from diffugts.benchmarks.harness import load_cases

    return calibration_samples(repo, load_cases(phantom_dir, 1))


def test_calibration_records_what_the_loop_feeds_each_stage(samples):
    assert set(samples) == set(QUANTIZED_STAGES)
    assert all(samples[s] for s in QUANTIZED_STAGES)
    assert set(samples["unet"][0]) == {"latent", "timestep"}
    # the loop sends cropped boxes too: the decoder sees (box before, box after) as a batch of 2
    assert all(s["latent"].shape[0] == 2 for s in samples["vae_decoder"])


def test_int8_unet_is_close_to_fp32_and_ships_alone(repo, samples):
    path = quantize_stage(repo, "unet", samples["unet"])
    assert path.name == INT8_MODEL and path.with_suffix(".bin").is_file()
    inputs = samples["unet"][-1]  # a call of the loop (in distribution)
    fp32 = open_session(repo / "unet" / "1", "openvino").run(["prediction"], inputs)[0]
    int8 = open_session(repo / "unet" / "1", "openvino", precision="int8").run(["prediction"], inputs)[0]
    assert not np.array_equal(fp32, int8)  # it really is another model
    # random tiny weights quantize coarsely (~20% relative error); the Dice gate decides shipping
    assert np.linalg.norm(int8 - fp32) / np.linalg.norm(fp32) < 0.4
    assert np.corrcoef(int8.ravel(), fp32.ravel())[0, 1] > 0.9
    ship(repo, ["unet"])
    config = parse_config(repo / "unet" / "config.pbtxt")
    assert config.parameters["runtime"].string_value == "openvino"
    assert config.parameters["precision"].string_value == "int8"
    assert "precision" not in parse_config(repo / "vae_decoder" / "config.pbtxt").parameters
    assert json.loads((repo / "export_report.json").read_text())["int8_stages"] == ["unet"]
    transport = LocalTransport(repo, engine=None)
    assert transport.stage_engine("unet") == ("openvino", "int8")
    out = transport.infer("unet", inputs, ["prediction"])["prediction"]
    np.testing.assert_allclose(out, int8, rtol=1e-5, atol=1e-6)


def test_missing_int8_model_is_a_clear_error(tiny_repository):
    with pytest.raises(FileNotFoundError, match="was not quantized"):
        open_session(tiny_repository / "vae_decoder" / "1", "openvino", precision="int8")
