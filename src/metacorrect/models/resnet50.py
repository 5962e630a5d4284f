"""ResNet-50 (He et al., 2016) with torchvision's module and parameter names, so that a
torchvision-format state dict (``torchvision.models.resnet50().state_dict()``, e.g. the
ImageNet weights a user downloaded) loads into it with :func:`load_init_weights`.

Why not torchvision itself: the CPU build of torch this project installs has no matching
torchvision that imports, and the model is 60 lines; the names (``conv1``, ``bn1``,
``layer1.0.conv1`` … ``layer4.2.bn3``, ``layerK.0.downsample.0/1``, ``fc``) and shapes are
torchvision's (v1.5: the stride on the 3×3 convolution), checked against a state dict in
the tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .cnn import kaiming_reset


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50 for ``input_shape = (3, H, W)`` images and ``num_classes`` outputs
    (``blocks`` and ``base`` give smaller members of the family for tests)."""

    def __init__(self, input_shape, num_classes: int, blocks=(3, 4, 6, 3), base: int = 64):
        super().__init__()
        c = input_shape[0]
        self.conv1 = nn.Conv2d(c, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = base
        for i, n in enumerate(blocks):
            width = base * 2 ** i
            layers = []
            for j in range(n):
                layers.append(Bottleneck(cin, width, stride=2 if (j == 0 and i > 0) else 1))
                cin = width * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.n_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        kaiming_reset(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def load_init_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load a torchvision-format state dict from ``path`` into ``model`` (initial weights,
    e.g. ImageNet-pretrained). Every tensor must match the model's name and shape, except the
    output layer ``fc`` when the file's has another number of classes: it is left at its
    fresh initialisation (the usual fine-tuning recipe). Returns the names left out.
    Raises ``ValueError`` naming the first mismatch when the file is for another
    architecture, and ``FileNotFoundError`` / ``ValueError`` for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init-weights: no file {path} (a torchvision-format state dict saved with "
                                f"torch.save(model.state_dict(), PATH))")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"--init-weights {path}: not a readable torch state dict ({type(exc).__name__}: {exc})") \
            from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--init-weights {path}: expected a state dict (name -> tensor)")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"--init-weights {path}: the file is for another architecture: "
                         f"{len(missing)} of the model's tensors are missing (e.g. {missing[:2]}) and "
                         f"{len(unexpected)} are unknown to it (e.g. {unexpected[:2]})")
    skipped = []
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            if name.startswith("fc."):
                skipped.append(name)
                continue
            raise ValueError(f"--init-weights {path}: {name} has shape {tuple(tensor.shape)} in the file but "
                             f"{tuple(own[name].shape)} in the model: the file is for another architecture")
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return sorted(skipped)
