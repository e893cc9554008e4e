"""OpenVINO as a runtime of every exported stage: parity with torch at export, the in-process
executor, the engine choice recorded in the repository, configs parsed by Triton's protobuf,
and the real Triton serving the stages in OpenVINO (masks agree with torch)."""

import json

import numpy as np
import pytest

from diffugts.client.runtimes import _shape_key, open_session
from diffugts.config import get_preset
from diffugts.export.onnx_export import example_inputs, export_onnx
from diffugts.export.repository import parse_config, stage_config, write_repository
from diffugts.export.runtime_choice import choose_engines
from diffugts.metrics import dice
from diffugts.pipeline import segment_volume
from diffugts.stages import ONNX_STAGES, stage_specs

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def openvino_repository(tmp_path_factory, tiny_models):
    """The tiny preset with every stage forced onto OpenVINO (same weights as `torch_executor`)."""
    out = tmp_path_factory.mktemp("ov") / "repo"
    checked = export_onnx(tiny_models, out, engines=("onnxruntime", "openvino"))
    engines, choice = choose_engines(out, tiny_models.preset, checked, force="openvino")
    return write_repository(out, tiny_models.preset, "python-ort", out, engines=engines, choice_report=choice,
                            parity={s: c["onnxruntime"] for s, c in checked.items()}), checked


def test_every_stage_matches_torch_in_openvino_on_two_shapes(openvino_repository):
    _, checked = openvino_repository
    for stage in ONNX_STAGES:
        errors = checked[stage]["openvino"]
        assert isinstance(errors, dict), errors  # not rejected
        assert set(errors) == {t.name for t in stage_specs(TINY)[stage].outputs}
        assert max(errors.values()) < 1e-3


def test_openvino_session_agrees_with_onnx_runtime_on_a_cropped_latent(openvino_repository):
    repo, _ = openvino_repository
    inputs = example_inputs(TINY, "unet", batch=2, crop=TINY.unet_multiple, seed=3)
    names = ["prediction", "attention"]
    ov = open_session(repo / "unet" / "1", "openvino").run(names, inputs)
    ort = open_session(repo / "unet" / "1", "onnxruntime").run(names, inputs)
    for a, b in zip(ov, ort):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_forced_engine_is_written_to_configs_and_report(openvino_repository):
    repo, _ = openvino_repository
    report = json.loads((repo / "export_report.json").read_text())
    for stage in ONNX_STAGES:
        config = parse_config(repo / stage / "config.pbtxt")
        assert config.backend == "python"
        assert config.parameters["runtime"].string_value == "openvino"
        assert report["stage_runtime"][stage]["engine"] == "openvino"
        assert report["stage_runtime"][stage]["forced"] is True


def test_auto_choice_takes_the_faster_qualified_engine(openvino_repository):
    repo, checked = openvino_repository
    engines, report = choose_engines(repo, TINY, checked, force="auto", repeats=1)
    for stage in ONNX_STAGES:
        seconds = report[stage]["median_s"]
        assert set(seconds) == {"onnxruntime", "openvino"}
        assert engines[stage] == min(seconds, key=seconds.get)
    # an engine whose parity failed never serves the stage, measured or forced
    rejected = {s: dict(c, openvino="rejected: unet: output prediction differs") for s, c in checked.items()}
    engines, report = choose_engines(repo, TINY, rejected, force="auto", repeats=1)
    assert set(engines.values()) == {"onnxruntime"}
    from diffugts.export.onnx_export import ExportError

    with pytest.raises(ExportError, match="--stage-runtime openvino cannot serve it"):
        choose_engines(repo, TINY, rejected, force="openvino")


def test_openvino_backend_configs_parse_for_triton_builds_that_ship_it():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for spec in stage_specs(TINY).values():
        config = text_format.Parse(stage_config(spec, "openvino", True, threads=2), model_config_pb2.ModelConfig())
        assert config.backend == "openvino" and config.default_model_filename == "model.onnx"
        assert config.parameters["PERFORMANCE_HINT"].string_value == "LATENCY"
        assert config.parameters["INFERENCE_NUM_THREADS"].string_value == "2"
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        python = text_format.Parse(stage_config(spec, "python-ort", engine="openvino", precision="int8"),
                                   model_config_pb2.ModelConfig())
        assert python.parameters["runtime"].string_value == "openvino"
        assert python.parameters["precision"].string_value == "int8"


