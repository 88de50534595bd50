"""The feature head (cmsd.drafters.head; trained by cmsd.train.head): strict decoding with it is the target's greedy
output token for token, at every batch size and method; sampling and the relaxed rules run with it; its drafts are
accepted and rolled back; a head is a directory that loads for its own target only. On the real model:
tests/cmsd/test_real_model.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cmsd.decode
from cmsd import ControlSettings, DecodeSettings, Decoder, HeadSettings, LoadedModel, ModelError, ModelPair
from cmsd.drafters.head import FeatureHead, HeadError, load_head
from cmsd.train.data import draft_vocabulary, teacher_targets
from cmsd.train.head import evaluate_head, save_head, train_head
from cmsd.train.loop import DistillSettings
from tests.cmsd.test_tree import _counting
from tests.tiny import UNCAPPED, greedy_reference, random_prompts, repetitive_prompts, tiny_bart, tiny_llama

NEW = 16


def _pair(target, head) -> ModelPair:
    return ModelPair(LoadedModel("target", target, None), head)


def _trained_head(target, seed: int = 0, steps: int = 40) -> FeatureHead:
    """A head trained a little on the target's own features of repetitive prompts (its drafts are accepted)."""
    torch.manual_seed(seed)
    seqs = [torch.tensor(p + greedy_reference(target, p, NEW)) for p in repetitive_prompts(seed + 10, 12)]
    data = teacher_targets(target, [s.tolist() for s in seqs], [len(s) - NEW for s in seqs], 4, features=True)
    head = FeatureHead(target, 1, draft_vocabulary(data, 0, target.config.vocab_size, set()))
    train_head(head, data, DistillSettings(steps=steps, batch_tokens=512, lr=3e-3, warmup=2))
    return head.eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_strict_with_a_head_equals_greedy(seed: int) -> None:
    target = tiny_llama(seed=seed)
    prompts = random_prompts(seed, 6) + repetitive_prompts(seed, 4)
    expected = [greedy_reference(target, p, NEW) for p in prompts]
    heads = {"untrained": FeatureHead(target, 1).eval(), "trained": _trained_head(target, seed)}
    for name, head in heads.items():
        for method in ("specdec", "adaptive-k", "cmasd", "cmasd+margin"):
            for batch, k_max, continuous in ((1, 2, True), (3, 5, False), (8, 8, True)):
                control = ControlSettings(k=min(k_max, 4), k_max=k_max, k_min=1)
                settings = DecodeSettings(verify_tokens=UNCAPPED, method=method, verify="strict", max_new_tokens=NEW,
                                          batch_size=batch, control=control, continuous=continuous)
                got = [g.token_ids for g in Decoder(_pair(target, head), settings).generate_ids(prompts)]
                assert got == expected, f"seed={seed} head={name} {method} batch={batch} k_max={k_max}"


@pytest.mark.parametrize("seed", [0, 1])
def test_head_trees_equal_greedy(seed: int, monkeypatch) -> None:
    """Trees from the head's q (EAGLE-2): the target's greedy output at every batch size, tree shape and cost cut,
    with drafts accepted off the head's first choice."""
    target = tiny_llama(seed=seed)
    prompts = random_prompts(seed, 4) + repetitive_prompts(seed, 6)
    expected = [greedy_reference(target, p, NEW) for p in prompts]
    counts = {"accepted": 0, "off_first_branch": 0}
    monkeypatch.setattr(cmsd.decode, "verify_tree", _counting(counts))
    heads = {"untrained": FeatureHead(target, 1).eval(), "trained": _trained_head(target, seed)}
    for name, head in heads.items():
        for branches, depth, tree_tokens, min_p in ((2, 3, 4, 0.1), (3, 4, 10, 0.0), (4, 2, 6, 0.3)):
            for batch, costs in ((1, None), (1, (1.0, 1.02, 1.05, 1.1, 1.3, 1.6)), (3, None), (8, None)):
                tree = HeadSettings(branches=branches, depth=depth, tree_tokens=tree_tokens, tree_min_p=min_p)
                settings = DecodeSettings(verify_tokens=UNCAPPED, method="cmasd", max_new_tokens=NEW,
                                          batch_size=batch, head=tree)
                decoder = Decoder(_pair(target, head), settings)
                decoder.costs = costs
                gens = decoder.generate_ids(prompts)
                assert decoder.tree and [g.token_ids for g in gens] == expected, \
                    f"seed={seed} head={name} {tree} batch={batch} costs={costs}"
                assert all(g.stats.accepted <= g.stats.drafted for g in gens)
    assert counts["off_first_branch"] > 0 and counts["accepted"] > counts["off_first_branch"], counts


