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
        # No CPU pinning: in the server each stage runs in its own stub process beside tritonserver
        # and the client, and a thread pinned to a core cannot step aside for them (demo, Triton /
        # the same runtime in process, median of paired volumes: 1.11-1.13x pinned, 1.08-1.09x not)
        self.config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32",
                       "ENABLE_CPU_PINNING": "NO"}
        if threads > 0:
            self.config["INFERENCE_NUM_THREADS"] = str(threads)
        self.core, self.path = ov.Core(), str(path)
        model = self.core.read_model(self.path)  # compiled as it is below; not kept (its weights are large)
        # each output's tensor names (an IR from NNCF may carry several per output)
        self.outputs = [set(o.get_names()) for o in model.outputs]
        self.static_key = _shape_key(static_shapes) if static_shapes else None
        self.static_shapes = static_shapes
        # compiled models by (static or dynamic, outputs computed). One form up front, the whole
        # graph at the shapes every window's first call has; the others when a call first needs
        # one: each holds its own copy of the weights (~1.5 GB for the maisi UNet)
        self.compiled = {}
        self._compiled_for(self.static_key, tuple(range(len(self.outputs))), model)

    def _compiled_for(self, static_key, outputs: tuple[int, ...], model=None):
        """The graph, reshaped to the whole patch where `static_key` says so, and cut down to
        `outputs`: a call that does not read the UNet's attention (every inpainting step) runs a
        graph without it, where OpenVINO fuses each attention block into one kernel (its
        matrices are no longer an output): 10% of a whole-patch demo UNet call on this CPU.
        At most three forms: dynamic, static, static cut down."""
        key = (static_key, outputs)
        if key not in self.compiled:
            import openvino as ov

            if model is None:  # reshaping below changes a model in place: a fresh read for each form
                model = self.core.read_model(self.path)
            if static_key is not None:
                model.reshape({name: list(shape) for name, shape in self.static_shapes.items()})
            if len(outputs) < len(self.outputs):
                results = [model.get_results()[i] for i in outputs]
                model = ov.Model(results, model.get_parameters(), model.get_friendly_name())
            compiled = self.core.compile_model(model, "CPU", self.config)
            self.compiled[key] = (compiled, compiled.create_infer_request())
        return self.compiled[key]

    def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        unknown = [name for name in outputs if not any(name in names for names in self.outputs)]
        if unknown:
            raise ValueError(f"unknown outputs {unknown}: the graph has {[sorted(n) for n in self.outputs]}")
        static = _shape_key({k: v.shape for k, v in feed.items()}) == self.static_key
        # only the whole patch gets a cut-down graph: on cropped boxes it measured no faster
        wanted = tuple(i for i, names in enumerate(self.outputs) if names & set(outputs)) if static else \
            tuple(range(len(self.outputs)))
        compiled, request = self._compiled_for(self.static_key if static else None, wanted)
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
