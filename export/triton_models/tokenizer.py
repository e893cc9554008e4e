"""Triton Python-backend model: prompt strings -> MiniLM token ids (fixed length)."""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from diffugts_validation import error_text, input_specs, read_request

from diffugts.tokenizer import load_tokenizer, tokenize_array

MAX_CHARS = 400


class TritonPythonModel:
    def initialize(self, args):
        self.path = os.path.join(args["model_repository"], args["model_version"], "tokenizer.json")
        load_tokenizer(self.path)  # fail at load time, not on the first request
        config = json.loads(args["model_config"])
        self.specs, self.max_batch = input_specs(config), int(config.get("max_batch_size", 0))

    def _tokenize(self, prompts: np.ndarray):
        texts = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in prompts.reshape(-1)]
        if any(not t.strip() for t in texts):
            raise ValueError("empty prompt")
        if any(len(t) > MAX_CHARS for t in texts):
            raise ValueError(f"prompt longer than {MAX_CHARS} characters")
        return tokenize_array(prompts, self.path)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                prompts = read_request(request, self.specs, pb_utils.get_input_tensor_by_name, self.max_batch)["prompts"]
                ids, mask = self._tokenize(prompts)
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)]))
            except Exception as exc:  # a bad request fails alone, the instance lives on
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error_text(exc))))
        return responses
