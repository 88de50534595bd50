"""Tree drafts (ngram.branches > 1): several n-gram candidates verified in one target pass, strict greedy only.
The output stays the target's greedy output token for token, and the tree's attention mask gives every drafted
token the logits of a plain forward over its own path."""

from __future__ import annotations

import pytest
import torch

import cmsd.decode
from cmsd import ControlSettings, DecodeSettings, Decoder, LoadedModel, ModelPair, NgramSettings
from cmsd.kv import HoleyState
from cmsd.verify import verify_tree
from tests.tiny import UNCAPPED, greedy_reference, repetitive_prompts, tiny_bart, tiny_llama

NEW = 24
TREES = ((2, 6, 0.0), (3, 10, 0.0), (4, 12, 0.15))  # branches, tree_tokens, tree_min_p


def _pair(target) -> ModelPair:
    return ModelPair(LoadedModel("target", target, None), "ngram")


def _settings(branches: int, tree_tokens: int, min_p: float, batch: int, method: str = "cmasd") -> DecodeSettings:
    ngram = NgramSettings(max_ngram=4, branches=branches, tree_tokens=tree_tokens, tree_min_p=min_p)
    return DecodeSettings(verify_tokens=UNCAPPED, method=method, verify="strict", max_new_tokens=NEW, batch_size=batch,
                          control=ControlSettings(k=4, k_min=2, k_max=6), ngram=ngram)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_strict_equals_greedy(seed: int, monkeypatch) -> None:
    target = tiny_llama(seed=seed)
    prompts = repetitive_prompts(seed, 8)
    expected = [greedy_reference(target, p, NEW) for p in prompts]
    counts = {"accepted": 0, "off_first_branch": 0}
    monkeypatch.setattr(cmsd.decode, "verify_tree", _counting(counts))
    for branches, tree_tokens, min_p in TREES:
        for batch in (1, 3, 8):
            for method in ("cmasd", "specdec"):
                settings = _settings(branches, tree_tokens, min_p, batch, method)
                gens = Decoder(_pair(target), settings).generate_ids(prompts)
                assert [g.token_ids for g in gens] == expected, f"seed={seed} {branches},{tree_tokens} {method} {batch}"
                assert all(g.stats.accepted <= g.stats.drafted for g in gens)
    assert counts["off_first_branch"] > 0 and counts["accepted"] > counts["off_first_branch"], counts


def _counting(counts: dict[str, int]):
    """verify_tree, counting accepted drafts and those that are not their parent's first child."""
    def wrapped(tokens, lengths, parents, logits):
        verdict = verify_tree(tokens, lengths, parents, logits)
        for row, (a, path) in enumerate(zip(verdict.accepted.tolist(), verdict.path.tolist())):
            for node in path[:a]:
                first = parents[row, :node + 1].tolist().index(int(parents[row, node]))
                counts["accepted"] += 1
                counts["off_first_branch"] += int(first != node)
        return verdict
    return wrapped


def test_tree_feed_gives_each_path_its_plain_logits_and_commits_one_path() -> None:
    model = tiny_llama(seed=5)
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    state = HoleyState(model, prompts, capacity=8)  # small capacity: the buffer must grow
    # row 0: pending 10, tree 11 -> 12, 13 -> 14; 15 (a second root child); row 1: 20 -> 21, 22 (siblings), 2 unused
    tokens = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 0, 0, 0]])
    parents = torch.tensor([[-1, 0, 1, 0, 3, 0], [-1, 0, 0, -1, -1, -1]])
    valid = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    logits = state.feed(tokens, valid, parents=parents)
    for row, prompt in enumerate(prompts):
        for slot in range(int(valid[row].sum())):
            path, node = [], slot
            while node >= 0:
                path, node = [int(tokens[row, node])] + path, int(parents[row, node])
            plain = model(input_ids=torch.tensor([prompt + path])).logits[0, -1]
            torch.testing.assert_close(logits[row, slot], plain, atol=1e-5, rtol=1e-5)
    keep = torch.tensor([[True, False, False, True, True, False], [True, False, True, False, False, False]])
    state.commit(keep)  # row 0 keeps 10 13 14, row 1 keeps 20 22
    logits = state.feed(torch.tensor([[30], [31]]), torch.ones(2, 1, dtype=torch.bool))
    for row, seq in enumerate([[3, 4, 5, 6, 7, 10, 13, 14, 30], [8, 9, 20, 22, 31]]):
        plain = model(input_ids=torch.tensor([seq])).logits[0, -1]
        torch.testing.assert_close(logits[row, 0], plain, atol=1e-5, rtol=1e-5)


