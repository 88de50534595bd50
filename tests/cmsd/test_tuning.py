"""Tuning by measurement (cmsd.tuning): what it predicts and picks from given costs (a CPU's and a GPU's), what it
measures on a tiny model under the suite's modelled costs, the plans it keeps, and a decode that drafts nothing
doing no drafter work."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import cmsd.decode
from cmsd import DecodeSettings, Decoder, LoadedModel, ModelPair
from cmsd import tuning
from cmsd.tuning import (Plan, Sample, batches_within, choose, cost, load_plan, plan_key, predict, predict_ar, save_plan,
                         shapes, tune)
from tests.tiny import (TINY_VOCAB, ModelledCosts, greedy_reference, perturbed, repetitive_prompts, timed_by,
                        tiny_llama)

NEW = 16
BOTH = {("cmasd", "ngram")}  # the arms that may compete besides AR
SAMPLE = Sample(docs=2, new_tokens=2 * NEW, prefill_s=0.0, spec_s=20 * 1.3, iterations=20, drafted=60,
                runs=(3,) * 10 + (0,) * 10, agreement=1.0, identical=True)


def cpu_costs(batches, verify_tokens, k_max=8) -> dict:
    """A CPU's pass: it costs as the rows x tokens it carries (1 + 0.1 per token beyond the first)."""
    return {(b, t): 1.0 + 0.1 * (b * t - 1) for b, t in shapes(batches, verify_tokens, k_max, True)}


def gpu_costs(batches, k_max=8) -> dict:
    """A GPU's pass: memory bound, about one step whatever it carries."""
    return {(b, t): 1.0 + 0.002 * (b * t - 1) for b, t in shapes(batches, 0, k_max, True)}


def tuned_on_a_tiny_model(settings: DecodeSettings, objective: str, max_batch: int = 4):
    """(target, pair, prompts, ids, tune's result) for the n-gram drafter on text that repeats itself."""
    target = tiny_llama(seed=3)
    prompts = repetitive_prompts(5, 3)
    pair = ModelPair(LoadedModel("target", target, None), "ngram")
    ids = [f"d{i}" for i in range(len(prompts))]
    return target, pair, prompts, ids, tune(pair, settings, prompts, ids, objective, max_batch=max_batch,
                                            lengths=[len(p) for p in prompts])


def test_on_a_cpu_ar_at_the_largest_batch_wins_throughput_and_drafting_wins_one_documents_time() -> None:
    batches = [1, 2, 4, 8, 16]
    costs = cpu_costs(batches, 4)
    candidates = predict_ar(costs, SAMPLE, batches, 10.0) + \
        predict(costs, SAMPLE, "cmasd", "ngram", 4, 8, batches, 10.0, True)
    labels = [c.label for c in candidates]
    assert labels == ["ar b1", "ar b2", "ar b4", "ar b8", "ar b16", "cmasd/ngram b1", "cmasd/ngram b2"]  # from b4
    assert [c.measured for c in candidates] == [False] * 5 + [True, False]  # the sample decoded by the arm alone
    # (no draft left from b4 on)
    assert candidates[-1].drafts_per_row == 1 and candidates[-1].tokens_per_call == pytest.approx(1.5)
    chosen, ar = choose(candidates, "throughput", BOTH)
    assert labels[chosen] == labels[ar] == "ar b16"
    chosen, ar = choose(candidates, "latency", BOTH)
    assert (labels[chosen], labels[ar]) == ("cmasd/ngram b1", "ar b1")
    spec = candidates[chosen]
    assert spec.tokens_per_call == pytest.approx(1 + 1.5)  # half the passes accepted 3 drafts (share 3)
    assert spec.doc_s == pytest.approx(NEW / 2.5 * 1.3)  # the sample's own passes: measured there
    assert candidates[ar].doc_s == pytest.approx(NEW * 1.0)
    assert choose(candidates, "latency", set())[0] == ar  # where drafting may not compete (not lossless)