def test_openvino_executor_masks_match_torch(openvino_repository, torch_executor, phantom_dir):
    from diffugts.executors import make_executor
    from diffugts.io import read_volume

    repo, _ = openvino_repository
    executor = make_executor("openvino", "tiny", repository=str(repo))
    assert type(executor).__name__ == "OpenVinoExecutor"
    for path in sorted((phantom_dir / "imagesTs").glob("*.nii.gz"))[:2]:
        volume = read_volume(path)
        ours, ref = segment_volume(executor, volume, "kidney tumor"), segment_volume(torch_executor, volume, "kidney tumor")
        assert ref.mask.any() and dice(ours.mask, ref.mask) >= 0.99
        assert np.abs(ours.anomaly - ref.anomaly).max() < 1e-3


@pytest.mark.slow
def test_triton_serves_the_stages_in_openvino(openvino_repository, torch_executor, tmp_path):
    from diffugts.client.triton_executor import TritonExecutor
    from diffugts.io import read_volume
    from diffugts.phantom import write_dataset
    from diffugts.serve import TritonServer

    repo, _ = openvino_repository
    data = write_dataset(tmp_path / "data", 2, seed=31, categories=["liver metastasis", "pancreas tumor"],
                         shape=(40, 38, 30), spacing=3.5)
    volumes = [read_volume(p) for p in sorted((data / "imagesTs").glob("*.nii.gz"))]
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_path=tmp_path / "ov.log") as server:
        client = TritonExecutor(server.grpc_url)
        for stage in ONNX_STAGES:  # what the server loaded, not only what the files say
            assert client.transport.model_config(stage).parameters["runtime"].string_value == "openvino"
        for volume, prompt in zip(volumes, ["liver metastasis", "pancreas tumor"]):
            served, ref = segment_volume(client, volume, prompt), segment_volume(torch_executor, volume, prompt)
            assert ref.mask.any() and dice(served.mask, ref.mask) >= 0.99
        client.close()


def test_whole_patch_shapes_are_compiled_static_and_other_shapes_stay_dynamic(openvino_repository):
    repo, _ = openvino_repository
    config = parse_config(repo / "unet" / "config.pbtxt")
    static = json.loads(config.parameters["static_shapes"].string_value)
    whole = example_inputs(TINY, "unet", seed=4)
    assert static == {name: list(array.shape) for name, array in whole.items()}
    names = ["prediction", "attention"]
    session = open_session(repo / "unet" / "1", "openvino", static_shapes=static)
    dynamic = open_session(repo / "unet" / "1", "openvino")
    everything = (0, 1)  # output indices: both
    # one form up front (each holds its own weights); the dynamic one once a crop asks for it
    assert set(session.compiled) == {(_shape_key(static), everything)}
    assert set(dynamic.compiled) == {(None, everything)}
    cropped = example_inputs(TINY, "unet", batch=2, crop=TINY.unet_multiple, seed=5)
    for inputs in (whole, cropped):  # the static model for the whole patch; the dynamic one for a crop
        for a, b in zip(session.run(names, inputs), dynamic.run(names, inputs)):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert set(session.compiled) == {(None, everything), (_shape_key(static), everything)}
    # every form unpinned: in the server, stub processes, tritonserver and the client share the cores
    assert all(compiled.get_property("ENABLE_CPU_PINNING") is False for compiled, _ in session.compiled.values())


def test_a_call_for_the_prediction_alone_runs_a_graph_without_the_attention(openvino_repository):
    """The inpainting steps read the UNet's prediction only: on the whole patch that call gets a
    graph cut down to it (same values), compiled once; cropped boxes keep the dynamic full graph
    (no faster cut down, and each form holds its own weights); unknown names are refused."""
    repo, _ = openvino_repository
    static = json.loads(parse_config(repo / "unet" / "config.pbtxt").parameters["static_shapes"].string_value)
    session = open_session(repo / "unet" / "1", "openvino", static_shapes=static)
    whole = example_inputs(TINY, "unet", seed=4)
    cropped = example_inputs(TINY, "unet", batch=2, crop=TINY.unet_multiple, seed=5)
    for inputs in (whole, cropped, whole):
        full_prediction, attention = session.run(["prediction", "attention"], inputs)
        (alone,) = session.run(["prediction"], inputs)
        np.testing.assert_allclose(alone, full_prediction, rtol=1e-4, atol=1e-5)
    cut = {key: compiled for key, (compiled, _) in session.compiled.items() if key[1] == (0,)}
    assert set(cut) == {(_shape_key(static), (0,))}  # compiled once
    assert len(session.compiled) == 3  # dynamic, static, static cut down
    assert all(len(c.outputs) == 1 and "prediction" in c.outputs[0].get_names() for c in cut.values())
    with pytest.raises(ValueError, match="unknown outputs"):
        session.run(["attn"], whole)
