"""Triton Python-backend (BLS) model: the whole DiffuGTS loop inside the server.

It runs the very loop the client runs (`diffugts.pipeline.segment_volume`), with stage calls
made as BLS requests to the stage models and ensembles of this repository.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from diffugts_validation import error_text, input_specs, read_request

from diffugts.client.executor import RepositoryExecutor
from diffugts.client.transports import BlsTransport
from diffugts.config import Preset
from diffugts.io import Volume, validate_affine, validate_array
from diffugts.pipeline import LoopOptions, segment_volume


def _text(request, name, default=""):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _scalar(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0].item()


# a client may leave these out (one written before the input existed): the loop's defaults hold
OPTIONAL_INPUTS = ("modality", "seed", "crop", "organ", "all_components")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        preset = Preset.from_dict(json.loads(config["parameters"]["preset"]["string_value"]))
        self.executor = RepositoryExecutor(BlsTransport(pb_utils), preset)
        self.specs = input_specs(config)

    def _segment(self, request):
        read_request(request, self.specs, pb_utils.get_input_tensor_by_name, optional=OPTIONAL_INPUTS)
        if _text(request, "modality").upper() not in ("", "CT", "MR"):
            raise ValueError("modality must be CT or MR")
        volume = pb_utils.get_input_tensor_by_name(request, "volume").as_numpy()
        affine = pb_utils.get_input_tensor_by_name(request, "affine").as_numpy()
        volume = Volume(validate_array("volume", volume), validate_affine("affine", affine), "request")
        modality = _text(request, "modality") or None
        options = LoopOptions(crop=bool(_scalar(request, "crop", True)), seed=int(_scalar(request, "seed", 0)),
                              organ=bool(_scalar(request, "organ", True)),
                              all_components=bool(_scalar(request, "all_components", False)))
        seg = segment_volume(self.executor, volume, _text(request, "prompt"), modality, options)
        return [pb_utils.Tensor("mask", seg.mask.astype(np.uint8)),
                pb_utils.Tensor("anomaly", seg.anomaly.astype(np.float32)),
                pb_utils.Tensor("timings", np.array([json.dumps(seg.timings).encode()], dtype=np.object_)),
                pb_utils.Tensor("notices", np.array([json.dumps(list(seg.notices)).encode()], dtype=np.object_))]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(self._segment(request)))
            except Exception as exc:  # a bad request fails alone, the instance lives on
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error_text(exc))))
        return responses
