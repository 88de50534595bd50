"""Verification rules on hand-built logits, and speculative sampling against the target's distribution."""

from __future__ import annotations

import math

import pytest
import torch

from cmsd.settings import ControlSettings, MarginSettings
from cmsd.verify import Rule, verify

STRICT = Rule()
THRESHOLD = Rule(threshold=ControlSettings(beta=2))
MARGIN = Rule(margin=MarginSettings(m=2, delta=0.1))


def _logits(*rows: list[float]) -> torch.Tensor:
    """Probabilities per verified position -> logits [1, K+1, V]."""
    return torch.tensor([rows]).log()


def test_strict_accepts_the_argmax_prefix_and_corrects() -> None:
    logits = _logits([0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6])
    v = verify(STRICT, torch.tensor([[1, 1]]), torch.tensor([2]), logits, torch.zeros(1, 2))
    assert v.accepted.tolist() == [1] and v.next_token.tolist() == [0]  # correction = argmax at position 1
    v = verify(STRICT, torch.tensor([[1, 0]]), torch.tensor([2]), logits, torch.zeros(1, 2))
    assert v.accepted.tolist() == [2] and v.next_token.tolist() == [2]  # bonus = argmax after the draft


def test_threshold_rule_accepts_within_tau_and_top_beta() -> None:
    # position 0: p1 - p(x) = 0.45 - 0.40 = 0.05; position 1: x is third (outside top-2) though close
    logits = _logits([0.45, 0.40, 0.15], [0.34, 0.33, 0.33], [0.5, 0.25, 0.25])
    draft = torch.tensor([[1, 2]])
    v = verify(THRESHOLD, draft, torch.tensor([2]), logits, torch.tensor([[0.06, 0.5]]))
    assert v.ok.tolist() == [[True, False]] and v.accepted.tolist() == [1] and v.next_token.tolist() == [0]
    v = verify(THRESHOLD, draft, torch.tensor([2]), logits, torch.tensor([[0.04, 0.5]]))  # tau below the gap
    assert v.accepted.tolist() == [0] and v.next_token.tolist() == [0]


def test_margin_rule_accepts_runner_up_only_where_target_is_indecisive() -> None:
    logits = _logits([0.48, 0.42, 0.10], [0.70, 0.20, 0.10], [0.4, 0.3, 0.3])
    v = verify(MARGIN, torch.tensor([[1, 1]]), torch.tensor([2]), logits, torch.zeros(1, 2))
    assert v.ok.tolist() == [[True, False]]  # margin 0.06 <= 0.1 accepts; margin 0.5 rejects
    v = verify(MARGIN, torch.tensor([[2, 1]]), torch.tensor([2]), logits, torch.zeros(1, 2))
    assert v.ok.tolist() == [[False, False]]  # third token: outside the top-m


def test_rows_are_verified_independently_and_only_within_their_length() -> None:
    logits = torch.cat([_logits([0.1, 0.9], [0.9, 0.1], [0.5, 0.5]), _logits([0.9, 0.1], [0.9, 0.1], [0.1, 0.9])])
    v = verify(STRICT, torch.tensor([[1, 0], [0, 0]]), torch.tensor([2, 1]), logits, torch.zeros(2, 2))
    assert v.accepted.tolist() == [2, 1]
    assert v.next_token.tolist() == [0, 0]  # row 1: bonus after its single drafted token is position 1's argmax


def test_speculative_sampling_matches_target_distribution() -> None:
    """Draft x ~ q, verify: the emitted first token must be distributed as p (chi-square, many rows at once)."""
    torch.manual_seed(0)
    vocab, rows = 6, 60000
    p = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
    q = torch.tensor([0.40, 0.05, 0.25, 0.05, 0.15, 0.10])
    g = torch.Generator().manual_seed(1)
    draft = torch.multinomial(q.expand(rows, vocab), 1, replacement=True, generator=g)  # [rows, 1]
    logits = p.log().expand(rows, 2, vocab).clone()
    v = verify(STRICT, draft, torch.ones(rows, dtype=torch.long), logits, torch.zeros(rows, 1), temperature=1.0,
               q=q.expand(rows, 1, vocab), generator=g)
    first = torch.where(v.accepted > 0, draft[:, 0], v.next_token)
    counts = torch.bincount(first, minlength=vocab).double()
    expected = p.double() * rows
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, f"chi2={chi2:.1f} (5 dof, p=0.001 critical value 20.5); counts={counts.tolist()}"
    # and the acceptance rate is the theoretical sum(min(p, q))
    assert math.isclose(float((v.accepted > 0).double().mean()), float(torch.minimum(p, q).sum()), abs_tol=0.01)


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_sampled_decoding_matches_ar_sampling_distribution(family: str) -> None:
    """End to end on a tiny vocabulary: the first two tokens of speculative sampling follow the target's law."""
    from cmsd import DecodeSettings, Decoder, LoadedModel, ModelPair
    from tests.tiny import UNCAPPED, perturbed, tiny_bart, tiny_llama

    vocab = 5
    target = (tiny_llama if family == "llama" else tiny_bart)(seed=0, vocab=vocab)
    drafter = perturbed(target, 0.5, 1)
    prompt = [3, 4, 3] if family == "llama" else [0, 3, 4]
    n = 3000
    pair = ModelPair(LoadedModel("t", target, None), LoadedModel("d", drafter, None))
    settings = DecodeSettings(verify_tokens=UNCAPPED, method="specdec", max_new_tokens=2, batch_size=n, temperature=1.0, seed=7, trace=False)
    gens = Decoder(pair, settings).generate_ids([prompt] * n)
    got = torch.tensor([g.token_ids for g in gens])  # [n, 2]
    # exact law of the first two tokens under the target
    joint = _target_joint(target, prompt, vocab)
    counts = torch.bincount(got[:, 0] * vocab + got[:, 1], minlength=vocab * vocab).double()
    expected = joint.flatten().double() * n
    keep = expected > 5
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 4.5 * math.sqrt(2 * dof), f"chi2={chi2:.1f} dof={dof}"


@torch.inference_mode()
def _target_joint(model, prompt: list[int], vocab: int) -> torch.Tensor:
    def next_probs(seq: list[int]) -> torch.Tensor:
        if model.config.is_encoder_decoder:
            dec = [model.config.decoder_start_token_id] + seq
            out = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([dec]))
        else:
            out = model(input_ids=torch.tensor([prompt + seq]))
        return torch.softmax(out.logits[0, -1].float(), -1)

    first = next_probs([])
    return torch.stack([first[a] * next_probs([a]) for a in range(vocab)])


def test_strict_sampling_over_a_pass_where_no_row_drafted_samples_from_the_target() -> None:
    """A pass of zero draft tokens (no row drafted: the n-gram drafter found nothing) samples each row's next token
    from p alone (it once indexed the empty q)."""
    logits = torch.full((3, 1, 8), -30.0)
    logits[torch.arange(3), 0, torch.tensor([2, 5, 7])] = 30.0  # p puts all its mass on one token per row
    empty = torch.zeros(3, 0, dtype=torch.long)
    verdict = verify(Rule(), empty, torch.zeros(3, dtype=torch.long), logits, torch.zeros(3, 0), temperature=0.8,
                     q=torch.zeros(3, 0, 8), generator=torch.Generator().manual_seed(0))
    assert verdict.accepted.tolist() == [0, 0, 0] and verdict.next_token.tolist() == [2, 5, 7]
