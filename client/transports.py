"""What carries tensors to a model of the repository: gRPC, BLS inside the server, or
ONNX Runtime in process (with the repository's ensembles interpreted step by step)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np

GRPC_MESSAGE_BYTES = 1 << 30  # volumes and latents are large; gRPC's default is 4 MB
# Triton's restricted-protocol key: gRPC clients send it as metadata `triton-grpc-protocol-<key>`
TOKEN_KEY = "diffugts-token"
GRPC_TOKEN_HEADER = f"triton-grpc-protocol-{TOKEN_KEY}"
_region_ids = itertools.count()


class TritonError(RuntimeError):
    """A failed remote call, in one line. `transient`: the endpoint was unreachable or too slow
    (gRPC UNAVAILABLE / DEADLINE_EXCEEDED), so the same request may succeed elsewhere or later."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def read_token(path: str | Path) -> str:
    """The token of `--token-file`: the file's first line, surrounding whitespace removed."""
    try:
        token = Path(path).read_text().strip().splitlines()
    except OSError as exc:
        raise TritonError(f"{path}: cannot read the token file ({exc.strerror})") from None
    if not token or not token[0].strip():
        raise TritonError(f"{path}: the token file is empty")
    return token[0].strip()


class GrpcTransport:
    """`token` goes with every call as gRPC metadata; `root_certificates` (a PEM file of the CA that
    signed the server's certificate) switches the channel to TLS."""

    def __init__(self, url: str, timeout_s: float = 300.0, shared_memory: bool = False, preset=None,
                 token: str | None = None, root_certificates: str | None = None):
        import tritonclient.grpc as grpcclient

        self.url, self.timeout_s = url, timeout_s
        self._grpc = grpcclient
        self.headers = {GRPC_TOKEN_HEADER: token} if token else None
        self.client = grpcclient.InferenceServerClient(
            url, ssl=root_certificates is not None, root_certificates=root_certificates, channel_args=[
                ("grpc.max_send_message_length", GRPC_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES)])
        self.shared_memory = shared_memory
        self.preset = preset
        self._regions: dict[str, tuple] = {}
        # region names unique per transport: several executors may share one process (batch workers)
        self._region_prefix = f"diffugts_{os.getpid()}_{next(_region_ids)}"

    def _call(self, what: str, fn, *args, **kwargs):
        from tritonclient.utils import InferenceServerException

        kwargs.setdefault("headers", self.headers)
        kwargs.setdefault("client_timeout", self.timeout_s)
        try:
            return fn(*args, **kwargs)
        except InferenceServerException as exc:
            status, message = exc.status() or "", exc.message() or ""
            if "protocol is restricted" in message:  # Triton answers UNAVAILABLE: not worth a retry
                raise TritonError(f"Triton at {self.url} refused {what}: it needs the diffugts token "
                                  f"(--token-file), and this one is missing or wrong") from None
            if "UNAVAILABLE" in status or "DEADLINE" in status:
                raise TritonError(f"Triton at {self.url} is unreachable or stopped during {what}: "
                                  f"{exc.message().splitlines()[0] if exc.message() else status}",
                                  transient=True) from None
            raise TritonError(f"{what} failed on Triton at {self.url}: {exc.message()}") from None

    def is_ready(self, timeout_s: float = 5.0) -> bool:
        try:
            return bool(self._call("the readiness check", self.client.is_server_ready, client_timeout=timeout_s))
        except TritonError:
            return False

    def model_config(self, model: str):
        return self._call(f"reading the config of {model}", self.client.get_model_config, model).config

    def _region(self, key: str, nbytes: int):
        import tritonclient.utils.shared_memory as shm

        region = self._regions.get(key)
        if region is None or region[1] < nbytes:
            if region is not None:
                self.client.unregister_system_shared_memory(key, headers=self.headers)
                shm.destroy_shared_memory_region(region[0])
            handle = shm.create_shared_memory_region(key, "/" + key, nbytes)
            self._call("registering shared memory", self.client.register_system_shared_memory,
                       key, "/" + key, nbytes)
            region = self._regions[key] = (handle, nbytes)
        return region[0]

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        from tritonclient.utils import np_to_triton_dtype

        grpc = self._grpc
        use_shm = self.shared_memory and self.preset is not None
        request = []
        for name, array in inputs.items():
            tensor = grpc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            if use_shm and array.dtype != np.object_:
                import tritonclient.utils.shared_memory as shm

                key = f"{self._region_prefix}_{model}_in_{name}"
                shm.set_shared_memory_region(self._region(key, array.nbytes), [np.ascontiguousarray(array)])
                tensor.set_shared_memory(key, array.nbytes)
            else:
                tensor.set_data_from_numpy(array)
            request.append(tensor)
        wanted = []
        shapes = {}
        if use_shm:
            from diffugts.stages import output_shapes

            shapes = output_shapes(self.preset, model, inputs)
        for name in outputs:
            out = grpc.InferRequestedOutput(name)
            if name in shapes:  # every output the loop reads is FP32
                nbytes = int(np.prod(shapes[name])) * 4
                key = f"{self._region_prefix}_{model}_out_{name}"
                self._region(key, nbytes)
                out.set_shared_memory(key, nbytes)
            wanted.append(out)
        result = self._call(f"{model} inference", self.client.infer, model, request, outputs=wanted)
        if not shapes:
            return {name: result.as_numpy(name) for name in outputs}
        import tritonclient.utils.shared_memory as shm

        arrays = {}
        for name in outputs:
            meta = result.get_output(name)
            handle = self._regions[f"{self._region_prefix}_{model}_out_{name}"][0]
            arrays[name] = np.array(shm.get_contents_as_numpy(handle, np.float32, list(meta.shape)))
        return arrays

    def close(self) -> None:
        import tritonclient.utils.shared_memory as shm

        for key, (handle, _) in self._regions.items():
            try:
                self.client.unregister_system_shared_memory(key, headers=self.headers, client_timeout=5.0)
            except Exception:  # the server may be gone already; the local region still goes
                pass
            shm.destroy_shared_memory_region(handle)
        self._regions.clear()
        self.client.close()


