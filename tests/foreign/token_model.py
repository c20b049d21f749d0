"""A two-input model as users bring them: token ids and an attention mask in, class logits out
(a per-token MLP, then the mean over the tokens the mask keeps)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

VOCAB, DIM, HIDDEN, CLASSES = 40, 16, 32, 3


class TokenClassifier(nn.Module):
    def __init__(
        self, vocab: int = VOCAB, dim: int = DIM, hidden: int = HIDDEN, classes: int = CLASSES
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(self.embed(tokens)))  # (N, L, hidden): per token
        keep = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.fc2(pooled)


def make(vocab: int = VOCAB) -> nn.Module:
    torch.manual_seed(0)
    return TokenClassifier(vocab)


def token_data(n: int = 600, length: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Sequences whose class is which third of the vocabulary most of their kept tokens come from;
    each sequence keeps a random-length prefix (the rest is padding, id 0, masked out)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    lengths = rng.integers(4, length + 1, n)
    third = (VOCAB - 1) // CLASSES
    tokens = np.zeros((n, length), dtype=np.int64)
    mask = np.zeros((n, length), dtype=np.int64)
    for i in range(n):
        own = rng.integers(1 + y[i] * third, 1 + (y[i] + 1) * third, lengths[i])
        noise = rng.integers(1, VOCAB, lengths[i])
        tokens[i, : lengths[i]] = np.where(rng.random(lengths[i]) < 0.7, own, noise)
        mask[i, : lengths[i]] = 1
    return {"tokens": tokens, "mask": mask, "y": y}
