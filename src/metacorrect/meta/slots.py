"""Passing parameters functionally: swap a model's parameter slots for the duration of a
pass (same effect as :func:`torch.func.functional_call`, with less per-call overhead; tied
weights stay tied), and keep BatchNorm's running statistics out of the meta passes."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """Inside, BatchNorm layers in training mode normalise with batch statistics but do not
    update their running statistics (nor ``num_batches_tracked``)."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


class _ParamSlots:
    """Where each trainable parameter lives in the module tree, to swap tensors in and out."""

    def __init__(self, model: nn.Module, names: Sequence[str], params: Sequence[torch.Tensor]):
        index = {id(p): i for i, p in enumerate(params)}
        self.key = tuple(id(p) for p in params)
        self.slots: list[tuple[dict, str, int]] = []
        for module in model.modules():
            for attr, p in module._parameters.items():
                if p is not None and id(p) in index:
                    self.slots.append((module._parameters, attr, index[id(p)]))
        self.names = list(names)


@contextlib.contextmanager
def swapped_parameters(slots: _ParamSlots, tensors: Sequence[torch.Tensor]):
    """Inside, the model computes with ``tensors`` (in the order of ``slots.names``) in place of
    its parameters; every slot of a tied parameter gets the same tensor. The parameters are
    put back on exit, whatever happens."""
    saved = [(d, attr, d[attr]) for d, attr, _ in slots.slots]
    try:
        for d, attr, i in slots.slots:
            d[attr] = tensors[i]
        yield
    finally:
        for d, attr, p in saved:
            d[attr] = p
