"""Strict verification reproduces the target's greedy output token for token (the first test of the project)."""

from __future__ import annotations

import pytest

from cmsd import ControlSettings, DecodeSettings, Decoder, LoadedModel, ModelPair
from tests.tiny import UNCAPPED, greedy_reference, perturbed, random_prompts, tiny_bart, tiny_llama

NEW = 16
FAMILIES = {"llama": tiny_llama, "bart": tiny_bart}


def _pair(target, drafter) -> ModelPair:
    return ModelPair(LoadedModel("target", target, None),
                     drafter if isinstance(drafter, str) else LoadedModel("drafter", drafter, None))


def _drafters(family: str, target, seed: int) -> dict:
    other = FAMILIES[family](seed=seed + 100)
    return {"ngram": "ngram", "itself": target, "perturbed": perturbed(target, 0.004, seed), "random": other}


@pytest.mark.parametrize("family", ["llama", "bart"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_strict_equals_greedy(family: str, seed: int) -> None:
    target = FAMILIES[family](seed=seed)
    prompts = random_prompts(seed, 8)
    expected = [greedy_reference(target, p, NEW) for p in prompts]
    for name, drafter in _drafters(family, target, seed).items():
        for method in ("specdec", "adaptive-k", "cmasd", "cmasd+margin"):
            for batch, k_max in ((1, 1 + seed), (3, 4 + seed), (8, 8)):
                control = ControlSettings(k=min(k_max, 4), k_max=k_max, k_min=1)
                settings = DecodeSettings(verify_tokens=UNCAPPED, method=method, verify="strict", max_new_tokens=NEW, batch_size=batch,
                                          control=control)
                gens = Decoder(_pair(target, drafter), settings).generate_ids(prompts)
                got = [g.token_ids for g in gens]
                assert got == expected, f"{family} seed={seed} drafter={name} {method} batch={batch} k_max={k_max}"


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_drafts_are_actually_accepted(family: str) -> None:
    """The exactness test must exercise acceptance and rollback, not only AR steps."""
    target = FAMILIES[family](seed=0)
    prompts = random_prompts(0, 6)
    for drafter, low, high in (("itself", 0.99, 1.0), ("perturbed", 0.05, 0.99)):
        model = target if drafter == "itself" else perturbed(target, 0.004, 0)
        settings = DecodeSettings(verify_tokens=UNCAPPED, method="specdec", max_new_tokens=NEW, batch_size=3)
        gens = Decoder(_pair(target, model), settings).generate_ids(prompts)
        drafted = sum(g.stats.drafted for g in gens)
        accepted = sum(g.stats.accepted for g in gens)
        assert drafted > 0 and low <= accepted / drafted <= high, (drafter, accepted, drafted)
        if drafter == "perturbed":
            assert sum(g.stats.rollbacks for g in gens) > 0


def test_ar_method_matches_greedy_and_counts() -> None:
    target = tiny_llama(seed=3)
    prompts = random_prompts(3, 5)
    gens = Decoder(_pair(target, "ngram"), DecodeSettings(method="ar", max_new_tokens=NEW, batch_size=2)).generate_ids(prompts)
    for gen, prompt in zip(gens, prompts):
        assert gen.token_ids == greedy_reference(target, prompt, NEW)
        assert gen.stats.target_calls == NEW and gen.stats.drafted == 0 and gen.stats.new_tokens == NEW


def test_eos_and_budget_are_honoured() -> None:
    target = tiny_llama(seed=4)
    prompts = random_prompts(4, 4)
    free = [greedy_reference(target, p, NEW) for p in prompts]
    eos = free[0][5]  # make a token the greedy output emits into EOS
    target.generation_config.eos_token_id = eos
    gens = Decoder(_pair(target, "ngram"), DecodeSettings(verify_tokens=UNCAPPED, method="cmasd", max_new_tokens=NEW, batch_size=4)).generate_ids(prompts)
    for gen, ref in zip(gens, free):
        cut = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert gen.token_ids == cut
        assert gen.finish_reason == ("eos" if eos in ref else "length")
        assert gen.stats.new_tokens == len(cut)
