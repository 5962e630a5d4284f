"""Multi-layer perceptron over flattened inputs (GLC's MNIST/Twitter-style network)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class MLP(nn.Module):
    """``Flatten → [Linear → ReLU]* → Linear``.

    Initialised as GLC's code does: weights ~ N(0, 1/fan_in), zero biases.
    """

    def __init__(self, input_shape, num_classes: int, hidden=(128, 128), dropout: float = 0.0):
        super().__init__()
        sizes = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(m.in_features))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
