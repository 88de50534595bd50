"""Cost curves (cmsd.costs) and projections (cmsd.projection) from given costs: a curve's interpolation, what a
projection of a real decode's traces says against the time that decode takes pass by pass on a device with those
costs, and a curve measured on a tiny model under modelled costs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cmsd import DecodeSettings, Decoder, LoadedModel, ModelPair
from cmsd.costs import Curve, Loop, measure_loop, measure_prefill, measure_steps
from cmsd.projection import Traced, as_ar, project, traced_generations
from tests.tiny import repetitive_prompts, timed_by, tiny_llama

ROWS, TOKENS, CONTEXTS = [1, 2, 4, 8], [1, 2, 3, 5, 9], [64, 256]


def cpu_like(rows: int, tokens: int, context: int) -> float:
    """A CPU's pass: grows with the tokens it carries and a little with the cache."""
    return 0.05 * (1 + 0.1 * (rows * tokens - 1)) * (1 + context / 2048)


def gpu_like(rows: int, tokens: int, context: int) -> float:
    """A GPU's pass: flat until the tokens fill the device, then growing."""
    return 0.01 * max(1.0, rows * tokens / 32) * (1 + context / 8192)


def curve_of(pass_cost, host: dict[tuple[str, str | None], float]) -> Curve:
    loops = [Loop(method, drafter, rows, 10, 10 * rows, 10 * (pass_cost(rows, 1, 64) + h), 0.0,
                  pass_cost(rows, 1, 64), 1.0, 64.0, 1.0, None) for (method, drafter), h in host.items() for rows in ROWS]
    return Curve("tiny", "given", "float32", True,
                 {(r, t, c): pass_cost(r, t, c) for r in ROWS for t in TOKENS for c in CONTEXTS},
                 {16: 0.02, 64: 0.05}, loops)


def test_a_curve_interpolates_its_grid_and_reads_back_what_it_wrote(tmp_path: Path) -> None:
    curve = curve_of(cpu_like, {("ar", None): 0.002, ("cmasd", "ngram"): 0.004})
    assert curve.pass_s(2, 3, 64) == pytest.approx(cpu_like(2, 3, 64))  # on the grid
    assert curve.pass_s(2, 4, 64) == pytest.approx((cpu_like(2, 3, 64) + cpu_like(2, 5, 64)) / 2)  # between tokens
    assert curve.pass_s(6, 1, 160) == pytest.approx(cpu_like(6, 1, 160))  # linear in rows and cache: exact
    assert curve.pass_s(16, 1, 1024) == pytest.approx(cpu_like(8, 1, 256))  # clamped to the grid
    assert curve.prefill_s(40) == pytest.approx(0.035) and curve.prefill_s(128) == pytest.approx(0.1)
    assert curve.host_s("cmasd", "ngram", 3) == pytest.approx(0.004) and curve.host_s("cmasd", "head", 1) is None
    curve.save(tmp_path / "curve.json")
    again = Curve.load(tmp_path / "curve.json")
    assert again == curve and json.loads((tmp_path / "curve.json").read_text())["loops"][0]["host_s"] == \
        pytest.approx(0.002)


def replayed_seconds(curve: Curve, arm: Traced, gens, host: float) -> float:
    """What a batch-1 decode takes on `curve`'s device pass by pass: its prefill, then each verify pass over the
    tokens it fed (1 + the drafts in the traces; a pass that drafted nothing, one) after the cache it had, plus the
    host's share. (A trace numbers the decode loop's iterations, which run on from one document to the next.)"""
    total = 0.0
    for g in gens:
        mine = [(i, ok) for d, i, ok in zip(g.trace["doc_id"], g.trace["iteration"], g.trace["accepted"])
                if d == g.doc_id]
        fed, accepted = Counter(i for i, _ in mine), Counter(i for i, ok in mine if ok)
        passes = [(1, 0)] * (g.stats.iterations - len(fed)) + [(1 + fed[i], accepted[i]) for i in sorted(fed)]
        context = g.prompt_tokens
        total += curve.prefill_s(g.prompt_tokens)
        for tokens, kept in passes:
            total += curve.pass_s(1, tokens, context) + host
            context += 1 + kept
    return total


