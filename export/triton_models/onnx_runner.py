"""Triton Python-backend model: one ONNX graph run by ONNX Runtime or OpenVINO on CPU.

Requests that arrive together (dynamic batching) and share shapes are concatenated along the
batch axis and run as one call. Inputs are checked before they reach the graph
(`diffugts_validation`, shipped beside this file); a bad request fails alone.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from diffugts_validation import error_text, input_specs, read_request

from diffugts.client.runtimes import open_session


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # the graph in the runtime the export measured fastest for this stage (ONNX Runtime or OpenVINO)
        self.session = open_session(os.path.join(args["model_repository"], args["model_version"]),
                                    params.get("runtime", "onnxruntime"), int(params.get("intra_op_threads", "0")),
                                    params.get("precision", "fp32"),
                                    json.loads(params.get("static_shapes", "null")))
        self.specs = input_specs(config)
        self.inputs = [(spec.name, spec.dims) for spec in self.specs]
        self.outputs = [o["name"] for o in config["output"]]
        self.max_batch = int(config.get("max_batch_size", 0))

    def _read(self, request):
        return read_request(request, self.specs, pb_utils.get_input_tensor_by_name, self.max_batch)

    def _run(self, members, responses):
        # one request (the client loop's every call) runs on its own arrays: no copy to concatenate
        feed = {name: members[0][1][name] if len(members) == 1 else np.concatenate([a[name] for _, a, _ in members])
                for name, _ in self.inputs}
        # only the outputs some member asked for are computed (OpenVINO then runs a graph cut down to them)
        computed = [name for name in self.outputs if any(name in wanted for _, _, wanted in members)]
        results = self.session.run(computed, feed)
        start = 0
        for i, arrays, wanted in members:
            n = next(iter(arrays.values())).shape[0]
            tensors = [pb_utils.Tensor(name, r[start:start + n]) for name, r in zip(computed, results)
                       if name in wanted]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start += n

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            try:
                arrays = self._read(request)
            except Exception as exc:  # any bad request fails alone, the instance lives on
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(error_text(exc)))
                continue
            key = tuple((k, v.shape[1:]) for k, v in arrays.items())
            # only the outputs asked for go back (the UNet's attention is unread in the inpainting steps)
            wanted = set(request.requested_output_names()) or set(self.outputs)
            groups.setdefault(key, []).append((i, arrays, wanted))
        for members in groups.values():
            try:
                self._run(members, responses)
            except Exception:  # a graph error: run each request alone, so that only its culprit fails
                for member in members:
                    try:
                        self._run([member], responses)
                    except Exception as exc:
                        responses[member[0]] = pb_utils.InferenceResponse(error=pb_utils.TritonError(error_text(exc)))
        return responses
