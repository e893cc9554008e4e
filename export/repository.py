"""Write a Triton model repository: one folder per stage, `config.pbtxt` beside `1/`.

Runtimes of the ONNX stages:
  python-ort   Python backend running ONNX Runtime or OpenVINO, per stage (CPU; what the
               pip-distributed Triton loads); the export picks each stage's engine by measurement
  onnxruntime  Triton's ONNX Runtime backend, optionally with the TensorRT execution accelerator
  openvino     Triton's OpenVINO backend (builds that ship it), on the same ONNX graphs
  tensorrt     TensorRT plans (`platform: "tensorrt_plan"`), built by `export.tensorrt`
The tokenizer and the whole-loop BLS model are always Python-backend models.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from diffugts.config import Preset
from diffugts.stages import ONNX_STAGES, PIPELINE, StageSpec, Tensor, ensemble_specs, stage_specs

RUNTIMES = ("python-ort", "onnxruntime", "openvino", "tensorrt")
# bumped when stage signatures change, so that graphs exported by an older version are rebuilt
# (2: the decoder takes cropped latent boxes; `decode_score` became `score`;
#  3: Python models import diffugts_validation.py from their folder, configs carry input_limits;
#  4: group norms exported as moments, OpenVINO stages carry static_shapes)
REPOSITORY_FORMAT = 4
MODEL_SOURCES = Path(__file__).parent / "triton_models"
# shipped beside every Python-backend model.py: the request checks they share
VALIDATION_MODULE = "diffugts_validation.py"
# upper bounds of the dynamic (-1) dims the server accepts (see `input_limits`)
MAX_PROMPTS = 64
MAX_VOLUME_DIM = 2048

# per stage: (instances, preferred batch sizes, max queue delay in microseconds).
# No queue delay: Triton still batches the requests that queue while an instance is busy (the
# only time batching pays on a CPU whose cores one request already fills); a delay would only
# add latency to every call of an idle server (~15 calls per volume).
SERVING = {
    "text_tokenizer": (1, (), 0),
    "text_encoder": (1, (), 0),
    "vae_encoder_aova": (1, (), 0),
    "unet": (1, (), 0),
    "vae_decoder": (1, (), 0),
    "residual_head": (1, (), 0),
}


def _dims(t: Tensor) -> str:
    return "[ " + ", ".join(str(d) for d in t.dims) + " ]"


def _config_dtype(t: Tensor) -> str:
    return "TYPE_STRING" if t.dtype == "BYTES" else f"TYPE_{t.dtype}"  # BYTES on the wire


def _tensors(kind: str, tensors: tuple[Tensor, ...]) -> str:
    rows = ",\n".join(f'  {{ name: "{t.name}", data_type: {_config_dtype(t)}, dims: {_dims(t)}'
                       f'{", optional: true" if t.optional else ""} }}' for t in tensors)
    return f"{kind} [\n{rows}\n]"


def _header(spec: StageSpec, backend_line: str) -> str:
    return (f'name: "{spec.name}"\n{backend_line}\nmax_batch_size: {spec.max_batch_size}\n'
            f"{_tensors('input', spec.inputs)}\n{_tensors('output', spec.outputs)}\n")


def _batching(name: str, dynamic: bool) -> str:
    instances, preferred, delay = SERVING[name]
    kind = "KIND_CPU"
    text = f"instance_group [ {{ count: {instances}, kind: {kind} }} ]\n"
    if dynamic:
        pref = f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" if preferred else ""
        text += f"dynamic_batching {{\n{pref}  max_queue_delay_microseconds: {delay}\n}}\n"
    return text


def input_limits(spec: StageSpec, preset: Preset) -> dict[str, list[int]]:
    """Per input, its dims with each -1 replaced by the largest value a sound client sends:
    latent boxes are at most the latent patch, volumes MAX_VOLUME_DIM a side, prompt sets
    MAX_PROMPTS. Checked by the Python-backend models before any work."""
    def bound(t: Tensor) -> int:
        if len(t.dims) == 4 and t.dims[0] == preset.latent_channels:
            return preset.latent_patch
        if len(t.dims) == 3:
            return MAX_VOLUME_DIM
        return MAX_PROMPTS
    return {t.name: [bound(t) if d == -1 else d for d in t.dims] for t in spec.inputs}


def whole_patch_shapes(stage: str, preset: Preset) -> dict[str, list[int]]:
    """The input shapes of a stage for one whole patch (batch 1): the call every case makes,
    which OpenVINO stages also compile for these fixed shapes (`static_shapes`)."""
    from .onnx_export import example_inputs

    return {name: list(array.shape) for name, array in example_inputs(preset, stage).items()}


def _limits_parameter(spec: StageSpec, preset: Preset) -> str:
    return _parameters({"input_limits": json.dumps(input_limits(spec, preset))})


def _parameters(values: dict[str, str]) -> str:
    return "".join(f'parameters {{ key: "{k}", value: {{ string_value: {json.dumps(v)} }} }}\n'
                   for k, v in values.items())


def stage_config(spec: StageSpec, runtime: str, dynamic_batching: bool = True, threads: int = 0,
                 trt_accelerator: bool = False, engine: str | None = None, precision: str | None = None,
                 preset: Preset | None = None) -> str:
    """`engine` / `precision`: the python-ort runner's engine (onnxruntime, openvino) and
    precision (fp32, int8: OpenVINO only) for this stage; unset, it runs ONNX Runtime in fp32.
    `preset` bounds the dynamic dims the Python-backend model accepts (`input_limits`)."""
    if runtime == "python-ort":
        text = _header(spec, 'backend: "python"') + _batching(spec.name, dynamic_batching)
        params = {"intra_op_threads": str(threads)}
        if engine:
            params["runtime"] = engine
        if precision and precision != "fp32":
            params["precision"] = precision
        if engine == "openvino" and preset is not None:
            params["static_shapes"] = json.dumps(whole_patch_shapes(spec.name, preset))
        return text + _parameters(params) + (_limits_parameter(spec, preset) if preset is not None else "")
    if runtime == "openvino":
        # Triton's OpenVINO backend reads the ONNX graph itself; one stream, latency first, as in process
        text = _header(spec, 'backend: "openvino"') + 'default_model_filename: "model.onnx"\n'
        text += _batching(spec.name, dynamic_batching)
        params = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if threads:
            params["INFERENCE_NUM_THREADS"] = str(threads)
        return text + _parameters(params)
    if runtime == "onnxruntime":
        text = _header(spec, 'platform: "onnxruntime_onnx"')
        text += _batching(spec.name, dynamic_batching).replace("KIND_CPU", "KIND_GPU")
        if trt_accelerator:  # TensorRT execution provider inside Triton's ORT backend (GPU only)
            text += ('optimization { execution_accelerators {\n  gpu_execution_accelerator : [ {\n'
                     '    name : "tensorrt"\n    parameters { key: "precision_mode" value: "FP16" }\n'
                     '    parameters { key: "max_workspace_size_bytes" value: "4294967296" }\n  } ]\n} }\n')
        return text
    if runtime == "tensorrt":
        text = _header(spec, 'platform: "tensorrt_plan"')
        return text + _batching(spec.name, dynamic_batching).replace("KIND_CPU", "KIND_GPU")
    raise ValueError(f"unknown runtime {runtime!r}: {', '.join(RUNTIMES)}")


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    ins = "\n".join(f'      input_map {{ key: "{k}", value: "{v}" }}' for k, v in inputs.items())
    outs = "\n".join(f'      output_map {{ key: "{k}", value: "{v}" }}' for k, v in outputs.items())
    return f'    {{\n      model_name: "{model}"\n      model_version: -1\n{ins}\n{outs}\n    }}'


def ensemble_configs(preset: Preset) -> dict[str, str]:
    """The single-pass parts of the loop as data flow."""
    specs = ensemble_specs(preset)
    encode = [
        _step("text_tokenizer", {"prompts": "prompts"},
              {"input_ids": "input_ids", "attention_mask": "attention_mask"}),
        _step("text_encoder", {"input_ids": "input_ids", "attention_mask": "attention_mask"},
              {"prompt_embeddings": "prompt_embeddings"}),
        _step("vae_encoder_aova", {"image": "image", "prompt_embeddings": "prompt_embeddings", "abnormal": "abnormal"},
              {"latent": "latent", "anomaly": "anomaly", "features": "features"}),
    ]
    score = [
        _step("vae_encoder_aova", {"image": "healthy", "prompt_embeddings": "prompt_embeddings", "abnormal": "abnormal"},
              {"anomaly": "healthy_anomaly", "features": "healthy_features"}),
        _step("residual_head", {"image": "image", "healthy": "healthy", "anomaly": "anomaly",
                                "healthy_anomaly": "healthy_anomaly", "features": "features",
                                "healthy_features": "healthy_features"}, {"logits": "logits"}),
    ]
    out = {}
    for name, steps in (("encode_aova", encode), ("score", score)):
        text = _header(specs[name], 'platform: "ensemble"')
        out[name] = text + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"
    return out


def pipeline_config(preset: Preset, instances: int = 1, model_sha256: str = "") -> str:
    text = _header(PIPELINE, 'backend: "python"')
    text += f"instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]\n"
    values = {"preset": json.dumps(preset.to_dict())}
    if model_sha256:
        values["model_sha256"] = model_sha256
    return text + _parameters(values) + _limits_parameter(PIPELINE, preset)


def artifacts_sha256(out: Path) -> str:
    """One checksum of every stage's graph (or plan, with external data) and the tokenizer: what
    a batch client records as the model identity, so that re-exported weights are told apart."""
    digest = hashlib.sha256()
    files = [f for name in ONNX_STAGES for f in sorted((out / name / "1").glob("model.*")) if f.name != "model.py"]
    for f in files + [out / "text_tokenizer" / "1" / "tokenizer.json"]:
        digest.update(f"{f.parent.parent.name}/{f.name}\0".encode())
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_repository(out: Path, preset: Preset, runtime: str = "python-ort", onnx_dir: Path | None = None,
                     dynamic_batching: bool = True, tokenizer_json: Path | None = None,
                     trt_accelerator: bool = False, threads: int = 0, parity: dict | None = None,
                     engines: dict[str, str] | None = None, precisions: dict[str, str] | None = None,
                     choice_report: dict | None = None) -> Path:
    """Lay out the repository; ONNX graphs (or plans) are taken from `onnx_dir/<stage>/1/`.

    `engines` / `precisions`: per stage, the python-ort runner's engine and precision.
    `export_report.json` records the format, the export's parity errors against torch and how
    each stage's engine was chosen."""
    engines, precisions = engines or {}, precisions or {}
    from diffugts.tokenizer import bundled_tokenizer_json

    out = Path(out)
    specs = stage_specs(preset)
    onnx_dir = Path(onnx_dir or out)
    for name in ONNX_STAGES:
        version = out / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        artifact = "model.plan" if runtime == "tensorrt" else "model.onnx"
        source = onnx_dir / name / "1" / artifact
        if source.resolve() != (version / artifact).resolve():
            for pattern in (artifact + "*", "model.int8.*"):  # the graph, external data, int8 model
                for f in source.parent.glob(pattern):
                    shutil.copy2(f, version / f.name)
        if runtime == "python-ort":
            shutil.copy2(MODEL_SOURCES / "onnx_runner.py", version / "model.py")
            shutil.copy2(MODEL_SOURCES / VALIDATION_MODULE, version / VALIDATION_MODULE)
        (out / name / "config.pbtxt").write_text(
            stage_config(specs[name], runtime, dynamic_batching, threads, trt_accelerator,
                         engines.get(name), precisions.get(name), preset))
    tok = out / "text_tokenizer" / "1"
    tok.mkdir(parents=True, exist_ok=True)
    shutil.copy2(MODEL_SOURCES / "tokenizer.py", tok / "model.py")
    shutil.copy2(MODEL_SOURCES / VALIDATION_MODULE, tok / VALIDATION_MODULE)
    shutil.copy2(tokenizer_json or bundled_tokenizer_json(), tok / "tokenizer.json")
    (out / "text_tokenizer" / "config.pbtxt").write_text(
        stage_config(specs["text_tokenizer"], "python-ort", dynamic_batching, preset=preset).replace(
            'parameters { key: "intra_op_threads", value: { string_value: "0" } }\n', ""))
    for name, text in ensemble_configs(preset).items():
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        (out / name / "config.pbtxt").write_text(text)
    bls = out / PIPELINE.name / "1"
    bls.mkdir(parents=True, exist_ok=True)
    shutil.copy2(MODEL_SOURCES / "pipeline.py", bls / "model.py")
    shutil.copy2(MODEL_SOURCES / VALIDATION_MODULE, bls / VALIDATION_MODULE)
    (out / PIPELINE.name / "config.pbtxt").write_text(pipeline_config(preset, model_sha256=artifacts_sha256(out)))
    (out / "export_report.json").write_text(json.dumps(
        {"format": REPOSITORY_FORMAT, "preset": preset.name, "runtime": runtime,
         "max_relative_error": parity or {}, "stage_runtime": choice_report or {}}, indent=2))
    return out


def parse_config(path: Path):
    """A config.pbtxt as Triton's own protobuf message (raises on any syntax or field error)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def read_preset(repository: Path) -> Preset:
    config = parse_config(Path(repository) / PIPELINE.name / "config.pbtxt")
    return Preset.from_dict(json.loads(config.parameters["preset"].string_value))
