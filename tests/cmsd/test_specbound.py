"""SpecBound: lossless self-speculation from the target's shallow layers, its cache, calibration and fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from cmsd import ControlSettings, DecodeSettings, Decoder, LoadedModel, ModelPair
from cmsd.drafters.selfspec import Calibration, LayeredState, calibration_path, predicted_speedup
from cmsd.train.calibrate import calibrate
from cmsd.settings import SpecBoundSettings
from tests.tiny import UNCAPPED, greedy_reference, random_prompts, tiny_bart, tiny_llama

NEW = 16


def _decode(target, prompts, batch: int, **specbound) -> list:
    settings = DecodeSettings(verify_tokens=UNCAPPED, method="specbound", max_new_tokens=NEW, batch_size=batch,
                              specbound=SpecBoundSettings(**specbound), control=ControlSettings(k_max=5))
    return Decoder(ModelPair(LoadedModel("tiny", target, None), "self"), settings).generate_ids(prompts)


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 4])
def test_specbound_equals_greedy(exit_layer: int, batch: int, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CMSD_CACHE", str(tmp_path))
    target = tiny_llama(seed=exit_layer, layers=4)
    prompts = random_prompts(exit_layer, 6)
    expected = [greedy_reference(target, p, NEW) for p in prompts]
    for bound in (0.0, 0.05):  # no bound: long drafts, many rejections; a bound: short drafts
        gens = _decode(target, prompts, batch, exit_layer=exit_layer, bound=bound, bound_min=0.0)
        assert [g.token_ids for g in gens] == expected
        assert bound > 0 or sum(g.stats.accepted for g in gens) > 0


def test_layered_cache_after_rollback_equals_a_fresh_forward() -> None:
    model = tiny_llama(seed=7, layers=4)
    state = LayeredState(model, [[3, 4, 5, 6], [7, 8]], capacity=6, exit_layer=2)
    state.shallow(torch.tensor([[10], [11]]), torch.ones(2, 1, dtype=torch.bool))  # a draft step...
    state.shallow(torch.tensor([[12], [13]]), torch.tensor([[True], [False]]))  # ...row 1 stopped drafting
    state.feed(torch.tensor([[10, 12], [11, 0]]), torch.tensor([[True, True], [True, False]]))
    state.commit(torch.tensor([1, 1]))  # row 0 rejects 12
    logits = state.feed(torch.tensor([[20], [21]]), torch.ones(2, 1, dtype=torch.bool))
    for row, seq in enumerate([[3, 4, 5, 6, 10, 20], [7, 8, 11, 21]]):
        fresh = model(input_ids=torch.tensor([seq])).logits[0, -1]
        assert torch.allclose(logits[row, 0], fresh, atol=1e-5)


def test_calibration_fits_temperatures_and_picks_a_layer(tmp_path) -> None:
    model = tiny_llama(seed=1, layers=4)
    cal = calibrate(model, random_prompts(1, 4, low=20, high=40), "tiny", k_max=4)
    assert [c.layer for c in cal.layers] == [1, 2, 3]
    assert all(c.ece_after <= c.ece_before + 1e-9 and c.temperature > 0 for c in cal.layers)
    assert all(0 <= c.agreement <= 1 for c in cal.layers)
    assert cal.exit_layer in (1, 2, 3) and 1 <= cal.k <= 4
    cal.save(tmp_path / "specbound.json")
    assert Calibration.load(tmp_path / "specbound.json") == cal


def test_predicted_speedup_model() -> None:
    assert predicted_speedup(0.0, 15, 30, 4) < 1  # nothing accepted: pure overhead
    assert predicted_speedup(0.95, 8, 30, 6) > 1.5
    assert predicted_speedup(0.3, 10, 30, 4) < 1  # SmolLM2-like agreement: a slowdown


def test_falls_back_to_ar_with_a_warning_when_calibration_predicts_a_slowdown(tmp_path, caplog) -> None:
    model = tiny_llama(seed=2, layers=4)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    cal = calibrate(model, random_prompts(2, 3, low=20, high=30), "tiny")
    for layer in cal.layers:
        layer.agreement = 0.1
    cal.save(calibration_path(model_dir))
    pair = ModelPair(LoadedModel("tiny", model, None, path=model_dir), "self")
    with caplog.at_level(logging.WARNING, logger="cmsd.drafters.selfspec"):
        decoder = Decoder(pair, DecodeSettings(method="specbound", max_new_tokens=NEW))
    assert "predicts" in caplog.text and decoder.settings.method == "ar"
    prompts = random_prompts(2, 2)
    gens = decoder.generate_ids(prompts)
    assert [g.token_ids for g in gens] == [greedy_reference(model, p, NEW) for p in prompts]
    assert all(g.stats.drafted == 0 for g in gens)


def test_specbound_refuses_models_it_cannot_split() -> None:
    with pytest.raises(ValueError, match="Llama-style decoder-only"):
        Decoder(ModelPair(LoadedModel("bart", tiny_bart(), None), "self"), DecodeSettings(method="specbound"))
    with pytest.raises(ValueError, match="use drafter 'self'"):
        Decoder(ModelPair(LoadedModel("t", tiny_llama(), None), "ngram"), DecodeSettings(method="specbound"))


def test_specbound_with_a_bound_that_stops_drafts_early(tmp_path, monkeypatch) -> None:
    """Drafts shorter than k_max (the bound stops them) must verify exactly the drafted tokens."""
    monkeypatch.setenv("CMSD_CACHE", str(tmp_path))
    target = tiny_llama(seed=11, layers=4)
    prompts = random_prompts(11, 5)
    settings = DecodeSettings(verify_tokens=UNCAPPED, method="specbound", max_new_tokens=NEW, batch_size=3, control=ControlSettings(k_max=8),
                              specbound=SpecBoundSettings(exit_layer=3, temperature=0.05, bound=0.4, bound_min=0.3))
    gens = Decoder(ModelPair(LoadedModel("tiny", target, None), "self"), settings).generate_ids(prompts)
    assert [g.token_ids for g in gens] == [greedy_reference(target, p, NEW) for p in prompts]
    assert 0 < sum(g.stats.drafted for g in gens) < 8 * sum(g.stats.iterations for g in gens)
