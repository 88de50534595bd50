"""SpecBound's calibration fit (`cmsd-jobs calibrate`): per exit layer, the temperature that calibrates the exit's
confidence against its agreement with the final layer, and the exit layer and k that calibration predicts best.
The result, a cmsd.drafters.selfspec.Calibration, is stored beside the model, where SelfSpecPlan reads it."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask

from cmsd.drafters.selfspec import (Calibration, LayerCalibration, calibration_path, check_self_draftable,
                                    predicted_speedup)


def _ece(conf: torch.Tensor, correct: torch.Tensor, bins: int = 10) -> tuple[float, list[list[float]]]:
    edges = torch.linspace(0, 1, bins + 1)
    index = torch.bucketize(conf.contiguous(), edges[1:-1])
    ece, table = 0.0, []
    for b in range(bins):
        sel = index == b
        if sel.any():
            c, a, n = float(conf[sel].mean()), float(correct[sel].float().mean()), int(sel.sum())
            ece += n / len(conf) * abs(c - a)
            table.append([c, a, float(n)])
    return ece, table


@torch.inference_mode()
def exit_statistics(model: PreTrainedModel, prompts: list[list[int]], max_tokens: int = 256
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per exit layer l in [1, N): (exit logits' top-2 gap data) -> returns {l: (logits [T, V] sampled rows,
    agree [T])} collected by teacher forcing over the prompts (truncated to max_tokens)."""
    check_self_draftable(model)
    body, n_layers = model.model, model.config.num_hidden_layers
    out: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {l: ([], []) for l in range(1, n_layers)}
    for prompt in prompts:
        ids = torch.tensor([prompt[:max_tokens]], device=model.device)
        positions = torch.arange(ids.shape[1], device=model.device)[None]
        hidden = body.embed_tokens(ids)
        mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None,
                                  past_key_values=None, position_ids=positions)
        rotary = body.rotary_emb(hidden, position_ids=positions)
        exits = []
        for layer in body.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
            exits.append(hidden)
        final = model.lm_head(body.norm(exits[-1]))[0].argmax(-1)
        for l in range(1, n_layers):
            z = model.lm_head(body.norm(exits[l - 1]))[0].float()  # the exit after l layers
            out[l][0].append(z.topk(64, dim=-1).values)  # enough of the head of each distribution to fit T
            out[l][1].append(z.argmax(-1) == final)
    return {l: (torch.cat(z), torch.cat(a)) for l, (z, a) in out.items()}


def _max_prob(top_logits: torch.Tensor, temperature: float, vocab: int) -> torch.Tensor:
    """Max softmax probability from the top-64 logits, the other V - 64 bounded by the 64th (an upper bound on
    their mass, tight enough for calibration)."""
    z = top_logits / temperature
    rest = z[:, -1:] + math.log(max(vocab - z.shape[1], 1))
    return torch.softmax(torch.cat([z, rest], 1), 1)[:, 0]


def calibrate(model: PreTrainedModel, prompts: list[list[int]], name: str, k_max: int = 8,
              max_tokens: int = 256) -> Calibration:
    """Fit a temperature per exit layer (grid search minimising ECE of the exit's max probability against its
    agreement with the final layer), then pick the exit layer and k that maximise predicted tokens per compute."""
    n_layers, vocab = model.config.num_hidden_layers, model.config.vocab_size
    grid = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0, 10.0]
    layers = []
    for l, (top, agree) in exit_statistics(model, prompts, max_tokens).items():
        before, _ = _ece(_max_prob(top, 1.0, vocab), agree)
        scores = [(_ece(_max_prob(top, t, vocab), agree)[0], t) for t in grid]
        after, best = min(scores)
        _, table = _ece(_max_prob(top, best, vocab), agree)
        layers.append(LayerCalibration(l, float(agree.float().mean()), best, before, after, table))
    best = max(((predicted_speedup(c.agreement, c.layer, n_layers, k), c.layer, k)
                for c in layers for k in range(1, k_max + 1)))
    tokens = int(sum(min(len(p), max_tokens) for p in prompts))
    return Calibration(name, layers, exit_layer=best[1], k=best[2], predicted_speedup=best[0], tokens=tokens)


def fit_and_store(target, prompts: list[list[int]], name: str, k_max: int, max_tokens: int) -> tuple[Calibration, Path]:
    """`calibrate` over `prompts` (token ids) for `target` (a cmsd LoadedModel; `name` as the user named it), stored
    beside the model where `--method specbound` reads it (written whole: several processes may calibrate the same
    model). Returns the Calibration and its path."""
    cal = calibrate(target.model, prompts, name, k_max=k_max, max_tokens=max_tokens)
    path = calibration_path(target.home)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    cal.save(partial)
    partial.replace(path)
    return cal, path
