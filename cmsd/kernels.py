"""Linear layers for the few-token forwards of speculative decoding on CPU.

A verify pass feeds each row 1 + k tokens, so a linear layer multiplies a handful of rows by its weight. torch's
x @ W.T (MKL sgemm) on CPU runs 2 or 3 rows as that many passes over the weight, so verifying 2 drafts costs about
twice a 1-token step and SmolLM2-135M's forward goes 47 ms (1 token) -> 99 ms (3 tokens) on 2 cores. The same product
computed as (W @ x.T).T streams the weight once for any small row count: the forward is then bound by reading the
weights, as it is on a GPU: with packed attention (below) 30 / 31 / 34 / 34 ms for 1 / 2 / 3 / 4 tokens
(scripts/verify_cost.py). On a GPU cuBLAS already reads the weight once for skinny products; nothing changes there.

Attention of a multi-token pass: with grouped-query attention and a mask (every verify pass: the cache has holes,
a tree has its own mask) transformers' SDPA path copies each key/value head once per query head (repeat_kv). For one
query token it instead folds the query heads of a group into the query length; `packed_sdpa` does the same for
W tokens ([B, H, W, D] -> [B, H_kv, G * W, D], the mask repeated G times), so no cache is copied.

`decode_kernels(models, rows)` turns both on for a decode (the Decoder does it for its target and drafter), and
leaves the models as they were afterwards, so other code sharing them (transformers' generate in `cmsd-jobs eval`)
runs transformers' and torch's own paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

PACKED_SDPA = "cmsd_packed_sdpa"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: int = 8) -> torch.Tensor:
    """x @ weight.T (+ bias), as (weight @ x.T).T when x has at most `rows` rows (all leading dims together) on CPU."""
    n = x.numel() // x.shape[-1]
    if n > rows or x.device.type != "cpu" or n == 0:
        return nn.functional.linear(x, weight, bias)
    flat = x.reshape(n, x.shape[-1])
    if n in (1, 3):  # MKL's skinny product is fastest on an even column count: one more (repeated) row is free
        flat = torch.cat([flat, flat[-1:]])
    out = torch.mm(weight, flat.t()).t()[:n]
    if bias is not None:
        out = out + bias
    return out.contiguous().view(*x.shape[:-1], weight.shape[0])


class SmallRowsLinear(nn.Linear):
    """nn.Linear whose forward goes through `linear` (the class is swapped in place by `decode_kernels`, which also
    sets `small_rows`)."""

    small_rows: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.small_rows)


def packed_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with a multi-token query of a grouped-query model folded onto its key/value
    heads instead of repeating them (module doc)."""
    batch, heads, width, dim = query.shape
    groups = heads // key.shape[1]
    shared_mask = attention_mask is not None and attention_mask.shape[1] == 1  # one mask for every head
    if groups == 1 or width == 1 or not shared_mask or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    packed = query.reshape(batch, key.shape[1], groups * width, dim)  # head h = kv * groups + g -> row g * W + t
    mask = attention_mask.repeat(1, 1, groups, 1)
    out = nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=dropout,
                                                     scale=scaling)
    return out.reshape(batch, heads, width, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextmanager
def decode_kernels(models: list[nn.Module | None], rows: int) -> Iterator[None]:
    """Within the block: the CPU models' nn.Linear layers fed at most `rows` rows compute (W @ x.T).T (0: never),
    and the models on transformers' SDPA attention use `packed_sdpa`."""
    models = list({id(m): m for m in models if m is not None}.values())  # a model may come twice
    layers = [m for model in models if rows > 0 and _on_cpu(model) for m in model.modules() if type(m) is nn.Linear]
    configs = [m.config for m in models if getattr(m.config, "_attn_implementation", None) == "sdpa"]
    for layer in layers:
        layer.__class__ = SmallRowsLinear
        layer.small_rows = rows
    for config in configs:
        config._attn_implementation = PACKED_SDPA
    try:
        yield
    finally:
        for layer in layers:
            layer.__class__ = nn.Linear
            del layer.small_rows
        for config in configs:
            config._attn_implementation = "sdpa"


def _on_cpu(model: nn.Module) -> bool:
    weight = next(model.parameters(), None)
    return weight is not None and weight.device.type == "cpu"
