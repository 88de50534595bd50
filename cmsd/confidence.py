"""Drafter confidence of a drafted token, each measure in [0, 1] (DESIGN.md):

    C_ent    = 1 - H(q) / log|V|
    C_margin = tanh((z(1) - z(2)) / s)
    C_soft   = q(1) - q(2)
    C        = l1 * C_ent + l2 * C_margin + l3 * C_soft
"""

from __future__ import annotations

import math

import torch

from cmsd.settings import ConfidenceSettings


def confidence(logits: torch.Tensor, settings: ConfidenceSettings) -> torch.Tensor:
    """logits: [..., V] drafter logits (-inf allowed). Returns [..., 4]: C_ent, C_margin, C_soft, C."""
    logits = logits.float()
    vocab = logits.shape[-1]
    logq = torch.log_softmax(logits, dim=-1)
    q = logq.exp()
    entropy = -(q * logq.masked_fill(q == 0, 0.0)).sum(-1)
    c_ent = (1.0 - entropy / math.log(vocab)).clamp(0.0, 1.0)
    top_z = logits.topk(2, dim=-1).values  # [..., 2]
    gap = (top_z[..., 0] - top_z[..., 1]).nan_to_num(nan=0.0, posinf=1e4)  # -inf runner-up: a sure token
    c_margin = torch.tanh(gap / settings.margin_scale)
    top_q = q.topk(2, dim=-1).values
    c_soft = top_q[..., 0] - top_q[..., 1]
    w1, w2, w3 = settings.effective_weights
    c = w1 * c_ent + w2 * c_margin + w3 * c_soft
    return torch.stack([c_ent, c_margin, c_soft, c], dim=-1)
