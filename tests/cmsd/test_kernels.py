"""The CPU cost-aware parts: the small-row linear (cmsd.kernels), the verify-token budget and the automatic tree."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from cmsd import DecodeSettings, Decoder, LoadedModel, ModelPair
from cmsd.kernels import decode_kernels, linear
from tests.tiny import UNCAPPED, greedy_reference, random_prompts, tiny_bart, tiny_llama


@pytest.mark.parametrize("bias", [False, True])
def test_small_row_linear_is_the_linear_product(bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(48, 200, bias=bias)
    for shape in [(0, 48), (1, 48), (2, 48), (3, 48), (1, 3, 48), (2, 4, 48), (9, 48), (2, 7, 48)]:
        x = torch.randn(*shape, generator=g)
        got = linear(x, layer.weight, layer.bias)
        assert got.shape == (*shape[:-1], 200) and got.is_contiguous()
        torch.testing.assert_close(got, nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_small_rows_swaps_linear_layers_only_inside_the_block() -> None:
    model = tiny_llama()
    x = torch.randn(1, 2, model.config.hidden_size)
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    with decode_kernels([model, model, None], 8):  # the same model twice (a drafter that is the target) is fine
        assert all(type(m) is not nn.Linear for m in layers)
        inside = layers[0](x)
    assert all(type(m) is nn.Linear for m in layers) and not hasattr(layers[0], "small_rows")
    torch.testing.assert_close(inside, layers[0](x))
    with decode_kernels([model], 0):  # 0: torch's own product
        assert all(type(m) is nn.Linear for m in layers)


def _pair(target: nn.Module) -> ModelPair:
    return ModelPair(LoadedModel("tiny", target, None), "ngram")


def test_the_verify_budget_caps_drafts_per_row_and_turns_drafting_off_for_wide_batches() -> None:
    """On CPU (auto budget 4 tokens a pass): batch 1 drafts at most 3 tokens an iteration, 4 or more rows decode
    AR; with no cap the same batch drafts. The output is the greedy output either way."""
    target = tiny_llama(seed=1)
    prompts = [p * 3 for p in random_prompts(1, 8, low=3, high=8)]  # repetitive, so the n-gram drafter drafts
    expected = [greedy_reference(target, p, 24) for p in prompts]
    runs = {}
    for batch, cap in ((1, 0), (8, 0), (8, UNCAPPED)):
        settings = DecodeSettings(method="cmasd", max_new_tokens=24, batch_size=batch, verify_tokens=cap)
        gens = Decoder(_pair(target), settings).generate_ids(prompts)
        assert [g.token_ids for g in gens] == expected, (batch, cap)
        runs[batch, cap] = gens
    per_iteration = [sum(1 for i in g.trace["iteration"] if i == it) for g in runs[1, 0]
                     for it in set(g.trace["iteration"])]
    assert per_iteration and max(per_iteration) <= 3
    assert sum(g.stats.drafted for g in runs[8, 0]) == 0
    assert sum(g.stats.accepted for g in runs[8, UNCAPPED]) > 0


def test_tree_drafts_are_the_default_where_they_are_exact() -> None:
    assert Decoder(_pair(tiny_llama()), DecodeSettings()).tree  # strict greedy, decoder-only: a tree
    for settings in (DecodeSettings(verify="relaxed"), DecodeSettings(temperature=0.7)):
        decoder = Decoder(_pair(tiny_llama()), settings)  # one chain, no error
        assert not decoder.tree and decoder.settings.ngram.branches == 1
    assert not Decoder(_pair(tiny_bart()), DecodeSettings()).tree


def test_packed_grouped_query_attention_gives_transformers_logits() -> None:
    """A 3-token pass of a grouped-query model over a cache with a hole and left padding: the same logits with
    decode_kernels (packed attention, small-row linears) as with transformers' own path."""
    from cmsd.kv import HoleyState

    model = tiny_llama(seed=4)  # 4 query heads on 2 key/value heads
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    prompts, new = [[5, 6, 7, 8, 9, 10], [11, 12, 13]], torch.tensor([[1, 2, 3], [4, 5, 6]])
    logits = []
    for kernels in (False, True):
        state = HoleyState(model, prompts, 32)
        state.feed(torch.tensor([[7, 7], [8, 8]]), torch.ones(2, 2, dtype=torch.bool))
        state.commit(torch.tensor([1, 0]))  # row 1 rejects both: holes
        with decode_kernels([model], 8) if kernels else contextlib.nullcontext():
            assert (model.config._attn_implementation != "sdpa") == kernels
            logits.append(state.feed(new, torch.tensor([[True, True, True], [True, True, False]])))
    assert model.config._attn_implementation == "sdpa"
    valid = torch.tensor([[True, True, True], [True, True, False]])
    torch.testing.assert_close(logits[1][valid], logits[0][valid], rtol=1e-4, atol=1e-5)