def test_a_trained_head_is_accepted_and_traced() -> None:
    target = tiny_llama(seed=0)
    head = _trained_head(target)
    prompts = repetitive_prompts(99, 4)
    held = teacher_targets(target, [p + greedy_reference(target, p, NEW) for p in prompts],
                           [len(p) for p in prompts], 4, features=True)
    untrained = evaluate_head(FeatureHead(target, 1, head.vocab), held)
    assert evaluate_head(head, held).kl < untrained.kl  # training moved q towards the target on unseen prompts
    settings = DecodeSettings(verify_tokens=UNCAPPED, method="specdec", max_new_tokens=NEW, batch_size=2,
                              head=HeadSettings(tree_min_p=0.0))  # a tree of every path: this head's q is diffuse
    gens = Decoder(_pair(target, head), settings).generate_ids(prompts)
    drafted, accepted = sum(g.stats.drafted for g in gens), sum(g.stats.accepted for g in gens)
    assert 0 < accepted < drafted and sum(g.stats.rollbacks for g in gens) > 0  # acceptance and rollback both run
    assert all(g.trace is not None and len(g.trace["c"]) == g.stats.drafted for g in gens)


@pytest.mark.parametrize("method, verify, temperature", [
    ("specdec", "strict", 0.8), ("cmasd", "relaxed", 0.0), ("margin", "relaxed", 0.0),
    ("cmasd+margin", "relaxed", 0.0), ("cmasd", "strict", 1.0)])
def test_sampling_and_relaxed_rules_run_with_a_head(method: str, verify: str, temperature: float) -> None:
    target = tiny_llama(seed=2)
    head = _trained_head(target, 2, steps=20)
    prompts = random_prompts(2, 5)
    settings = DecodeSettings(verify_tokens=UNCAPPED, method=method, verify=verify, temperature=temperature,
                              max_new_tokens=NEW, batch_size=3)
    gens = Decoder(_pair(target, head), settings).generate_ids(prompts)
    assert all(g.stats.new_tokens == NEW and len(g.token_ids) == NEW for g in gens)
    assert sum(g.stats.drafted for g in gens) > 0
    again = Decoder(_pair(target, head), settings).generate_ids(prompts)  # seeded: reproducible
    assert [g.token_ids for g in again] == [g.token_ids for g in gens]


def test_a_head_directory_loads_for_its_target_only(tmp_path: Path) -> None:
    target = tiny_llama(seed=0)
    head = _trained_head(target, steps=5)
    save_head(head, tmp_path / "head", "tiny-0", {"note": "test"}, "# card\n")
    loaded = load_head(tmp_path / "head", target)
    assert torch.equal(loaded.vocab, head.vocab) and loaded.info.target == "tiny-0"
    prompts = random_prompts(5, 3)
    settings = DecodeSettings(verify_tokens=UNCAPPED, method="cmasd", max_new_tokens=NEW, batch_size=3)
    assert [g.token_ids for g in Decoder(_pair(target, loaded), settings).generate_ids(prompts)] == \
        [greedy_reference(target, p, NEW) for p in prompts]
    with pytest.raises(HeadError, match="trained for target 'tiny-0'"):
        load_head(tmp_path / "head", tiny_llama(seed=7))
    with pytest.raises(ModelError, match="decoder-only"):
        FeatureHead(tiny_bart(seed=0), 1)
