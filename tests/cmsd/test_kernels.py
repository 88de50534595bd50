"""The CPU cost-aware parts: the small-row linear and the measured forward costs (cmsd.kernels), the verify-token
budget they set, the tree's cost-aware cut and the automatic tree."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from cmsd import ConfidenceSettings, DecodeSettings, Decoder, LoadedModel, ModelPair, NgramSettings
from cmsd import kernels
from cmsd.decode import pass_budget
from cmsd.drafters.base import Sampler
from cmsd.drafters.ngram import NgramTreeDrafter
from cmsd.kernels import decode_kernels, forward_costs, linear, small_row_counts
from tests.tiny import (UNCAPPED, ModelledCosts, greedy_reference, random_prompts, repetitive_prompts, timed_by,
                        tiny_bart, tiny_llama)


@pytest.mark.parametrize("bias", [False, True])
def test_small_row_linear_is_the_linear_product(bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(48, 200, bias=bias)
    for shape in [(0, 48), (1, 48), (2, 48), (3, 48), (1, 3, 48), (2, 4, 48), (9, 48), (2, 7, 48)]:
        x = torch.randn(*shape, generator=g)
        got = linear(x, layer.weight, layer.bias)
        assert got.shape == (*shape[:-1], 200) and got.is_contiguous()
        torch.testing.assert_close(got, nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_small_row_counts_follow_the_timings_and_are_measured_once_per_model() -> None:
    """Modelled timings: (W @ x.T).T takes half of torch's time for 2 and 3 rows, the same for the others. Exactly 2
    and 3 use it; a clear case (a 2x ratio) stops after two rounds, a close one takes all three; cached per model."""
    model, costs = tiny_llama(), ModelledCosts(faster_rows=frozenset({2, 3}))
    with timed_by(costs):
        counts = small_row_counts(model, 8)
        assert counts == {2, 3} and small_row_counts(model, 8) is counts  # cached, not timed again
    calls = [sum(1 for what in costs.calls if what[1] == n) for n in range(1, 9)]
    layers = sum(1 for m in model.modules() if type(m) is nn.Linear)
    assert layers > 0 and calls == [7, 5, 5, 7, 7, 7, 7, 7]  # warm-up + rounds x both products, one call a pass
    assert small_row_counts(model, 0) == frozenset()


def test_the_wall_clock_measures_a_real_model_pass() -> None:
    """The wall clock's own path (the rest of the suite uses modelled costs): real timings of a tiny model give a
    well-formed result; what it is depends on the machine, so only its shape is asserted."""
    model = tiny_llama(seed=2)
    with timed_by(kernels.wall_clock):
        costs, counts = forward_costs(model, 4), small_row_counts(model, 4)
    assert len(costs) == 4 and costs[0] == 1.0 and all(c > 0 for c in costs) and counts <= {1, 2, 3, 4}


def test_wall_clock_measurements_are_kept_on_disk_per_machine_and_model(tmp_path, monkeypatch) -> None:
    """A measurement timed by the wall clock is written to $CMSD_CACHE/kernels and read back by the next process
    (here: the in-process cache emptied and the timing made to fail), for the same model only."""
    monkeypatch.setenv("CMSD_CACHE", str(tmp_path))
    model = tiny_llama(seed=3)
    with timed_by(kernels.wall_clock):
        costs, counts = forward_costs(model, 3), small_row_counts(model, 3)
        assert len(list((tmp_path / "kernels").glob("*.json"))) == 2
        kernels._costs.pop(model), kernels._counts.pop(model)

        def not_again(*args):
            raise AssertionError("measured again")

        monkeypatch.setattr(kernels, "_time_forwards", not_again)
        monkeypatch.setattr(kernels, "_time_small_rows", not_again)
        assert forward_costs(model, 3) == costs and small_row_counts(model, 3) == counts
        with pytest.raises(AssertionError, match="measured again"):  # another model (other weights): its own
            forward_costs(tiny_llama(seed=4), 3)


def test_small_rows_swaps_linear_layers_only_inside_the_block() -> None:
    model = tiny_llama()
    kernels._counts[model] = {8: frozenset({2})}  # as if (W @ x.T).T had been timed faster for 2 rows
    x = torch.randn(1, 2, model.config.hidden_size)
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    with decode_kernels([model, model, None], 8):  # the same model twice (a drafter that is the target) is fine
        assert all(type(m) is not nn.Linear and m.small_rows == {2} for m in layers)
        inside = layers[0](x)
    assert all(type(m) is nn.Linear for m in layers) and not hasattr(layers[0], "small_rows")
    torch.testing.assert_close(inside, layers[0](x))
    kernels._counts[model] = {8: frozenset()}  # faster for no row count: nothing swapped
    with decode_kernels([model], 8):
        assert all(type(m) is nn.Linear for m in layers)
    with decode_kernels([model], 0):  # 0: torch's own product
        assert all(type(m) is nn.Linear for m in layers)


def test_decodes_with_the_small_row_product_equal_greedy() -> None:
    """Where (W @ x.T).T is timed faster (here: modelled, for 2 and 3 rows), a decode's 2- and 3-token passes use it
    and the output is still greedy's, at batch 1 and 3."""
    model = tiny_llama(seed=3)
    prompts = repetitive_prompts(5, 6)
    expected = [greedy_reference(model, p, 24) for p in prompts]
    with timed_by(ModelledCosts(faster_rows=frozenset({2, 3}))):
        for batch in (1, 3):
            settings = DecodeSettings(max_new_tokens=24, batch_size=batch, verify_tokens=UNCAPPED)
            gens = Decoder(_pair(model), settings).generate_ids(prompts)
            assert [g.token_ids for g in gens] == expected, batch
    assert kernels._counts[model][8] == {2, 3}  # the decodes ran with the small-row product for those rows


