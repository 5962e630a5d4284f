"""Networks by name: ``create_model(name, input_shape, num_classes)``.

One registry serves the API, the CLI (``--model``) and sweep configs (timm's pattern).
Every model maps a batch of inputs to ``num_classes`` logits and re-initialises itself with
``reset_parameters()`` (methods that retrain from scratch call it).
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .mlp import MLP
from .resnet50 import ResNet50, load_init_weights
from .cnn import LeNet, ResNet, WideResNet
from .text import WindowMLP, WordAveraging

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


@register_model("mlp")
def _mlp(input_shape, num_classes, hidden=(128, 128), **kw):
    """GLC's MNIST network: 784-128-128-C with ReLU (input flattened)."""
    return MLP(input_shape, num_classes, hidden=hidden, **kw)


@register_model("linear")
def _linear(input_shape, num_classes, **kw):
    return MLP(input_shape, num_classes, hidden=(), **kw)


@register_model("lenet")
def _lenet(input_shape, num_classes, **kw):
    return LeNet(input_shape, num_classes, **kw)


@register_model("resnet8")
def _resnet8(input_shape, num_classes, **kw):
    """A small ResNet with BatchNorm (3 stages of one basic block, widths 16-32-64)."""
    return ResNet(input_shape, num_classes, blocks=(1, 1, 1), widths=(16, 32, 64), **kw)


@register_model("resnet20")
def _resnet20(input_shape, num_classes, **kw):
    return ResNet(input_shape, num_classes, blocks=(3, 3, 3), widths=(16, 32, 64), **kw)


@register_model("wrn40_2")
def _wrn40_2(input_shape, num_classes, **kw):
    """WRN-40-2, GLC's CIFAR network (dropout 0.3 as in GLC's code is an option: ``dropout``)."""
    return WideResNet(input_shape, num_classes, depth=40, widen=2, **kw)


@register_model("wrn16_2")
def _wrn16_2(input_shape, num_classes, **kw):
    return WideResNet(input_shape, num_classes, depth=16, widen=2, **kw)


@register_model("resnet50")
def _resnet50(input_shape, num_classes, **kw):
    """ResNet-50 with torchvision's parameter names (Clothing1M's usual network; ImageNet
    weights from a file with ``--init-weights``)."""
    return ResNet50(input_shape, num_classes, **kw)


@register_model("word_avg")
def _word_avg(input_shape, num_classes, vocab_size=None, **kw):
    """GLC's SST model: mean of word embeddings, then a linear layer (token ids, 0 = pad)."""
    return WordAveraging(num_classes, vocab_size=vocab_size, **kw)


@register_model("window_mlp")
def _window_mlp(input_shape, num_classes, vocab_size=None, **kw):
    """GLC's Twitter model: an MLP over the features of a ±1-token window (feature ids)."""
    return WindowMLP(input_shape, num_classes, vocab_size=vocab_size, **kw)


def model_names() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, input_shape, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model for inputs of ``input_shape`` (one example) and
    ``num_classes`` outputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(model_names())}")
    return MODELS[name](tuple(input_shape), int(num_classes), **kwargs)


__all__ = ["MODELS", "create_model", "model_names", "register_model", "MLP", "LeNet", "ResNet", "ResNet50",
           "WideResNet", "WordAveraging", "WindowMLP", "load_init_weights"]
