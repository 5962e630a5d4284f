"""Text models over integer token / feature ids (0 = padding)."""

from __future__ import annotations

import torch
import torch.nn as nn


def _need_vocab(vocab_size):
    if not vocab_size:
        raise ValueError("text models need vocab_size (the dataset's vocabulary size, dataset.extra['vocab_size'])")
    return int(vocab_size)


class WordAveraging(nn.Module):
    """Mean of the word embeddings of a sentence, then a linear layer (GLC's SST model)."""

    def __init__(self, num_classes: int, vocab_size=None, embed_dim: int = 100):
        super().__init__()
        self.embed = nn.EmbeddingBag(_need_vocab(vocab_size), embed_dim, mode="sum", padding_idx=0)
        self.fc = nn.Linear(embed_dim, num_classes)

    def reset_parameters(self):
        self.embed.reset_parameters()
        self.fc.reset_parameters()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        lengths = (tokens != 0).sum(1, keepdim=True).clamp_min(1)
        return self.fc(self.embed(tokens) / lengths)


class WindowMLP(nn.Module):
    """An MLP over the summed feature embeddings of each position of a token window.

    Input: LongTensor N×K of feature ids (0 = padding). Features of all positions share one
    table; position is encoded in the ids themselves by the dataset.
    """

    def __init__(self, input_shape, num_classes: int, vocab_size=None, embed_dim: int = 64, hidden: int = 256):
        super().__init__()
        self.embed = nn.EmbeddingBag(_need_vocab(vocab_size), embed_dim, mode="sum", padding_idx=0)
        self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def reset_parameters(self):
        self.embed.reset_parameters()
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(feats))
