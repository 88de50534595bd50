"""Confidence, the controller, the n-gram kernel, the KV rollback, settings and layering."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from cmsd.confidence import confidence
from cmsd.control import Controller
from cmsd.drafters.base import Draft
from cmsd.drafters.ngram import SuffixIndex, continuation_counts
from cmsd.kv import HoleyState
from cmsd.settings import ConfidenceSettings, ControlSettings, DecodeSettings, NgramSettings
from tests.tiny import tiny_llama


def test_confidence_values_and_bounds() -> None:
    settings = ConfidenceSettings()
    uniform = confidence(torch.zeros(10), settings)
    assert torch.allclose(uniform, torch.zeros(4), atol=1e-6)  # no preference: every measure is 0
    sure = confidence(torch.tensor([50.0, 0.0, 0.0, 0.0]), settings)
    assert torch.all(sure > 0.99)
    z = torch.tensor([2.0, 1.0, 0.0])
    q = torch.softmax(z, 0)
    c_ent, c_margin, c_soft, c = confidence(z, settings).tolist()
    assert math.isclose(c_ent, 1 + float((q * q.log()).sum()) / math.log(3), rel_tol=1e-5)
    assert math.isclose(c_margin, math.tanh(1.0 / 2.0), rel_tol=1e-5)
    assert math.isclose(c_soft, float(q[0] - q[1]), rel_tol=1e-5)
    assert math.isclose(c, (c_ent + c_margin + c_soft) / 3, rel_tol=1e-5)
    random = confidence(torch.randn(100, 50) * 5, settings)
    assert random.min() >= 0 and random.max() <= 1
    only_entropy = confidence(z, ConfidenceSettings(mode="entropy"))
    assert math.isclose(float(only_entropy[3]), c_ent, rel_tol=1e-6)


def test_ngram_q_trusts_longer_matches_more() -> None:
    from cmsd.drafters.base import Sampler
    from cmsd.drafters.ngram import NgramDrafter

    drafter = NgramDrafter([[1, 2]], 100, NgramSettings(kappa=1.5), ConfidenceSettings(mode="softmax"), Sampler(),
                           torch.device("cpu"))
    short = drafter._log_q(np.array([7]), np.array([1]), 1).exp()
    long = drafter._log_q(np.array([7, 8]), np.array([9, 1]), 6).exp()
    assert math.isclose(float(short.sum()), 1.0, rel_tol=1e-5) and math.isclose(float(long.sum()), 1.0, rel_tol=1e-5)
    assert math.isclose(float(short[7]), 1 / 2.5 + 0.6 / 100, rel_tol=1e-5)
    c_short = confidence(short.log(), ConfidenceSettings(mode="softmax"))[3]
    c_long = confidence(long.log(), ConfidenceSettings(mode="softmax"))[3]
    assert c_long > c_short


def test_controller_draft_length_and_thresholds() -> None:
    control = ControlSettings(k_min=1, k_max=9, alpha=1.0, c_stop=0.3, tau_base=0.4, gamma=2.0)
    ctl = Controller(DecodeSettings(method="cmasd", verify="relaxed", control=control), 3, torch.device("cpu"))
    budget = torch.tensor([100, 100, 2])
    assert ctl.draft_lengths(budget).tolist() == [1, 1, 1]  # first iteration: k_min
    conf = torch.zeros(3, 2, 4)
    conf[0, :, 3] = 1.0
    conf[1, :, 3] = torch.tensor([0.5, 0.0])
    conf[2, :, 3] = 1.0
    ctl.observe(Draft(torch.zeros(3, 2, dtype=torch.long), torch.tensor([2, 1, 2]), conf), torch.tensor([2, 0, 1]))
    # row 0: Cbar 1 -> k_max; row 1: Cbar 0.5 -> 1 + round(4) = 5; row 2: capped by its budget
    assert ctl.draft_lengths(budget).tolist() == [9, 5, 2]
    ctl.begin_draft()
    assert ctl.keep(torch.tensor([0.29, 0.3, 0.9])).tolist() == [False, True, True]
    tau = ctl.thresholds(torch.tensor([[0.5, 1.0]]))
    assert torch.allclose(tau, torch.tensor([[0.1, 0.4]]))
    chained = Controller(DecodeSettings(method="cmasd", control=ControlSettings(chain_stop=0.5)), 2,
                         torch.device("cpu"))
    assert chained.keep(torch.tensor([0.9, 0.6])).tolist() == [True, True]
    assert chained.keep(torch.tensor([0.9, 0.6])).tolist() == [True, False]  # 0.81 stays, 0.36 < 0.5 stops
    chained.begin_draft()
    assert chained.keep(torch.tensor([0.4, 0.6])).tolist() == [False, True]
    strict = Controller(DecodeSettings(method="cmasd", verify="strict"), 1, torch.device("cpu"))
    assert strict.thresholds(torch.tensor([[0.9]])).tolist() == [[0.0]]
    fixed = Controller(DecodeSettings(method="specdec", control=ControlSettings(k=6)), 1, torch.device("cpu"))
    assert fixed.draft_lengths(torch.tensor([100])).tolist() == [6]


def test_continuation_counts_prefers_longest_suffix_then_count_then_recency() -> None:
    s = NgramSettings(max_ngram=3, min_ngram=1)
    seq = np.array([5, 6, 7, 5, 6, 8, 5, 6, 7, 9, 5, 6])
    tokens, counts, n = continuation_counts(seq, s)  # 3-gram [9, 5, 6] is new; 2-gram [5, 6] -> 7, 8, 7
    assert tokens.tolist() == [7, 8] and counts.tolist() == [2, 1] and n == 2
    assert continuation_counts(np.array([1, 2, 3, 4]), s) is None  # nothing repeats
    tokens, _, _ = continuation_counts(np.array([4, 1, 4, 2, 4]), NgramSettings(max_ngram=1))
    assert tokens.tolist() == [2, 1]  # tie: the most recent occurrence first
    assert continuation_counts(np.array([4, 1, 4]), NgramSettings(min_count=2)) is None


def test_holey_cache_after_rollback_equals_a_fresh_forward() -> None:
    model = tiny_llama(seed=5)
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    state = HoleyState(model, prompts, capacity=8)  # small capacity: the buffer must grow
    tokens = torch.tensor([[10, 11, 12, 13], [14, 15, 16, 0]])
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    state.feed(tokens, valid)
    state.commit(torch.tensor([1, 3]))  # row 0 keeps 10; row 1 keeps 14 15 16
    logits = state.feed(torch.tensor([[20], [21]]), torch.ones(2, 1, dtype=torch.bool))
    for row, seq in enumerate([[3, 4, 5, 6, 7, 10, 20], [8, 9, 14, 15, 16, 21]]):
        fresh = model(input_ids=torch.tensor([seq])).logits[0, -1]
        assert torch.allclose(logits[row, 0], fresh, atol=1e-5)


def test_settings_reject_bad_values_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        DecodeSettings(method="fast")
    with pytest.raises(ValueError, match="k_max"):
        ControlSettings(k_min=5, k_max=2)
    with pytest.raises(ValueError, match="weights must sum to 1"):
        ConfidenceSettings(weights=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="unknown setting control.kmax"):
        DecodeSettings.from_dict({"control": {"kmax": 3}})
    settings = DecodeSettings.from_dict({"method": "margin", "verify": "relaxed", "margin": {"delta": 0.2}})
    assert settings.margin.delta == 0.2 and settings.margin_rule and not settings.threshold_rule
    assert DecodeSettings.from_dict(settings.to_dict()) == settings


def test_importing_cmsd_loads_no_ray_click_or_pyarrow() -> None:
    code = "import sys, cmsd; bad = [m for m in ('ray', 'click', 'pyarrow') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _scan(seq: list[int], settings: NgramSettings) -> list[tuple[list[int], list[int], int]]:
    """The reference: a plain scan of the whole sequence for each suffix length (the drafter's former numpy code)."""
    seq, out = np.array(seq), []
    for n in range(min(settings.max_ngram, len(seq) - 1), settings.min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
        starts = np.flatnonzero((windows == seq[-n:]).all(1))
        if len(starts) < settings.min_count:
            continue
        following = seq[starts + n][::-1]  # most recent first
        tokens, first, counts = np.unique(following, return_index=True, return_counts=True)
        order = np.lexsort((first, -counts))
        out.append((tokens[order].tolist(), counts[order].tolist(), n))
    return out


def test_the_suffix_index_gives_a_scan_of_the_sequence_with_the_path_appended() -> None:
    """Built on a prefix and asked with the rest as the path (as a draft extends the sequence), or extended token by
    token: the suffix lengths, continuations, counts and tie order of a plain scan of the whole sequence."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        seq = torch.randint(0, 4 if trial % 2 else 9, (int(torch.randint(0, 60, (1,), generator=g)),),
                            generator=g).tolist()
        longest = int(torch.randint(1, 6, (1,), generator=g))
        settings = NgramSettings(max_ngram=longest, min_ngram=int(torch.randint(1, longest + 1, (1,), generator=g)),
                                 min_count=1 + trial % 3)
        cut = int(torch.randint(0, len(seq) + 1, (1,), generator=g))
        with_path = SuffixIndex(seq[:cut], settings).continuations(seq[cut:])
        grown = SuffixIndex(seq[:cut], settings)
        grown.extend(seq[cut:])
        expected = _scan(seq, settings)
        for found in (with_path, grown.continuations()):
            assert [(t.tolist(), c.tolist(), n) for t, c, n in found] == expected, (seq, cut, settings)
