"""Triton Python-backend model: prompt strings -> MiniLM token ids (fixed length)."""

import os

import numpy as np
import triton_python_backend_utils as pb_utils

from diffugts.tokenizer import load_tokenizer, tokenize_array

MAX_CHARS = 400


class TritonPythonModel:
    def initialize(self, args):
        self.path = os.path.join(args["model_repository"], args["model_version"], "tokenizer.json")
        load_tokenizer(self.path)  # fail at load time, not on the first request

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
                ids, mask = self._tokenize(pb_utils.get_input_tensor_by_name(request, "prompts").as_numpy())
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)]))
            except (ValueError, UnicodeDecodeError) as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses
