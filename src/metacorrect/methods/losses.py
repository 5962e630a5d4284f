"""Loss-corrected objectives. ``T[i, j] = P(noisy=j | true=i)`` throughout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# q = P(noisy label | x) can underflow in float32 only when a logit gap exceeds ~87; the floor
# keeps the log finite there (GLC's code has no floor and would return inf).
_TINY = 1e-12


def forward_corrected_loss(logits: torch.Tensor, targets: torch.Tensor, T: torch.Tensor,
                           reduction: str = "mean") -> torch.Tensor:
    """Forward correction (Patrini et al. 2017): ``−log((softmax(z)·T)[ỹ])``.

    Written as ``−log Σ_k p_k T[k, ỹ]`` so that the gradient with respect to every entry of
    ``T`` — zeros included — is finite (MLC grows T from the identity).
    """
    probs = F.softmax(logits, dim=1)
    q = (probs * T.t()[targets]).sum(1)
    loss = -torch.log(q.clamp_min(_TINY))
    return loss.mean() if reduction == "mean" else loss


def logit_corrected_loss(logits: torch.Tensor, targets: torch.Tensor, T: torch.Tensor,
                         reduction: str = "mean") -> torch.Tensor:
    """The MLC released code's variant: cross-entropy of the transformed logits ``z·T``."""
    return F.cross_entropy(logits @ T, targets, reduction=reduction)


CORRECTED_LOSSES = {"probs": forward_corrected_loss, "logits": logit_corrected_loss}
