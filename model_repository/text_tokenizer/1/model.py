"""Triton Python-backend model: prompt strings -> MiniLM token ids (fixed length)."""

import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

MAX_TOKENS = 64
MAX_CHARS = 400


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "tokenizer.json")
        self.tokenizer = Tokenizer.from_file(path)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=MAX_TOKENS)
        self.tokenizer.enable_truncation(MAX_TOKENS)

    def _tokenize(self, prompts: np.ndarray):
        texts = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in prompts.reshape(-1)]
        if any(not t.strip() for t in texts):
            raise ValueError("empty prompt")
        if any(len(t) > MAX_CHARS for t in texts):
            raise ValueError(f"prompt longer than {MAX_CHARS} characters")
        enc = self.tokenizer.encode_batch(texts)
        shape = prompts.shape + (MAX_TOKENS,)
        ids = np.asarray([e.ids for e in enc], np.int64).reshape(shape)
        mask = np.asarray([e.attention_mask for e in enc], np.int64).reshape(shape)
        return ids, mask

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