def test_forward_costs_are_the_fastest_timing_per_width_over_one_token() -> None:
    """A pass over n tokens timed at 1 + 0.2 (n - 1) units, its warm-up 100x and its first timed round 3x slower (a
    busy machine): the costs are the fastest timed round's, relative to one token; measured once per model; None
    for BART."""
    model, seen = tiny_llama(), {}

    def busy_then_modelled(what: tuple, work) -> float:
        work()
        seen[what[1]] = seen.get(what[1], 0) + 1  # call 1 of a width: the warm-up, call 2: the first timed round
        return (1.0 + 0.2 * (what[1] - 1)) * {1: 100.0, 2: 3.0}.get(seen[what[1]], 1.0)

    with timed_by(busy_then_modelled):
        costs = forward_costs(model, 6)
    assert costs == pytest.approx((1.0, 1.2, 1.4, 1.6, 1.8, 2.0))
    assert forward_costs(model, 6) is costs and forward_costs(tiny_bart(), 6) is None


def test_the_verify_budget_is_the_widest_pass_within_its_cost() -> None:
    assert pass_budget((1.0, 1.05, 1.15, 1.15, 1.49, 1.6), torch.device("cpu")) == 4
    assert pass_budget((1.0, 1.25, 1.28, 1.66, 1.68), torch.device("cpu")) == 3
    assert pass_budget((1.0, 2.0), torch.device("cpu")) == 1  # drafting never pays: AR
    assert pass_budget((1.0, 1.5, 1.2, 1.2), torch.device("cpu")) == 1  # the first pass over the limit ends it
    assert pass_budget(None, torch.device("cpu")) == 4 and pass_budget(None, torch.device("cuda")) == 0


def test_the_automatic_budget_follows_the_measured_costs_and_decodes_greedy() -> None:
    """With the suite's modelled costs (1 + 0.1 (n - 1) steps for n tokens) the automatic budget is 4 tokens a pass:
    one row drafts (its tree cut by the costs) and three rows decode AR (4 // 3 - 1 = 0 drafts each); a budget set
    by hand is used as it is, nothing measured. The output is greedy's every time."""
    model = tiny_llama()
    prompts = repetitive_prompts(3, 6)
    expected = [greedy_reference(model, p, 24) for p in prompts]
    for batch in (1, 3):
        decoder = Decoder(_pair(model), DecodeSettings(max_new_tokens=24, batch_size=batch))
        gens = decoder.generate_ids(prompts)
        assert [g.token_ids for g in gens] == expected
        assert decoder.costs == pytest.approx(tuple(1.0 + 0.1 * n for n in range(8))) and decoder.verify_tokens == 4
        drafted, accepted = sum(g.stats.drafted for g in gens), sum(g.stats.accepted for g in gens)
        assert (accepted > 0) if batch == 1 else (drafted == 0), (batch, drafted, accepted)
    fixed = Decoder(_pair(model), DecodeSettings(max_new_tokens=4, verify_tokens=5))  # as set: nothing measured
    fixed.generate_ids([[5, 6, 7, 5, 6]])
    assert fixed.costs is None and fixed.verify_tokens == 5