def test_on_a_gpu_drafting_pays_at_every_batch_and_the_largest_wins() -> None:
    batches = [1, 2, 4, 8, 16, 32]
    costs = gpu_costs(batches)
    sample = replace(SAMPLE, spec_s=20 * cost(costs, 1, 4))  # the sample's passes, no drafter cost beyond them
    candidates = predict_ar(costs, sample, batches, 10.0) + \
        predict(costs, sample, "cmasd", "ngram", 0, 8, batches, 10.0, True)
    chosen, ar = choose(candidates, "throughput", BOTH)
    assert candidates[chosen].label == "cmasd/ngram b32" and candidates[ar].label == "ar b32"
    assert candidates[chosen].tokens_per_s / candidates[ar].tokens_per_s > 2
    assert {c.batch_size for c in candidates if c.method == "cmasd"} == set(batches)  # no cap on the budget


def test_a_pass_wider_than_those_measured_costs_along_the_last_step() -> None:
    measured = {(2, 1): 1.0, (2, 2): 1.5, (4, 1): 2.0}
    assert cost(measured, 2, 1.5) == pytest.approx(1.25)  # interpolated
    assert cost(measured, 2, 4) == pytest.approx(1.5 + 2 * 0.5)  # extrapolated along (2, 1) -> (2, 2)
    assert cost(measured, 4, 3) == 2.0  # one width measured: its cost


def test_the_batch_is_bounded_by_memory_and_the_largest_shard() -> None:
    assert batches_within(64, kv_row_mb=10.0, free_mb=1000.0) == [1, 2, 4, 8, 16, 32, 50]  # 0.5 x 1000 / 10
    assert batches_within(12, kv_row_mb=10.0, free_mb=1e6) == [1, 2, 4, 8, 12]
    assert batches_within(64, kv_row_mb=1e6, free_mb=10.0) == [1]


def test_tune_keeps_the_samples_outputs_identical_to_ar_and_picks_by_the_modelled_costs() -> None:
    target = tiny_llama(seed=3)
    prompts = repetitive_prompts(5, 3)
    pair = ModelPair(LoadedModel("target", target, None), "ngram")
    settings = DecodeSettings(method="cmasd", max_new_tokens=NEW, batch_size=4)
    ids = [f"d{i}" for i in range(len(prompts))]
    for objective in ("throughput", "latency"):
        tuned = tune(pair, settings, prompts, ids, objective, max_batch=8, lengths=[len(p) for p in prompts])
        assert [g.token_ids for g in tuned.kept] == [greedy_reference(target, p, NEW) for p in prompts]
        assert [g.doc_id for g in tuned.kept] == ids and all(g.trace is not None for g in tuned.kept)
        plan = tuned.plan
        assert plan.objective == objective and plan.source == "measured" and plan.seconds >= 0
        spec = [c for c in plan.candidates if c.method == "cmasd"]
        assert spec and spec[0].batch_size == 1 and spec[0].agreement_with_ar == 1.0 and spec[0].measured
        assert spec[0].tokens_per_call > 1  # the drafter's acceptance on the sample
        if objective == "throughput":  # modelled: a pass costs as the tokens it carries, so AR batches best
            assert plan.best.label == "ar b8"
        else:
            assert plan.best.batch_size == 1
            assert plan.best.method == ("cmasd" if spec[0].doc_s < plan.candidates[plan.ar].doc_s else "ar")
        assert plan.settings(settings).batch_size == plan.best.batch_size