@pytest.mark.parametrize("pass_cost", [cpu_like, gpu_like])
def test_a_projection_of_a_decodes_traces_is_within_10_percent_of_its_time_pass_by_pass(pass_cost) -> None:
    model, prompts = tiny_llama(seed=3), repetitive_prompts(5, 4)
    pair = ModelPair(LoadedModel("target", model, None), "ngram")
    host = {("ar", None): 0.001, ("cmasd", "ngram"): 0.003}
    curve = curve_of(pass_cost, host)
    for verify_tokens in (4, 0):  # a CPU's budget and none (a GPU's)
        decoder = Decoder(pair, DecodeSettings(method="cmasd", batch_size=1, max_new_tokens=24,
                                               verify_tokens=verify_tokens))
        gens = decoder.generate_ids(prompts)
        arm = traced_generations("cmasd", "ngram", gens)
        assert arm.drafted > 0 and sum(arm.runs.values()) > 0
        assert arm.new_tokens == sum(len(g.token_ids) for g in gens)
        (projected,) = project(curve, arm, [1], verify_tokens, decoder.settings.control.k_max)
        replayed = arm.new_tokens / replayed_seconds(curve, arm, gens, host["cmasd", "ngram"])
        assert projected.tokens_per_s == pytest.approx(replayed, rel=0.10)
        assert not projected.measured and projected.label == "cmasd/ngram b1"
        ar_gens = Decoder(ModelPair(pair.target, None), DecodeSettings(method="ar", batch_size=1, max_new_tokens=24)
                          ).generate_ids(prompts)
        assert [g.token_ids for g in ar_gens] == [g.token_ids for g in gens]  # strict: the same tokens
        (ar_projected,) = project(curve, as_ar(arm), [1])
        ar_replayed = arm.new_tokens / replayed_seconds(curve, as_ar(arm), ar_gens, host["ar", None])
        assert ar_projected.tokens_per_s == pytest.approx(ar_replayed, rel=0.10)


def test_a_projection_drafts_no_more_than_the_budget_leaves_at_each_batch() -> None:
    curve = curve_of(cpu_like, {("ar", None): 0.0, ("cmasd", "ngram"): 0.0})
    arm = Traced("cmasd", "ngram", docs=4, prompt_tokens=256, new_tokens=256, iterations=100, drafted=300,
                 runs={3: 50, 0: 50})
    by_batch = {c.batch_size: c for c in project(curve, arm, [1, 2, 4, 8], verify_tokens=8, k_max=8)}
    assert set(by_batch) == {1, 2, 4}  # 8 // 8 - 1: no draft left at b8
    assert by_batch[1].tokens_per_call == pytest.approx(1 + 1.5) and by_batch[2].tokens_per_call == \
        pytest.approx(1 + 1.5)  # a share of 7 at b1, 3 at b2: every run of 3 fits
    assert by_batch[4].tokens_per_call == pytest.approx(1 + 0.5) and by_batch[4].drafts_per_row == 1
    flat = {c.batch_size: c for c in project(curve_of(gpu_like, {("ar", None): 0.0, ("cmasd", "ngram"): 0.0}), arm,
                                            [1, 8], verify_tokens=0)}
    ar = {c.batch_size: c for c in project(curve_of(gpu_like, {("ar", None): 0.0}), as_ar(arm), [1, 8])}
    assert flat[8].tokens_per_s > 1.4 * ar[8].tokens_per_s  # a flat pass: drafting pays at batch 8 too (2.5 tokens
    #                                                             a pass; the prefill of 64-token prompts is shared)


def test_a_curve_measured_on_a_tiny_model_under_modelled_costs() -> None:
    model = tiny_llama(seed=3)
    pair = ModelPair(LoadedModel("target", model, None), "ngram")

    def stopwatch(what: tuple, work) -> float:
        work()
        if what[0] == "step":
            return cpu_like(what[1], what[2], 64)
        if what[0] == "prefill":
            return 0.01 * what[1]
        return 1.0  # a decode: one second

    with timed_by(stopwatch):
        curve = Curve("tiny", "cpu", "float32", False, measure_steps(model, [1, 2], [1, 2, 3, 5], [64]),
                      measure_prefill(model, [16, 32]))
        loop = measure_loop(pair, DecodeSettings(method="cmasd", batch_size=2, max_new_tokens=12, verify_tokens=8),
                            repetitive_prompts(5, 2), curve)
    assert curve.steps[2, 3, 64] == cpu_like(2, 3, 64) and curve.prefill == {16: 0.16, 32: 0.32}
    assert loop.rows == 2 and loop.seconds == 1.0 and loop.prefill_s == 0.02 and loop.new_tokens == 24
    assert loop.iterations <= 12 and loop.fed > 1 and loop.syncs is not None
    assert loop.host_s == pytest.approx((1.0 - 0.02) / loop.iterations - curve.pass_s(2, loop.fed, loop.context))
