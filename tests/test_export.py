"""Export: ONNX parity gate, generated Triton configs (parsed by Triton's protobuf), TensorRT path."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from diffugts.config import get_preset
from diffugts.export import is_repository
from diffugts.export.onnx_export import ExportError, export_stage
from diffugts.export.repository import (RUNTIMES, ensemble_configs, parse_config, pipeline_config,
                                        read_preset, stage_config, write_repository)
from diffugts.export.tensorrt import cache_key, fp32_nodes, profile_shapes, require_tensorrt
from diffugts.stages import ONNX_STAGES, stage_specs

TINY = get_preset("tiny")
ROOT = Path(__file__).resolve().parents[1]


def test_repository_layout_and_configs(tiny_repository):
    assert is_repository(tiny_repository)
    models = sorted(p.parent.name for p in tiny_repository.glob("*/config.pbtxt"))
    assert models == sorted(list(ONNX_STAGES) + ["text_tokenizer", "encode_aova", "score",
                                                  "diffugts_pipeline"])
    for name in ONNX_STAGES:
        config = parse_config(tiny_repository / name / "config.pbtxt")
        assert config.backend == "python" and config.max_batch_size == 8
        assert config.HasField("dynamic_batching")
        if name == "unet":
            assert config.dynamic_batching.max_queue_delay_microseconds == 0
            assert config.max_batch_size == 8
        assert config.instance_group[0].count == 1
        assert (tiny_repository / name / "1" / "model.onnx").is_file()
        assert (tiny_repository / name / "1" / "model.py").is_file()
        onnx.checker.check_model(str(tiny_repository / name / "1" / "model.onnx"))
    for name in ("encode_aova", "score"):
        config = parse_config(tiny_repository / name / "config.pbtxt")
        assert config.platform == "ensemble"
        for step in config.ensemble_scheduling.step:  # every step names a model of the repository
            assert (tiny_repository / step.model_name / "config.pbtxt").is_file()
    assert read_preset(tiny_repository) == TINY


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("dynamic", [True, False])
def test_every_runtime_config_parses(runtime, dynamic):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for spec in stage_specs(TINY).values():
        text = stage_config(spec, runtime, dynamic, trt_accelerator=runtime == "onnxruntime")
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert config.name == spec.name
        assert [i.name for i in config.input] == [t.name for t in spec.inputs]
        assert config.HasField("dynamic_batching") == dynamic
        if runtime == "tensorrt":
            assert config.platform == "tensorrt_plan"
            assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        elif runtime == "onnxruntime":
            assert config.platform == "onnxruntime_onnx"
            accel = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
            assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
        elif runtime == "openvino":
            assert config.backend == "openvino"
        else:
            assert config.backend == "python"


def test_committed_repository_configs_are_what_the_writer_generates():
    from diffugts.models import build_models
    from diffugts.config import bundled_weights
    from diffugts.models.weights import load_weights

    models = build_models(get_preset("demo"))
    load_weights(models, bundled_weights(models.preset))  # the trained scale factor is in the preset
    demo = models.preset
    specs = stage_specs(demo)
    expected = {name: stage_config(specs[name], "python-ort", preset=demo) for name in ONNX_STAGES}
    expected.update(ensemble_configs(demo))
    expected["diffugts_pipeline"] = pipeline_config(demo)
    for name, text in expected.items():
        # an export on this checkout adds each stage's measured engine; the rest is what is committed
        committed = "".join(line for line in (ROOT / "model_repository" / name / "config.pbtxt").read_text()
                            .splitlines(keepends=True) if 'key: "runtime"' not in line and 'key: "precision"' not in line)
        assert committed == text, name
    tokenizer = (ROOT / "model_repository" / "text_tokenizer" / "config.pbtxt").read_text()
    assert parse_config(ROOT / "model_repository" / "text_tokenizer" / "config.pbtxt").backend == "python"
    assert "intra_op_threads" not in tokenizer


def test_export_fails_loudly_above_the_tolerance(tiny_models, tmp_path):
    stage = tiny_models.stages()["residual_head"]
    errors = export_stage(TINY, "residual_head", stage, tmp_path / "ok.onnx", rtol=1e-3)
    assert errors["logits"] < 1e-3
    with pytest.raises(ExportError, match="differs from torch by .* above the tolerance"):
        export_stage(TINY, "residual_head", stage, tmp_path / "strict.onnx", rtol=1e-12)


def test_exported_graphs_have_dynamic_batch_and_crop_axes(tiny_repository):
    graph = onnx.load(str(tiny_repository / "unet" / "1" / "model.onnx")).graph
    latent = graph.input[0].type.tensor_type.shape.dim
    assert latent[0].dim_param == "batch" and all(d.dim_param for d in latent[2:])
    assert latent[1].dim_value == TINY.latent_channels


def test_tensorrt_is_absent_here_and_says_so(tmp_path):
    with pytest.raises(ExportError, match="TensorRT is not installed"):
        require_tensorrt()
    out = subprocess.run([sys.executable, "-m", "diffugts", "export", "--preset", "tiny", "--runtime", "tensorrt",
                          "--out", str(tmp_path / "repo")], capture_output=True, text=True)
    assert out.returncode == 1
    assert "TensorRT is not installed" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "repo").exists()


def test_tensorrt_profiles_follow_the_loop():
    for preset in (TINY, get_preset("maisi")):
        for stage in ("unet", "vae_decoder"):  # both take the loop's cropped latent box
            lo, opt, hi = profile_shapes(preset, stage)["latent"]
            assert lo == (1, 4) + (preset.unet_multiple,) * 3
            assert hi == (8, 4) + (preset.latent_patch,) * 3
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
        enc = profile_shapes(preset, "vae_encoder_aova")
        assert enc["image"][2] == (8, 1) + (preset.patch,) * 3
        assert enc["prompt_embeddings"][1] == (2, 6, preset.embed_dim)


def test_precision_plan_keeps_normalizations_in_fp32(tiny_repository):
    model = onnx.load(str(tiny_repository / "vae_encoder_aova" / "1" / "model.onnx"))
    keep = fp32_nodes(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    norm1 = {name for name in ops if name.startswith("/blocks.1/norm1/") and ops[name] != "Constant"}
    assert norm1 and norm1 <= keep  # the whole group-norm subgraph of the first res block
    assert {name for name, op in ops.items() if op in ("ReduceMean", "Sqrt", "Softmax")} <= keep
    assert not any(ops[name] in ("Conv", "MatMul", "Einsum") for name in keep)


def test_engine_cache_key_tracks_graph_version_and_profile(tiny_repository, tmp_path):
    path = tiny_repository / "residual_head" / "1" / "model.onnx"
    profile = profile_shapes(TINY, "residual_head")
    key = cache_key(path, "10.7.0", profile, True)
    assert key == cache_key(path, "10.7.0", profile, True)
    assert key != cache_key(path, "10.8.0", profile, True)
    assert key != cache_key(path, "10.7.0", profile, False)
    other = tmp_path / "model.onnx"
    other.write_bytes(path.read_bytes() + b"\0")
    assert key != cache_key(other, "10.7.0", profile, True)


def test_python_ort_repository_writer_copies_graphs(tiny_repository, tmp_path):
    out = write_repository(tmp_path / "copy", TINY, "onnxruntime", tiny_repository, dynamic_batching=False)
    config = parse_config(out / "unet" / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx" and not config.HasField("dynamic_batching")
    assert (out / "unet" / "1" / "model.onnx").read_bytes() == (tiny_repository / "unet" / "1" / "model.onnx").read_bytes()
    assert not (out / "unet" / "1" / "model.py").exists()
    assert json.loads(parse_config(out / "diffugts_pipeline" / "config.pbtxt").parameters["preset"].string_value)["name"] == "tiny"


def test_group_norms_export_without_regrouping_feature_maps(tiny_repository, tiny_models):
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D

    # InstanceNormalization over a (B, groups, -1) reshape is how torch exports nn.GroupNorm; the
    # graphs keep only the AOVA adapters' own instance norms (one per encoder tap)
    for stage, expected in (("vae_encoder_aova", len(tiny_models.aova.adapters)), ("vae_decoder", 0), ("unet", 0)):
        ops = [n.op_type for n in onnx.load(str(tiny_repository / stage / "1" / "model.onnx")).graph.node]
        assert ops.count("InstanceNormalization") == expected, stage
        assert "ReduceMean" in ops, stage  # the norms are there, as moments
    assert sum(isinstance(m, MaisiGroupNorm3D) for m in tiny_models.vae.modules()) > 0
    # the swap lasts only as long as the export: the torch reference keeps MONAI's forward
    assert not any("forward" in vars(m) for m in tiny_models.modules() if isinstance(m, torch.nn.GroupNorm))


def test_no_exported_convolution_has_a_single_output_channel(tiny_repository, tiny_models):
    # the residual head ends in a 1->1 convolution: exported with zero filters beside it, then sliced
    assert any(type(m) is torch.nn.Conv3d and m.out_channels == 1 for m in tiny_models.head.modules())
    for stage in ONNX_STAGES:
        model = onnx.load(str(tiny_repository / stage / "1" / "model.onnx"))
        weights = {init.name: init.dims for init in model.graph.initializer}
        convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in weights]
        assert all(weights[n.input[1]][0] > 1 for n in convs), stage
    assert not any("forward" in vars(m) for m in tiny_models.modules() if isinstance(m, torch.nn.Conv3d))


def test_upsampling_then_convolution_is_one_transposed_convolution(tiny_repository, tiny_models):
    from monai.networks.blocks import Upsample

    from diffugts.export.export_forms import transposed_upsamplings

    torch.manual_seed(0)
    block = Upsample(3, in_channels=6, out_channels=6, scale_factor=2, mode="nontrainable", interp_mode="nearest",
                     align_corners=None,
                     post_conv=torch.nn.Conv3d(6, 6, 3, padding=1))
    x = torch.randn(2, 6, 5, 4, 3)
    with torch.no_grad():
        reference = block(x)
        with transposed_upsamplings(block):
            ours = block(x)
    assert ours.shape == reference.shape == (2, 6, 10, 8, 6)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(block)
    # the UNet's upsamplers are exported so: its graph upsamples by transposed convolutions only
    ops = [n.op_type for n in onnx.load(str(tiny_repository / "unet" / "1" / "model.onnx")).graph.node]
    assert ops.count("ConvTranspose") >= 1 and "Resize" not in ops
    # a block that is not exactly nearest x2 -> 3x3x3 stays as it is
    trilinear = Upsample(3, in_channels=6, out_channels=6, scale_factor=2, mode="nontrainable",
                         interp_mode="trilinear", post_conv=torch.nn.Conv3d(6, 6, 3, padding=1))
    with transposed_upsamplings(trilinear):
        assert "forward" not in vars(trilinear)


def test_one_channel_top_upsampler_runs_on_coarse_parities(tiny_repository):
    from monai.networks.nets import UNet

    from diffugts.export.export_forms import coarse_single_channel_upsamplers

    torch.manual_seed(0)
    for out_channels, act in ((1, "PRELU"), (1, "RELU"), (2, "PRELU")):
        net = UNet(3, in_channels=3, out_channels=out_channels, channels=(4, 8), strides=(2,), num_res_units=1,
                   norm="batch", act=act)
        for norm in net.modules():  # stats far from the identity, as trained ones are
            if isinstance(norm, torch.nn.BatchNorm3d):
                norm.running_mean.uniform_(-0.5, 0.5)
                norm.running_var.uniform_(0.3, 3.0)
                torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
                torch.nn.init.uniform_(norm.bias, -0.5, 0.5)
        net.eval()
        x = torch.randn(2, 3, 6, 4, 10)
        with torch.no_grad():
            reference = net(x)
            with coarse_single_channel_upsamplers(net):
                replaced = [m for m in net.modules() if "forward" in vars(m)]
                ours = net(x)
        # the top up-layer alone, and only where it makes one channel
        assert len(replaced) == (1 if out_channels == 1 else 0)
        assert ours.shape == reference.shape == (2, out_channels, 6, 4, 10)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
        assert not any("forward" in vars(m) for m in net.modules())
    # the exported head has no transposed convolution to one channel left
    model = onnx.load(str(tiny_repository / "residual_head" / "1" / "model.onnx"))
    weights = {init.name: init.dims for init in model.graph.initializer}
    transposed = [weights[n.input[1]] for n in model.graph.node if n.op_type == "ConvTranspose"]
    assert transposed and all(dims[1] > 1 for dims in transposed)


@pytest.mark.parametrize("shape,offset", [((2, 16, 6, 5, 4), 0.0), ((1, 16, 7, 3, 5), 100.0), ((2, 8, 30), 0.0)])
def test_group_norm_from_moments_is_torch_group_norm(shape, offset):
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiGroupNorm3D

    from diffugts.export.export_forms import group_norm_from_moments

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator) * 3.0 + offset  # offset: a large mean, small spread
    for norm in (torch.nn.GroupNorm(4, shape[1]), torch.nn.GroupNorm(2, shape[1], affine=False),
                 MaisiGroupNorm3D(num_groups=4, num_channels=shape[1])):
        if norm.affine:
            torch.nn.init.normal_(norm.weight, generator=generator)
            torch.nn.init.normal_(norm.bias, generator=generator)
        reference = torch.nn.functional.group_norm(x.double(), norm.num_groups,
                                                   None if not norm.affine else norm.weight.double(),
                                                   None if not norm.affine else norm.bias.double(), norm.eps)
        with torch.no_grad():
            ours = group_norm_from_moments(norm, x)
        torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)
