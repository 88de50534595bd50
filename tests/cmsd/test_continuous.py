"""Continuous batching: a finished row's place goes to the next document at once, and strict output stays greedy's.

The documents end (EOS) anywhere from the first few tokens to the budget, so rows finish at very different
iterations and are refilled while the others keep decoding.
"""

from __future__ import annotations

from collections import Counter

import pytest

from cmsd import ControlSettings, DecodeSettings, Decoder, LoadedModel, ModelPair
from cmsd.settings import SpecBoundSettings
from tests.tiny import UNCAPPED, greedy_reference, perturbed, random_prompts, tiny_bart, tiny_llama

NEW = 24
FAMILIES = {"llama": tiny_llama, "bart": lambda seed: tiny_bart(seed, init_std=0.3)}


def _with_early_eos(model, prompts: list[list[int]]) -> list[list[int]]:
    """Make up to three tokens of the greedy outputs EOS, chosen so that the outputs end at as many different
    lengths as possible; returns the greedy outputs cut at them (some rows end after a few tokens, some run to the
    budget)."""
    free = [greedy_reference(model, p, NEW) for p in prompts]

    def cut(ref: list[int], eos: set[int]) -> list[int]:
        return next((ref[:i + 1] for i, t in enumerate(ref) if t in eos), ref)

    eos: set[int] = set()
    for _ in range(3):
        spread = {t: len({len(cut(ref, eos | {t})) for ref in free}) for ref in free for t in ref}
        best = max(spread, key=lambda t: (spread[t], -t))
        if eos and spread[best] <= len({len(cut(ref, eos)) for ref in free}):
            break
        eos.add(best)
    model.config.eos_token_id = model.generation_config.eos_token_id = sorted(eos)
    outputs = [cut(ref, eos) for ref in free]
    lengths = sorted(len(c) for c in outputs)
    assert lengths[0] <= NEW // 2 and lengths[-1] == NEW and len(set(lengths)) >= 4, lengths  # what the test needs
    return outputs


def _decode(target, drafter, prompts, **settings) -> tuple[list, int]:
    """The generations and the number of target forward passes they took."""
    calls = Counter()
    hook = target.register_forward_pre_hook(lambda *_: calls.update(["forward"]))
    try:
        pair = ModelPair(LoadedModel("target", target, None),
                         drafter if isinstance(drafter, (str, type(None))) else LoadedModel("drafter", drafter, None))
        gens = Decoder(pair, DecodeSettings(**{"max_new_tokens": NEW, "verify_tokens": UNCAPPED, **settings})).generate_ids(prompts)
    finally:
        hook.remove()
    return gens, calls["forward"]


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_continuous_equals_greedy_and_draining_with_fewer_passes(family: str) -> None:
    target = FAMILIES[family](seed=5)
    prompts = random_prompts(5, 14)
    expected = _with_early_eos(target, prompts)
    drafters = {"ar": None, "ngram": "ngram", "model": perturbed(target, 0.004, 5)}
    for name, drafter in drafters.items():
        for method in (("ar",) if drafter is None else ("specdec", "cmasd", "cmasd+margin")):
            for batch in (1, 3, 8):
                label = f"{family} {name} {method} batch={batch}"
                common = dict(method=method, verify="strict", batch_size=batch, control=ControlSettings(k_max=4))
                gens, passes = _decode(target, drafter, prompts, **common)
                drained, drained_passes = _decode(target, drafter, prompts, continuous=False, **common)
                assert [g.token_ids for g in gens] == expected, label
                assert [g.token_ids for g in drained] == expected, label
                assert [g.finish_reason for g in gens] == [g.finish_reason for g in drained], label
                if batch > 1 and method == "ar":  # refilled rows: fewer, fuller passes than draining batches
                    assert passes < drained_passes, (label, passes, drained_passes)


def test_continuous_specbound_and_tree_equal_greedy(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CMSD_CACHE", str(tmp_path))
    target = tiny_llama(seed=6, layers=4)
    prompts = random_prompts(6, 12)
    expected = _with_early_eos(target, prompts)
    for batch in (1, 3, 8):
        specbound = SpecBoundSettings(exit_layer=2, bound=0.0, bound_min=0.0)
        gens, _ = _decode(target, "self", prompts, method="specbound", batch_size=batch, specbound=specbound,
                          control=ControlSettings(k_max=5))
        assert [g.token_ids for g in gens] == expected, f"specbound batch={batch}"
        tree, _ = _decode(target, "ngram", prompts, method="cmasd", batch_size=batch)  # branches auto: a tree
        assert [g.token_ids for g in tree] == expected, f"tree batch={batch}"


def test_sampling_continues_across_refilled_rows() -> None:
    """Sampling is exact per token whatever the batch holds; here: it runs, every document gets its budget or EOS,
    and the same seed gives the same outputs."""
    target = tiny_llama(seed=7)
    prompts = random_prompts(7, 9)
    _with_early_eos(target, prompts)
    runs = [_decode(target, perturbed(target, 0.004, 7), prompts, method="specdec", temperature=1.0, seed=3,
                    batch_size=3)[0] for _ in range(2)]
    assert [g.token_ids for g in runs[0]] == [g.token_ids for g in runs[1]]
    eos = target.generation_config.eos_token_id
    assert all(g.token_ids[-1] in eos or len(g.token_ids) == NEW for g in runs[0])


def test_progress_is_per_document() -> None:
    target = tiny_llama(seed=8)
    prompts = random_prompts(8, 10)
    _with_early_eos(target, prompts)
    ticks: list[int] = []
    pair = ModelPair(LoadedModel("target", target, None), None)
    gens = Decoder(pair, DecodeSettings(method="ar", max_new_tokens=NEW, batch_size=4)).generate_ids(
        prompts, progress=ticks.append)
    assert sum(ticks) == len(prompts) and len(ticks) > len(prompts) // 4  # documents, not batches
    assert all(g.stats.decode_s > 0 and g.stats.latency_s > 0 for g in gens)


def test_encoder_decoder_positions_are_the_rows_own_not_the_slots() -> None:
    """Rolled-back drafts leave holes: after a few iterations a batch's cache has more slots than the decoder has
    positions (40 here), and every row's positions must still be its own count of tokens."""
    target = tiny_bart(5, init_std=0.3, positions=40)
    prompts = random_prompts(5, 6, low=2, high=12)
    expected = [greedy_reference(target, p, 16) for p in prompts]
    gens, _ = _decode(target, perturbed(target, 0.02, 5), prompts, method="specdec", batch_size=3,
                      control=ControlSettings(k=4, k_max=4), max_new_tokens=16)
    assert [g.token_ids for g in gens] == expected
