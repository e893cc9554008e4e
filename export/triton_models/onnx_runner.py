"""Triton Python-backend model: one ONNX graph run by ONNX Runtime or OpenVINO on CPU.

Requests that arrive together (dynamic batching) and share shapes are concatenated along the
batch axis and run as one call. Inputs are validated before they reach the graph.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from diffugts.client.runtimes import open_session


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # the graph in the runtime the export measured fastest for this stage (ONNX Runtime or OpenVINO)
        self.session = open_session(os.path.join(args["model_repository"], args["model_version"]),
                                    params.get("runtime", "onnxruntime"), int(params.get("intra_op_threads", "0")),
                                    params.get("precision", "fp32"))
        self.inputs = [(i["name"], [int(d) for d in i["dims"]]) for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def _read(self, request):
        arrays = {}
        for name, dims in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input {name}")
            array = tensor.as_numpy()
            fixed = [(got, want) for got, want in zip(array.shape[1:], dims) if want != -1 and got != want]
            if array.ndim != len(dims) + 1 or fixed:
                raise ValueError(f"input {name} has shape {list(array.shape)}, expected [batch] + {dims}")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise ValueError(f"input {name} has NaN or Inf values")
            arrays[name] = array
        return arrays

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            try:
                arrays = self._read(request)
            except ValueError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            key = tuple((k, v.shape[1:]) for k, v in arrays.items())
            groups.setdefault(key, []).append((i, arrays))
        for members in groups.values():
            feed = {name: np.concatenate([a[name] for _, a in members]) for name, _ in self.inputs}
            try:
                results = self.session.run(self.outputs, feed)
            except Exception as exc:  # report to the caller instead of killing the instance
                for i, _ in members:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            start = 0
            for i, arrays in members:
                n = next(iter(arrays.values())).shape[0]
                tensors = [pb_utils.Tensor(name, r[start:start + n]) for name, r in zip(self.outputs, results)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += n
        return responses