def test_the_strict_check_is_the_targets_greedy_output_token_for_token() -> None:
    target = tiny_llama(seed=3)
    for prompt in repetitive_prompts(6, 4):
        greedy = greedy_reference(target, prompt, NEW)
        seconds, same = tuning._prefill_and_check(target, prompt, greedy)
        assert same and seconds == 0.0  # the suite's modelled costs: a prefill costs nothing beyond its passes
        for at in (0, NEW // 2, NEW - 1):  # one token off, at the start, the middle, the end
            other = greedy[:at] + [(greedy[at] + 1) % TINY_VOCAB] + greedy[at + 1:]
            assert not tuning._prefill_and_check(target, prompt, other)[1], at


def test_relaxed_verification_competes_by_its_agreement_with_ars_decode() -> None:
    settings = DecodeSettings(method="cmasd", verify="relaxed", max_new_tokens=NEW)
    target, pair, prompts, ids, tuned = tuned_on_a_tiny_model(settings, "latency")
    spec = next(c for c in tuned.plan.candidates if c.method == "cmasd" and c.batch_size == 1)
    assert 0 < spec.agreement_with_ar <= 1
    allowed = spec.agreement_with_ar >= tuning.RELAXED_MIN_AGREEMENT
    assert bool(tuned.plan.notes) != allowed
    own = Decoder(pair, settings.with_(batch_size=1)).generate_ids(prompts, ids)
    ar = [greedy_reference(target, p, NEW) for p in prompts]
    assert [g.token_ids for g in tuned.kept] == ([g.token_ids for g in own] if allowed else ar)


def test_plans_are_kept_per_key_and_measured_again_when_the_code_changes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CMSD_CACHE", str(tmp_path))
    pair = ModelPair(LoadedModel("target", tiny_llama(seed=1), None), "ngram")
    settings = DecodeSettings(max_new_tokens=NEW)
    key = plan_key(pair, settings, "throughput", 8, "summarization")
    assert load_plan(key) is None
    batches = [1, 2, 4, 8]
    candidates = predict_ar(cpu_costs(batches, 4), SAMPLE, batches, 1.0) + \
        predict(cpu_costs(batches, 4), SAMPLE, "cmasd", "ngram", 4, 8, batches, 1.0, True)
    plan = Plan("throughput", candidates, *choose(candidates, "throughput", BOTH), 1.5, "2026-12-05", "measured")
    save_plan(key, plan)
    again = load_plan(key)
    assert again is not None and again.source == "reused" and again.best == plan.best
    assert again.candidates == plan.candidates and again.to_dict()["speedup_vs_ar"] == 1.0
    assert plan_key(pair, settings.with_(batch_size=32), "throughput", 8, "summarization") == key  # it picks that
    for other in (plan_key(pair, settings, "latency", 8, "summarization"),
                  plan_key(pair, settings.with_(max_new_tokens=NEW + 1), "throughput", 8, "summarization"),
                  plan_key(pair, settings, "throughput", 16, "summarization")):
        assert load_plan(other) is None
    monkeypatch.setattr(tuning, "_code", "another version")
    assert load_plan(plan_key(pair, settings, "throughput", 8, "summarization")) is None


def test_a_batch_the_budget_leaves_no_draft_does_no_drafter_work(monkeypatch) -> None:
    target = tiny_llama(seed=2)
    prompts = repetitive_prompts(2, 8)
    made = []

    class Counted(cmsd.decode.NgramTreeDrafter):
        def __init__(self, *args, **kwargs) -> None:
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(cmsd.decode, "NgramTreeDrafter", Counted)
    pair = ModelPair(LoadedModel("target", target, None), "ngram")
    expected = [greedy_reference(target, p, NEW) for p in prompts]
    for batch, drafts in ((8, False), (4, False), (1, True)):  # verify budget 4: a row drafts 4 // rows - 1
        decoder = Decoder(pair, DecodeSettings(method="cmasd", max_new_tokens=NEW, batch_size=batch, verify_tokens=4))
        made.clear()
        gens = decoder.generate_ids(prompts)
        assert [g.token_ids for g in gens] == expected
        assert bool(made) == drafts == decoder.drafts_at(batch), batch
        assert (sum(g.stats.drafted for g in gens) > 0) == drafts
        assert all(g.stats.target_calls == len(g.token_ids) for g in gens) or drafts  # AR's one pass a token


def test_each_drafter_at_hand_competes_and_the_best_one_is_chosen() -> None:
    target = tiny_llama(seed=3)
    prompts = repetitive_prompts(5, 3)  # text that repeats itself: the n-gram drafter's ground
    poor = LoadedModel("poor", perturbed(target, 0.5, seed=1), None)  # a drafter that rarely agrees
    pair = ModelPair(LoadedModel("target", target, None), poor)
    assert tuning.alternatives(pair, DecodeSettings()) == [("cmasd", "ngram")]  # no head ships, no calibration
    assert tuning.alternatives(pair, DecodeSettings(method="ar")) == []
    ids = [f"d{i}" for i in range(len(prompts))]
    settings = DecodeSettings(method="cmasd", max_new_tokens=2 * NEW)  # the alternative decodes NEW tokens
    tuned = tune(pair, settings, prompts, ids, "latency", max_batch=4, lengths=[len(p) for p in prompts])
    by_arm = {c.arm: c for c in tuned.plan.candidates}
    assert set(by_arm) == {("ar", None), ("cmasd", "poor"), ("cmasd", "ngram")}
    assert all(c.measured and c.agreement_with_ar == 1.0 for arm, c in by_arm.items() if arm[0] == "cmasd")
    assert by_arm["cmasd", "ngram"].tokens_per_call > by_arm["cmasd", "poor"].tokens_per_call
    assert tuned.plan.best.arm == ("cmasd", "ngram")  # the fewest passes a document (modelled: a pass costs its tokens)
    assert [g.token_ids for g in tuned.kept] == [greedy_reference(target, p, 2 * NEW) for p in prompts]  # whole
    chosen = tuning.pair_for(pair, tuned.plan.best.drafter)
    assert chosen.drafter == "ngram" and chosen.target is pair.target and tuning.pair_for(pair, "poor") is pair


def test_under_relaxed_verification_the_sample_keeps_the_chosen_configurations_outputs() -> None:
    target, _, prompts, _, tuned = tuned_on_a_tiny_model(
        DecodeSettings(method="cmasd", verify="relaxed", max_new_tokens=NEW), "throughput", max_batch=8)
    assert tuned.plan.best.method == "ar"  # modelled: a pass costs as the tokens it carries
    assert [g.token_ids for g in tuned.kept] == [greedy_reference(target, p, NEW) for p in prompts]  # AR's own


def test_strict_sampling_competes_as_lossless_without_the_greedy_check() -> None:
    *_, ids, tuned = tuned_on_a_tiny_model(DecodeSettings(method="cmasd", temperature=0.8, max_new_tokens=NEW),
                                           "latency")
    assert not tuned.plan.notes  # lossless in distribution: not left out for differing from greedy
    assert [g.doc_id for g in tuned.kept] == ids  # its samples are the documents' outputs


class SlowSampleDecodes(ModelledCosts):
    """The suite's modelled costs, with each tuning sample decode taking 30 s."""

    def __call__(self, what: tuple, work) -> float:
        seconds = super().__call__(what, work)
        return 30.0 if what[0] == "decode" else seconds


def test_another_drafter_is_measured_only_where_the_job_is_large_enough_to_pay_for_it() -> None:
    target = tiny_llama(seed=3)
    prompts = repetitive_prompts(5, 3)
    pair = ModelPair(LoadedModel("target", target, None), LoadedModel("own", perturbed(target, 0.5, seed=1), None))
    ids = [f"d{i}" for i in range(len(prompts))]
    settings = DecodeSettings(method="cmasd", max_new_tokens=NEW)
    with timed_by(SlowSampleDecodes()):
        for docs, measured in ((10, False), (100_000, True), (None, True)):  # None: every drafter (cmsd-jobs tune)
            tuned = tune(pair, settings, prompts, ids, "throughput", max_batch=8, lengths=[len(p) for p in prompts],
                         docs=docs)
            arms = {c.arm for c in tuned.plan.candidates}
            assert (("cmasd", "ngram") in arms) == measured, docs
            assert any("cmasd/ngram not measured" in note for note in tuned.plan.notes) != measured, docs
            assert [g.token_ids for g in tuned.kept] == [greedy_reference(target, p, NEW) for p in prompts]


def test_a_budget_that_leaves_no_draft_is_said_so() -> None:
    *_, tuned = tuned_on_a_tiny_model(DecodeSettings(method="cmasd", max_new_tokens=NEW, verify_tokens=1), "latency")
    assert all(c.method == "ar" for c in tuned.plan.candidates) and tuned.plan.best.label == "ar b1"
    assert any("leaves no draft at any batch" in note for note in tuned.plan.notes)


def test_the_drafts_a_row_carries_are_searched_per_batch_size() -> None:
    batches = [1, 2, 4, 8, 16]
    deep = replace(SAMPLE, runs=(8,) * 10 + (0,) * 10, drafted=160)  # half the passes accepted all 8 drafts
    gpu = gpu_costs(batches)
    found = predict(gpu, replace(deep, spec_s=20 * cost(gpu, 1, 9)), "cmasd", "ngram", 0, 8, batches, 10.0, True,
                    search=True)
    assert [c.drafts_per_row for c in found] == [8] * 5  # a GPU's pass costs about one step: every draft pays
    shallow = predict(gpu, replace(SAMPLE, spec_s=20 * cost(gpu, 1, 4)), "cmasd", "ngram", 0, 8, batches, 10.0,
                      True, search=True)
    assert [c.drafts_per_row for c in shallow] == [3] * 5  # no draft beyond the 3 the sample ever accepted pays
    cpu = {(b, t): 1.0 + 0.1 * (b * t - 1) for b in batches for t in range(1, 10)}  # a pass costs its tokens
    found = predict(cpu, replace(deep, spec_s=20 * cost(cpu, 1, 9)), "cmasd", "ngram", 0, 8, batches, 10.0, True,
                    search=True)
    shares = [c.drafts_per_row for c in found]
    assert shares == sorted(shares, reverse=True) and shares[0] == 8 and shares[-1] < 8  # fewer as rows add up
    for c in found:  # each the fastest of its batch size's shares
        assert c.tokens_per_s == max(o.tokens_per_s for s in range(1, 9) for o in predict(
            cpu, replace(deep, spec_s=20 * cost(cpu, 1, 9)), "cmasd", "ngram", c.batch_size * (1 + s), 8,
            [c.batch_size], 10.0, True))
        settings = tuning.settings_for(DecodeSettings(), c)  # the decoder's rule gives each row that share
        assert settings.verify_tokens // c.batch_size - 1 == c.drafts_per_row and settings.batch_size == c.batch_size


def test_batch_one_is_the_samples_own_decode_at_its_own_share() -> None:
    """The arm's batch-1 candidate is what its sample measured (its decoder's share of drafts, a tree cut by the
    cost curve within it), not a share searched on a prediction; the other batch sizes are searched."""
    batches = [1, 2, 4]
    cpu = {(b, t): 1.0 + 0.1 * (b * t - 1) for b in batches for t in range(1, 10)}
    sample = replace(SAMPLE, new_tokens=20 + 60, runs=(6,) * 10 + (0,) * 10, drafted=140, share=7,
                     spec_s=20 * cost(cpu, 1, 8))  # 20 passes of 8 tokens, 60 drafts accepted
    found = predict(cpu, sample, "cmasd", "ngram", 0, 8, batches, 10.0, True, search=True)
    one = found[0]
    assert (one.batch_size, one.drafts_per_row, one.measured) == (1, 7, True)
    assert one.doc_s == pytest.approx(sample.spec_s / sample.docs)  # its own decode's time
    assert one.tokens_per_call == pytest.approx(1 + 60 / 20)
    assert [c.measured for c in found[1:]] == [False, False] and found[1].drafts_per_row <= 6


def test_a_single_rows_tree_is_cut_by_the_cost_curve_not_by_the_automatic_budget() -> None:
    """With the automatic budget a single row's tree takes the whole cost curve (its cut keeps what pays); a
    batch's rows share the budget the curve gives, and a chain drafts within that budget. A curve given to the
    decoder is used as measured (no measurement of its own)."""
    target = tiny_llama(seed=2)
    prompts = repetitive_prompts(4, 6)
    pair = ModelPair(LoadedModel("target", target, None), "ngram")
    curve = (1.0, 1.25, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0)  # the budget: 2 tokens a pass (<= 1.3 steps)
    expected = [greedy_reference(target, p, NEW) for p in prompts]
    tree = Decoder(pair, DecodeSettings(method="cmasd", max_new_tokens=NEW, batch_size=1), curve)
    gens = tree.generate_ids(prompts)
    assert tree.verify_tokens == 2 and tree.costs == curve
    assert (tree.share(1), tree.share(2), tree.drafts_at(2)) == (7, 0, False)
    assert [g.token_ids for g in gens] == expected
    assert max(g.stats.drafted / g.stats.iterations for g in gens) > 1  # more than the budget's one draft a pass
    chain = Decoder(pair, DecodeSettings(method="cmasd", max_new_tokens=NEW, batch_size=1,
                                         ngram=replace(DecodeSettings().ngram, branches=1)), curve)
    gens = chain.generate_ids(prompts)
    assert chain.share(1) == 1 and all(g.stats.drafted <= g.stats.iterations for g in gens)
    assert [g.token_ids for g in gens] == expected
    fixed = Decoder(pair, DecodeSettings(method="cmasd", max_new_tokens=NEW, batch_size=1, verify_tokens=3), curve)
    assert fixed.share(1) == 2  # a budget the spec sets is kept


def test_the_tuning_hands_its_measured_curve_to_the_decoders_and_the_plan() -> None:
    stopwatch = ModelledCosts()
    with timed_by(stopwatch):
        *_, tuned = tuned_on_a_tiny_model(DecodeSettings(method="cmasd", max_new_tokens=NEW), "latency")
    widths = range(1, cmsd.decode.MAX_PASS + 1)
    assert tuned.plan.pass_costs == pytest.approx(tuple(1 + 0.1 * (t - 1) for t in widths))  # the modelled passes
    assert not [w for w in stopwatch.calls if w[0] == "forward"]  # the decoders measured no curve of their own
    spec = next(c for c in tuned.plan.candidates if c.method == "cmasd" and c.batch_size == 1)
    assert spec.measured and spec.drafts_per_row == cmsd.decode.MAX_PASS - 1
    assert Plan.from_dict(tuned.plan.to_dict()).pass_costs == tuned.plan.pass_costs


class PricedDecodes(ModelledCosts):
    """Modelled costs (a GPU-like pass: 0.002 a token beyond the first), with each confirming decode of a candidate
    (by its label) taking the seconds given; the counted ("step", rows, tokens) passes kept."""

    def __init__(self, seconds: dict[str, float]) -> None:
        super().__init__(slope=0.002)
        self.seconds = seconds

    def __call__(self, what: tuple, work) -> float:
        out = super().__call__(what, work)
        return self.seconds.get(what[1], out) if what[0] == "decode" else out


@pytest.mark.parametrize("slow", ["cmasd/ngram b4", "ar b4"])
def test_the_top_candidates_are_confirmed_by_real_decodes_that_keep_their_outputs(slow: str) -> None:
    target = tiny_llama(seed=3)
    prompts = repetitive_prompts(5, 9)
    pair = ModelPair(LoadedModel("target", target, None), "ngram")
    ids = [f"d{i}" for i in range(len(prompts))]
    settings = DecodeSettings(method="cmasd", max_new_tokens=NEW)
    with timed_by(PricedDecodes({slow: 1000.0, ({"cmasd/ngram b4", "ar b4"} - {slow}).pop(): 1.0})):
        tuned = tune(pair, settings, prompts[:1], ids[:1], "throughput", max_batch=4,
                     lengths=[len(p) for p in prompts], spare=(prompts[1:], ids[1:]))
    plan = tuned.plan
    confirmed = {c.label: c for c in plan.candidates if c.predicted_tokens_per_s is not None}
    assert set(confirmed) == {"cmasd/ngram b4", "ar b4"} and all(c.measured for c in confirmed.values())
    assert confirmed[slow].tokens_per_s == pytest.approx(4 * NEW / 1000.0)  # what its decode measured
    assert plan.best.label != slow and plan.best.label in confirmed  # the faster one measured
    assert plan.candidates[plan.ar].label == "ar b4"
    # every document decoded while tuning keeps its output, each the target's greedy output (strict: lossless)
    assert sorted(g.doc_id for g in tuned.kept) == sorted(ids)
    reference = dict(zip(ids, (greedy_reference(target, p, NEW) for p in prompts)))
    assert all(g.token_ids == reference[g.doc_id] for g in tuned.kept)


def test_a_speculative_batch_is_not_chosen_unconfirmed_and_wider_passes_are_measured_where_they_could_win() -> None:
    target = tiny_llama(seed=3)
    prompts = repetitive_prompts(5, 3)
    pair = ModelPair(LoadedModel("target", target, None), "ngram")
    ids = [f"d{i}" for i in range(len(prompts))]
    settings = DecodeSettings(method="cmasd", max_new_tokens=NEW)
    widest = {}
    for name, stopwatch, spare in (("unconfirmed", PricedDecodes({}), ([], [])),
                                   ("gpu", PricedDecodes({}), (prompts * 4, ids * 4)),
                                   ("cpu", ModelledCosts(slope=1.0), (prompts * 4, ids * 4))):
        with timed_by(stopwatch):
            tuned = tune(pair, settings, prompts, ids, "throughput", max_batch=4, lengths=[len(p) for p in prompts],
                         spare=spare)
        widest[name] = max(what[2] for what in stopwatch.calls if what[0] == "step" and what[1] > 1)
        best_spec = max((c for c in tuned.plan.candidates if c.method == "cmasd"), key=lambda c: c.tokens_per_s)
        if name == "unconfirmed":  # drafting wins at batch 4 by prediction, but no document is left to confirm it
            assert best_spec.batch_size == 4 and not best_spec.measured
            assert tuned.plan.best.method == "ar" and any("must confirm it first" in n for n in tuned.plan.notes)
        elif name == "gpu":  # ... confirmed by a real decode (its modelled time: as predicted)
            assert tuned.plan.best == best_spec and best_spec.batch_size == 4 and best_spec.measured
    # a pass that costs as its tokens (slope 1): a second token a row already costs what drafts gain, so no pass
    # wider than 2 tokens a row is measured beyond batch 1; a GPU-like pass: measured out to what the sample fed;
    # none beyond one token a row where no speculative batch could be confirmed
    assert widest["unconfirmed"] == 1 and widest["cpu"] <= 2 < widest["gpu"]


def test_specbound_competes_where_the_target_is_calibrated(tmp_path) -> None:
    from cmsd.drafters.selfspec import calibration_path
    from cmsd.train.calibrate import calibrate

    model = tiny_llama(seed=2, layers=4)
    cal = calibrate(model, repetitive_prompts(2, 3), "tiny")
    target = LoadedModel("tiny", model, None, path=tmp_path)
    pair = ModelPair(target, "ngram")
    assert ("specbound", "self") not in tuning.alternatives(pair, DecodeSettings())  # not calibrated
    for layer in cal.layers:
        layer.agreement = 0.95  # a calibration that predicts a speedup
    cal.save(calibration_path(tmp_path))
    assert tuning.alternatives(pair, DecodeSettings()) == [("cmasd", "ngram"), ("specbound", "self")][1:]
    prompts = repetitive_prompts(5, 3)
    ids = [f"d{i}" for i in range(len(prompts))]
    tuned = tune(pair, DecodeSettings(method="cmasd", max_new_tokens=NEW), prompts, ids, "latency", max_batch=4,
                 lengths=[len(p) for p in prompts])
    arms = {c.arm: c for c in tuned.plan.candidates}
    assert ("specbound", "self") in arms and arms["specbound", "self"].agreement_with_ar == 1.0  # lossless
    chosen = tuning.settings_for(DecodeSettings(), tuned.plan.best)
    assert Decoder(tuning.pair_for(pair, tuned.plan.best.drafter), chosen).settings.method == tuned.plan.best.method
    for layer in cal.layers:
        layer.agreement = 0.05  # one that predicts a slowdown: SpecBound would decode as AR
    cal.save(calibration_path(tmp_path))
    assert ("specbound", "self") not in tuning.alternatives(pair, DecodeSettings())


def test_relaxed_verification_keeps_the_nightlys_floors() -> None:
    import yaml

    floors = yaml.safe_load((Path(__file__).parents[2] / "jobs/suites/nightly.yaml").read_text())["floors"]
    assert (tuning.RELAXED_MIN_AGREEMENT, tuning.RELAXED_MAX_QUALITY_LOSS) == (floors["min_agreement"],
                                                                              floors["max_quality_loss"])
    relaxed = DecodeSettings(verify="relaxed")
    assert tuning._refused(replace(SAMPLE, agreement=0.9), relaxed, 1.0) is None
    assert "agreement" in tuning._refused(replace(SAMPLE, agreement=0.3), relaxed, 0.0)
    assert "chrF" in tuning._refused(replace(SAMPLE, agreement=0.9), relaxed, 6.0)
    assert tuning._refused(replace(SAMPLE, agreement=0.9), relaxed, None) is None  # no reference: agreement alone
    assert "not the target's greedy output" in tuning._refused(replace(SAMPLE, identical=False), DecodeSettings(), None)


def test_a_speculative_batch_predicted_barely_faster_than_ar_is_neither_confirmed_nor_chosen() -> None:
    ar = tuning.Candidate("ar", None, 8, 100.0, 1.0, 1.0, None, 1.0, 10.0, False)
    spec = replace(ar, method="cmasd", drafter="ngram", tokens_per_s=110.0, drafts_per_row=2)  # under the margin
    spare = ([[1, 2, 3]] * 16, [f"d{i}" for i in range(16)])  # enough documents to confirm it
    notes: list[str] = []
    candidates, chosen, _, kept = tuning._confirm(None, DecodeSettings(), [ar, spec], 1, 0, BOTH, "throughput",
                                                  spare, notes)  # (no decode runs: no model is needed)
    assert candidates[chosen].label == "ar b8" and kept == [] and "1.15x AR's best" in notes[0]
