"""One exported graph, run by ONNX Runtime or OpenVINO on the CPU behind one call:
`session.run(output_names, feed) -> [arrays]`.

The in-process executors and the server's Python-backend stage models both open graphs here,
so the two runtimes differ in this file only. A stage may also ship an int8 OpenVINO model
(`model.int8.xml`, made by `diffugts.export.quantize`), run with precision="int8".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ENGINES = ("onnxruntime", "openvino")
INT8_MODEL = "model.int8.xml"


class OrtSession:
    def __init__(self, path: str | Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        # stages run one after another (in one process or one stub process each): idle ORT
        # threads spinning after one stage would steal the cores from the next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(outputs, feed)


class OpenVinoSession:
    """An OpenVINO CPU model compiled for latency, fp32 throughout (OpenVINO would otherwise pick
    bf16 on CPUs that have it, which the parity check against torch does not allow).

    `static_shapes` ({input: shape}, the inputs of one whole patch): that call is also compiled
    for its fixed shapes, which lets OpenVINO fold the graph's shape arithmetic and plan memory
    once (~7-10% of the demo UNet and encoder on this CPU); other shapes (cropped boxes, batched
    requests) run the dynamic model."""

    def __init__(self, path: str | Path, threads: int = 0, static_shapes: dict[str, list[int]] | None = None):
        import openvino as ov

        # (an int8 model keeps its int8 convolutions under the f32 hint; the rest stays f32)
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32"}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.static = {}
        if static_shapes:
            model = core.read_model(str(path))
            model.reshape({name: list(shape) for name, shape in static_shapes.items()})
            compiled = core.compile_model(model, "CPU", config)
            self.static[_shape_key(static_shapes)] = (compiled, compiled.create_infer_request())

    def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        compiled, request = self.static.get(_shape_key({k: v.shape for k, v in feed.items()}),
                                            (self.compiled, self.request))
        # outputs copied out of the request: the next call reuses its buffers
        results = request.infer({k: np.ascontiguousarray(v) for k, v in feed.items()}, share_outputs=False)
        return [results[compiled.output(name)] for name in outputs]


def _shape_key(shapes: dict[str, tuple[int, ...] | list[int]]) -> tuple:
    return tuple(sorted((name, tuple(int(d) for d in shape)) for name, shape in shapes.items()))


def open_session(version_dir: str | Path, engine: str = "onnxruntime", threads: int = 0,
                 precision: str = "fp32", static_shapes: dict[str, list[int]] | None = None):
    """The graph of a stage's version folder (`<stage>/1/`), or an .onnx file, in the engine asked
    for. `static_shapes`: see `OpenVinoSession` (ONNX Runtime has no use for them)."""
    version_dir = Path(version_dir)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: {', '.join(ENGINES)}")
    if version_dir.suffix == ".onnx":  # one graph file (the export's parity check)
        return OrtSession(version_dir, threads) if engine == "onnxruntime" else \
            OpenVinoSession(version_dir, threads, static_shapes)
    if engine == "onnxruntime":
        return OrtSession(version_dir / "model.onnx", threads)
    int8 = version_dir / INT8_MODEL
    if precision == "int8" and not int8.is_file():
        raise FileNotFoundError(f"{int8} is missing: the stage was not quantized")
    return OpenVinoSession(int8 if precision == "int8" else version_dir / "model.onnx", threads, static_shapes)


def engine_available(engine: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(engine) is not None