class BlsTransport:
    """Inside a Triton Python model: stage calls as BLS requests."""

    def __init__(self, pb_utils):
        self.pb = pb_utils

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        pb = self.pb
        request = pb.InferenceRequest(model_name=model, requested_output_names=outputs,
                                      inputs=[pb.Tensor(k, v) for k, v in inputs.items()])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return {name: pb.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


class LocalTransport:
    """A runtime in process over the same repository: same graphs, ensembles run step by step.

    `engine`: "onnxruntime" or "openvino" for every stage, or None for what each stage's config
    names (the runtime the export measured fastest there, as the server runs it)."""

    def __init__(self, repository: str | Path, threads: int = 0, engine: str | None = "onnxruntime",
                 precision: dict[str, str] | None = None):
        self.repository = Path(repository)
        self.threads, self.engine = threads, engine
        self.precision = precision  # stage -> "int8" | "fp32"; None: as each stage's config says
        self._sessions: dict[str, object] = {}
        self._configs: dict[str, object] = {}

    def _config(self, model: str):
        if model not in self._configs:
            from diffugts.export.repository import parse_config

            self._configs[model] = parse_config(self.repository / model / "config.pbtxt")
        return self._configs[model]

    def stage_engine(self, model: str) -> tuple[str, str]:
        """(engine, precision) of a stage model."""
        params = self._config(model).parameters
        engine = self.engine or (params["runtime"].string_value if "runtime" in params else "onnxruntime")
        if self.precision is not None:
            precision = self.precision.get(model, "fp32")
        else:
            precision = params["precision"].string_value if "precision" in params else "fp32"
        return engine, (precision if engine == "openvino" else "fp32")

    def _session(self, model: str):
        if model not in self._sessions:
            from .runtimes import open_session

            engine, precision = self.stage_engine(model)
            params = self._config(model).parameters
            static = json.loads(params["static_shapes"].string_value) if "static_shapes" in params else None
            self._sessions[model] = open_session(self.repository / model / "1", engine, self.threads, precision,
                                                 static)
        return self._sessions[model]

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        config = self._config(model)
        if config.platform == "ensemble":
            tensors = dict(inputs)
            for step in config.ensemble_scheduling.step:
                feed = {k: tensors[v] for k, v in step.input_map.items()}
                produced = self.infer(step.model_name, feed, list(step.output_map.keys()))
                tensors.update({step.output_map[k]: v for k, v in produced.items()})
            return {name: tensors[name] for name in outputs}
        if model == "text_tokenizer":
            from diffugts.tokenizer import tokenize_array

            ids, mask = tokenize_array(inputs["prompts"], self.repository / model / "1" / "tokenizer.json")
            return {"input_ids": ids, "attention_mask": mask}
        results = self._session(model).run(outputs, inputs)
        return dict(zip(outputs, results))


class OrtTransport(LocalTransport):
    """ONNX Runtime in process for every stage."""

    def __init__(self, repository: str | Path, threads: int = 0):
        super().__init__(repository, threads, "onnxruntime")


class OpenVinoTransport(LocalTransport):
    """OpenVINO in process for every stage."""

    def __init__(self, repository: str | Path, threads: int = 0, precision: dict[str, str] | None = None):
        super().__init__(repository, threads, "openvino", precision)