def test_verify_tree_follows_the_target_through_any_branch() -> None:
    vocab = 8
    tokens = torch.tensor([[1, 2, 3, 4, 5]])  # root children 1, 3; 2 under 1; 4, 5 under 3
    parents = torch.tensor([[-1, 0, -1, 2, 2]])
    argmax = torch.tensor([[3, 2, 0, 5, 0, 6]])  # at the pending token, then after each drafted token
    verdict = verify_tree(tokens, torch.tensor([5]), parents, torch.nn.functional.one_hot(argmax, vocab).float())
    assert verdict.accepted.tolist() == [2] and verdict.next_token.tolist() == [6]
    assert verdict.path[0, :2].tolist() == [2, 4]  # 3, then 5 under it


def test_tree_drafts_are_refused_where_they_are_not_exact() -> None:
    tree = NgramSettings(branches=3)
    with pytest.raises(ValueError, match="strict greedy"):
        Decoder(_pair(tiny_llama()), DecodeSettings(temperature=0.7, ngram=tree))
    with pytest.raises(ValueError, match="strict greedy"):
        Decoder(_pair(tiny_llama()), DecodeSettings(method="cmasd", verify="relaxed", ngram=tree))
    with pytest.raises(ValueError, match="decoder-only"):
        Decoder(_pair(tiny_bart()), DecodeSettings(ngram=tree))
    with pytest.raises(ValueError, match="ngram.branches"):
        NgramSettings(branches=-1)


def test_a_tree_grown_over_several_feeds_gives_each_path_its_plain_logits() -> None:
    """A drafter's own cache grows a tree a depth at a time (the feature head): after a chain feed, each tree feed's
    parents index the tree's tokens fed since the last commit; every path sees the chain and its own ancestors."""
    model = tiny_llama(seed=6)
    prompts = [[3, 4, 5, 6], [8, 9, 10]]
    state = HoleyState(model, prompts, capacity=16)
    state.feed(torch.tensor([[7, 0], [11, 12]]), torch.tensor([[True, False], [True, True]]))  # a chain, uncommitted
    feeds = [  # tokens, parents (tree indices), valid: depth 1, then 2, then 3
        (torch.tensor([[20, 21], [30, 31]]), torch.tensor([[-1, -1], [-1, -1]]), torch.ones(2, 2, dtype=torch.bool)),
        (torch.tensor([[22, 23], [32, 0]]), torch.tensor([[0, 0], [1, -1]]),
         torch.tensor([[True, True], [True, False]])),
        (torch.tensor([[24], [33]]), torch.tensor([[3], [2]]), torch.ones(2, 1, dtype=torch.bool)),
    ]
    logits = torch.cat([state.feed(t, v, parents=p) for t, p, v in feeds], 1)  # one feed per depth
    tokens, parents, valid = (torch.cat(parts, 1) for parts in zip(*feeds))
    chains = [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]
    for row, chain in enumerate(chains):
        for slot in range(tokens.shape[1]):
            if not valid[row, slot]:
                continue
            path, node = [], slot
            while node >= 0:
                path, node = [int(tokens[row, node])] + path, int(parents[row, node])
            plain = model(input_ids=torch.tensor([chain + path])).logits[0, -1]
            torch.testing.assert_close(logits[row, slot], plain, atol=1e-5, rtol=1e-5)
    state.commit(torch.tensor([1, 2]))  # the chain stays, the tree goes
    logits = state.feed(torch.tensor([[40], [41]]), torch.ones(2, 1, dtype=torch.bool))
    for row, chain in enumerate(chains):
        plain = model(input_ids=torch.tensor([chain + [40 + row]])).logits[0, -1]
        torch.testing.assert_close(logits[row, 0], plain, atol=1e-5, rtol=1e-5)