def test_the_tree_is_cut_where_another_node_costs_more_than_it_is_expected_to_give() -> None:
    """A context where the suffix [1, 2] was followed by 3 four times and by 4 once: the tree's first node (3) has an
    estimated acceptance of about 0.6, the next ones less. Flat costs keep every node, a pass of 2 tokens costing
    1.3 steps keeps the first node only if it is worth it, and a steep curve keeps none."""
    context = [1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 3, 7, 1, 2, 4, 6, 1, 2, 3, 5, 1, 2]
    ngram = NgramSettings(branches=2, tree_tokens=4, tree_min_p=0.05)

    def tree(costs):
        drafter = NgramTreeDrafter([context], 16, ngram, ConfidenceSettings(), Sampler(), torch.device("cpu"),
                                   costs=costs)
        return drafter._tree(drafter.indexes[0], 4, costs)

    _, all_nodes, _ = tree(None)
    assert len(all_nodes) == 4 and all_nodes[0] == 3
    assert tree((1.0,) * 5)[1] == all_nodes
    first = tree((1.0, 1.3, 5.0, 5.0, 5.0))[1]
    assert first == [3]
    assert tree((1.0, 3.0, 5.0, 5.0, 5.0))[1] == []


def _pair(target: nn.Module) -> ModelPair:
    return ModelPair(LoadedModel("tiny", target, None), "ngram")


def test_the_verify_budget_caps_drafts_per_row_and_turns_drafting_off_for_wide_batches() -> None:
    """A budget of 4 tokens a pass: batch 1 drafts at most 3 tokens an iteration, 4 or more rows decode AR; with no
    cap the same batch drafts. The output is the greedy output either way."""
    target = tiny_llama(seed=1)
    prompts = [p * 3 for p in random_prompts(1, 8, low=3, high=8)]  # repetitive, so the n-gram drafter drafts
    expected = [greedy_reference(target, p, 24) for p in prompts]
    runs = {}
    for batch, cap in ((1, 4), (8, 4), (8, UNCAPPED)):
        settings = DecodeSettings(method="cmasd", max_new_tokens=24, batch_size=batch, verify_tokens=cap)
        gens = Decoder(_pair(target), settings).generate_ids(prompts)
        assert [g.token_ids for g in gens] == expected, (batch, cap)
        runs[batch, cap] = gens
    per_iteration = [sum(1 for i in g.trace["iteration"] if i == it) for g in runs[1, 4]
                     for it in set(g.trace["iteration"])]
    assert per_iteration and max(per_iteration) <= 3
    assert sum(g.stats.drafted for g in runs[8, 4]) == 0
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


def test_a_timing_state_holds_the_whole_context_but_prefills_only_its_prefix() -> None:
    """What times a pass attends over the context's length of cache (its rows' masks and positions as the decode's),
    but only the first TIMING_PREFIX tokens of each prompt run through the model (their keys and values repeated)."""
    model, fed = tiny_llama(seed=1), []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        prompts = [list(range(3, 103)), list(range(3, 95))]
        state = kernels._TimingState(model, prompts, 120)
        assert fed == [kernels.TIMING_PREFIX] * 2
        assert state.mask.sum(1).tolist() == [100, 92] and state.pos.tolist() == [100, 92]
        assert {layer.get_seq_length() for layer in state.cache.layers} == {100}
        ids = torch.zeros(2, 3, dtype=torch.long)
        assert state.feed(ids, torch.ones_like(ids, dtype=torch.bool)).shape[:2] == (2, 3)
    finally:
        hook.remove()
