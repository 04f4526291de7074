"""all-MiniLM-L6-v2 as a torch module: the encoder, then mean pooling, then L2 normalisation."""

from __future__ import annotations

from pathlib import Path

import torch


class SentenceEmbedding(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def load(model_dir: Path) -> SentenceEmbedding:
    from transformers import AutoModel

    return SentenceEmbedding(AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")).eval()
