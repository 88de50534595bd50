"""Tuning by measurement: the configuration a corpus is decoded with (method, drafter, batch size, verify budget),
chosen from costs measured on the machine that decodes it and acceptance measured on the corpus's own documents.

1. The target's cost of one decode pass per (rows, tokens a row) is measured (cmsd.kernels.step_costs; once per
   machine and model, kept on disk): one token a row at every batch size, and every width at batch 1. It runs
   first: it also warms the model up for the timings after it. On a CPU the batch-1 widths up to MAX_PASS are the
   decoders' cost curve (their automatic verify budget and a single row's tree cut: the tuning's decoders and the
   plan's get it, measured at the corpus's own context, and measure none of their own).
2. A sample of the documents is decoded at batch 1 by each arm (a method with a drafter): the job's own, CM-ASD with
   the n-gram drafter and with the head shipped for the target where one ships, and SpecBound where the target is
   calibrated (`alternatives`); each with the decoder's own verify budget (where the spec sets none, the automatic
   one: a single row's tree drafts as far as its cut by the cost curve finds worth it, a chain the widest pass
   costing at most 1.3 single steps; no limit on a GPU). The sample's outputs are the documents' outputs (a document
   decoded while tuning is not decoded again). The target's prefill of each sample prompt is timed, and under strict
   greedy verification one more pass of the target over each arm's output checks that it is the target's greedy
   output token for token (AR's output: the check strict verification makes, over the whole output at once, instead
   of a second decode); an arm that fails it does not compete. Under relaxed verification the sample is decoded by AR
   too, and an arm must keep the floors `cmsd-jobs eval` gates on: agreement with AR (RELAXED_MIN_AGREEMENT) and chrF
   against the references (RELAXED_MAX_QUALITY_LOSS). Where the job's method is AR, the sample is decoded by AR
   alone.
3. Every candidate's time is predicted from those. A batch of b documents costs b P + (N / tau) (pass(b, t) + D b):
   P what a document costs besides its passes (its prefill: timed, or fitted to AR's sample decode), N its new
   tokens, t the tokens a row feeds a pass (1 + its drafts), tau the tokens a pass gains, D the drafter's own cost
   per row and pass (fitted to the speculative sample decode); AR has t = tau = 1, D = 0. A speculative candidate
   at batch b drafts at most s a row, and gains min(a, s) of a pass where the sample accepted a drafts: s is
   searched from 1 to k_max at each batch size (the verify budget it sets is b (1 + s)), or is the spec's budget's share
   (verify_tokens // b - 1, the decoder's own rule) where decode.verify_tokens is set. Wider passes at a batch size
   are measured only while a speculative candidate there could beat AR (`_widen`). Each arm at batch 1 is its own
   measurement at its own share (D is fitted there): those candidates are marked measured.
4. The objective picks: `throughput` (the most tokens a second, prefill included) or `latency` (the least time for
   one document: batch 1, the only batch it measures). Memory bounds the batch: the KV cache of its rows, at the
   longest prompt, within MEMORY_FRACTION of the memory free on the device.
5. A speculative pick is confirmed by real decodes of further documents (`_confirm`: it and AR at AR's best batch,
   a batch each; a speculative candidate at a batch > 1 is chosen only once confirmed, and is confirmed only where
   predicted SPECULATIVE_MARGIN faster than AR's best). Those documents keep their outputs, the measured speed
   replaces the prediction, and the faster is chosen. AR's pick is not decoded again: its prediction is its
   measured passes'.

A plan is kept on disk (`$CMSD_CACHE/plans/`) per machine, model, drafter, decode settings, objective and largest
batch, and reused until the code or torch / transformers change (`plan_key`). What is timed goes through
cmsd.kernels' stopwatch: a test gives modelled costs, and what the tuner picks never follows timing noise there.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from cmsd import kernels
from cmsd.decode import MAX_PASS, Decoder, Generation
from cmsd.drafters.head import HEAD_DRAFTER, SHIPPED, FeatureHead, HeadError, names_head, shipped_head
from cmsd.drafters.selfspec import SelfSpecPlan, calibration_path, check_self_draftable
from cmsd.identity import cache_dir, fingerprint
from cmsd.models import LoadedModel, ModelPair, load_drafter
from cmsd.settings import OBJECTIVES, DecodeSettings
from cmsd.stats import token_agreement

BATCHES = (1, 2, 4, 8, 16, 32, 64)  # the batch sizes that compete (at most the largest shard's rows)
TOKEN_POINTS = (1, 2, 3, 5, 9)  # tokens a row whose pass cost is measured; between them, interpolated
MEMORY_FRACTION = 0.5  # of the device's free memory, the most a batch's KV cache may take
TUNE_SHARE = 0.1  # of the predicted time of an actor's documents, the most its sample decodes take (docs given)
ALTERNATIVE_MIN_TOKENS = 16  # another drafter than the job's own decodes half the new tokens, at least this many
RELAXED_MIN_AGREEMENT = 0.4  # relaxed verification: a candidate's agreement with AR (the nightly's floor) ...
RELAXED_MAX_QUALITY_LOSS = 5.0  # ... and chrF points below AR's against the references (the nightly's floor)
SPECULATIVE_MARGIN = 0.15  # a speculative batch > 1 must be predicted this much faster than AR's best to be timed
#                            wider or confirmed (its predictions ran up to 37% high on a 2-core CPU: README)


@dataclass(frozen=True)
class Candidate:
    """One configuration and what it does on this machine and corpus (predicted, or measured at batch 1)."""

    method: str
    drafter: str | None
    batch_size: int
    tokens_per_s: float  # new tokens a second over a batch, prefill included
    doc_s: float  # one document's time at this batch (from its start to its end)
    tokens_per_call: float
    acceptance_rate: float | None
    agreement_with_ar: float | None
    kv_mb: float  # the batch's KV cache at the longest prompt
    measured: bool  # a real decode of this configuration (the sample's at batch 1, or a confirming one)
    drafts_per_row: int = 0  # drafts a row may carry per pass (its share of the verify budget: searched); 0: AR
    predicted_tokens_per_s: float | None = None  # what was predicted, where a confirming decode measured it

    @property
    def arm(self) -> tuple[str, str | None]:
        """The method and drafter (what competes at each batch size)."""
        return self.method, self.drafter

    @property
    def label(self) -> str:
        return f"{self.method}{'/' + self.drafter if self.drafter else ''} b{self.batch_size}"


@dataclass
class Plan:
    """What a tuning chose and why: every candidate, the chosen one, AR's own best, how long it took."""

    objective: str
    candidates: list[Candidate]
    chosen: int  # index into candidates
    ar: int  # AR's best candidate (what the job's speedup_vs_ar compares with)
    seconds: float = 0.0  # what deciding it took this time (0 where a kept plan was reused)
    measured_at: str = ""
    source: str = "measured"  # measured | reused
    notes: list[str] = field(default_factory=list)  # why candidates were left out
    phases: dict[str, float] = field(default_factory=dict)  # seconds of each step of the tuning (wall clock)
    pass_costs: tuple[float, ...] = ()  # a pass over 1..MAX_PASS tokens at batch 1, in 1-token passes (measured on
    #                                     CPU at the corpus's context: the decoders' automatic budget and tree cut)

    @property
    def best(self) -> Candidate:
        return self.candidates[self.chosen]

    def settings(self, base: DecodeSettings) -> DecodeSettings:
        """`base` with the chosen method, batch size and verify budget (`pair_for` gives the chosen drafter)."""
        return settings_for(base, self.best)

    def to_dict(self) -> dict[str, Any]:
        rows = [{**asdict(c), "label": c.label} for c in self.candidates]
        return {"objective": self.objective, "candidates": rows, "chosen": rows[self.chosen], "ar": rows[self.ar],
                "speedup_vs_ar": self.best.tokens_per_s / self.candidates[self.ar].tokens_per_s
                if self.objective == "throughput" else self.candidates[self.ar].doc_s / self.best.doc_s,
                "seconds": self.seconds, "measured_at": self.measured_at, "source": self.source, "notes": self.notes,
                "phases": self.phases, "pass_costs": list(self.pass_costs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        names = set(Candidate.__dataclass_fields__)
        candidates = [Candidate(**{k: v for k, v in c.items() if k in names}) for c in data["candidates"]]
        labels = [c.label for c in candidates]
        return cls(data["objective"], candidates, labels.index(data["chosen"]["label"]),
                   labels.index(data["ar"]["label"]), data["seconds"], data["measured_at"], data["source"],
                   data["notes"], data.get("phases", {}), tuple(data.get("pass_costs", ())))


@dataclass(frozen=True)
class Sample:
    """What the sample's decodes at batch 1 gave (counts from the decode, seconds by the stopwatch)."""

    docs: int
    new_tokens: int  # over the sample
    prefill_s: float  # the target's prefills of the sample's prompts
    spec_s: float | None = None  # None: no speculative decode (the job's method is AR: its decode timed P)
    iterations: int = 0  # the speculative decode's verify passes
    drafted: int = 0
    runs: tuple[int, ...] = ()  # drafts accepted in each of its passes
    share: int = 0  # the most its decoder let a row draft a pass (Decoder.share at batch 1)
    agreement: float | None = None  # of its tokens with AR's
    identical: bool = True


def predict_ar(costs: dict[tuple[int, int], float], sample: Sample, batches: list[int], kv_row_mb: float
               ) -> list[Candidate]:
    """AR's candidates: a batch of b documents costs b P + N pass(b, 1) (the module's docstring, step 3). Batch 1 is
    measured where the sample was decoded by AR (spec_s None), else predicted."""
    new, prefill = sample.new_tokens / sample.docs, sample.prefill_s / sample.docs
    return [Candidate("ar", None, b, b * new / (b * prefill + new * cost(costs, b, 1)),
                      b * prefill + new * cost(costs, b, 1), 1.0, None, 1.0, b * kv_row_mb,
                      b == 1 and sample.spec_s is None) for b in batches]


def predict(costs: dict[tuple[int, int], float], sample: Sample, method: str, drafter: str | None,
            verify_tokens: int, k_max: int, batches: list[int], kv_row_mb: float, lossless: bool,
            new: float | None = None, drafter_s: float | None = None, search: bool = False) -> list[Candidate]:
    """A speculative arm's candidates (the method with one drafter) from the measured pass costs and its sample
    decode (the module's docstring, step 3); none where the sample did not draft. new: a document's new tokens
    (default: the sample's; an arm measured on a shorter decode is predicted for the documents' whole length);
    drafter_s: the drafter's cost per row and pass (default: fitted to the sample's decode, whose batch-1
    candidate is then measured: the sample's own decode, at its own share; cmsd.projection gives it in the costs
    instead); search: each other batch size's share of drafts a row carries is searched (1 up to the verify
    budget's share or k_max), the fastest kept, else the share is the budget's. Beyond the widest pass measured at
    a batch size a pass is extrapolated (`cost`), which `tune` narrows by measuring wider passes where it could
    win."""
    fitted = drafter_s is None
    if not sample.iterations or (fitted and sample.spec_s is None):
        return []
    prefill = sample.prefill_s / sample.docs
    new = sample.new_tokens / sample.docs if new is None else new
    fed = 1 + sample.drafted / sample.iterations  # tokens a row fed a pass at batch 1
    if fitted:
        drafter_s = max(0.0, sample.spec_s - sample.docs * prefill - sample.iterations * cost(costs, 1, fed)
                        ) / sample.iterations
    runs = list(sample.runs) + [0] * (sample.iterations - len(sample.runs))
    sampled = max(runs, default=0)  # the widest share the sample's decode used (at least)

    def at(b: int, share: int) -> Candidate:
        gained = 1 + sum(min(a, share) for a in runs) / len(runs)
        t = min(fed, 1 + share)
        pass_s = cost(costs, b, t) + drafter_s * b
        return Candidate(method, drafter, b, b * new / (b * prefill + new / gained * pass_s),
                         b * prefill + new / gained * pass_s, gained,
                         sum(min(a, share) for a in runs) / max(1.0, len(runs) * (t - 1)),
                         1.0 if lossless and sample.identical else sample.agreement, b * kv_row_mb,
                         fitted and b == 1 and share >= sampled, share)

    out = []
    for b in batches:
        cap = min(verify_tokens // b - 1 if verify_tokens else k_max, k_max)
        shares = [sample.share] if fitted and b == 1 and sample.share else range(1, cap + 1) if search else [cap]
        options = [at(b, share) for share in shares if share > 0]
        if options:  # else no draft at this batch: it decodes as AR
            out.append(max(options, key=lambda c: c.tokens_per_s))
    return out


def settings_for(base: DecodeSettings, candidate: Candidate) -> DecodeSettings:
    """`base` decoding as `candidate` does: its method and batch size, and the verify budget that gives each of its
    rows its share of drafts (verify_tokens // rows - 1, the decoder's rule)."""
    settings = base.with_(method=candidate.method, batch_size=candidate.batch_size)
    if candidate.method != "ar" and candidate.drafts_per_row:
        settings = settings.with_(verify_tokens=candidate.batch_size * (1 + candidate.drafts_per_row))
    return settings


def cost(costs: dict[tuple[int, int], float], rows: int, tokens: float) -> float:
    """A pass's seconds at `rows` rows of `tokens` tokens: measured, or interpolated between measured token counts;
    beyond the widest measured, extrapolated along its last segment (a pass costs more with each token it carries,
    at least as its widest measured step did), or that width's cost where only one was measured."""
    points = sorted(t for r, t in costs if r == rows)
    if tokens > points[-1] and len(points) > 1:
        a, b = points[-2], points[-1]
        return costs[rows, b] + max(0.0, costs[rows, b] - costs[rows, a]) / (b - a) * (tokens - b)
    return sum(w * costs[rows, t] for t, w in between(points, tokens))


def between(points, x: float) -> list[tuple[Any, float]]:
    """The grid points on either side of x and their weights for a linear interpolation (the nearest end's alone
    beyond the grid)."""
    below = max((p for p in points if p <= x), default=min(points))
    above = min((p for p in points if p >= x), default=max(points))
    if above == below:
        return [(below, 1.0)]
    w = (x - below) / (above - below)
    return [(below, 1 - w), (above, w)]


def shapes(batches: list[int], verify_tokens: int, k_max: int, drafts: bool) -> list[tuple[int, int]]:
    """The (rows, tokens) whose pass cost the candidates need: one token at every batch, and up to 1 + the verify
    budget's share where a speculative candidate drafts."""
    out = set()
    for b in batches:
        share = min(verify_tokens // b - 1 if verify_tokens else k_max, k_max) if drafts else 0
        out |= {(b, t) for t in TOKEN_POINTS if t <= 1 + max(share, 0)} | {(b, 1 + max(share, 0))}
    return sorted(out)


def choose(candidates: list[Candidate], objective: str, allowed: set[tuple[str, str | None]]) -> tuple[int, int]:
    """(chosen, AR's best): by tokens a second, or by one document's time at batch 1 for `latency`; `allowed`: the
    arms (method, drafter) that may be chosen besides AR (lossless, or within the agreement floor)."""
    def key(i: int) -> float:
        return speed(candidates[i], objective)

    pool = [i for i, c in enumerate(candidates) if (objective == "throughput" or c.batch_size == 1)]
    chosen = max((i for i in pool if candidates[i].arm in allowed | {("ar", None)}), key=key)
    ar = max((i for i in pool if candidates[i].method == "ar"), key=key)
    return chosen, ar


def speed(candidate: Candidate, objective: str) -> float:
    """What the objective maximizes: tokens a second, or documents a second at batch 1 for `latency`."""
    return candidate.tokens_per_s if objective == "throughput" else 1 / candidate.doc_s


def batches_within(max_batch: int, kv_row_mb: float, free_mb: float) -> list[int]:
    """The competing batch sizes: BATCHES up to max_batch (and max_batch itself), within the memory bound."""
    fits = max(1, int(MEMORY_FRACTION * free_mb // kv_row_mb)) if kv_row_mb > 0 else max_batch
    top = min(max_batch, fits)
    return sorted({b for b in BATCHES if b < top} | {top})


def kv_row_mb(model: torch.nn.Module, tokens: int) -> float:
    """MiB of KV cache one row of `tokens` tokens holds (every layer's keys and values)."""
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    size = next(model.parameters()).element_size()
    return config.num_hidden_layers * 2 * heads * dim * size * tokens / 2**20


def free_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class Tuned:
    plan: Plan
    kept: list[Generation]  # the sample's generations (token ids; Decoder.with_text adds the text): their outputs


def drafter_key(pair: ModelPair) -> str | None:
    """The name a pair's drafter loads by (load_drafter): "ngram", "head" for the shipped head, a model's name or a
    head's directory."""
    drafter = pair.drafter
    if drafter is None or isinstance(drafter, str):
        return drafter
    if isinstance(drafter, FeatureHead) and Path(drafter.name).parent == SHIPPED:
        return HEAD_DRAFTER
    return drafter.name


def pair_for(pair: ModelPair, drafter: str | None) -> ModelPair:
    """`pair`'s target with the drafter named `drafter` (the pair itself where it already has it)."""
    return pair if drafter == drafter_key(pair) else ModelPair(pair.target, load_drafter(pair.target, drafter))


def alternatives(pair: ModelPair, settings: DecodeSettings) -> list[tuple[str, str]]:
    """The arms (method, drafter) a job's method is also measured with besides its own: the n-gram drafter (free to
    build), the head shipped for the target where one ships, and SpecBound's self-drafter where the target is
    calibrated for it (`cmsd-jobs calibrate`); none for AR or an encoder-decoder target."""
    if settings.method == "ar" or pair.target.is_encoder_decoder:
        return []
    own, out = (settings.method, drafter_key(pair)), []
    method = settings.method if settings.method != "specbound" else "cmasd"  # a drafter's arm runs CM-ASD
    if own[1] != "ngram":
        out.append((method, "ngram"))
    if not names_head(pair.drafter):
        try:
            shipped_head(pair.target.model)
            out.append((method, HEAD_DRAFTER))
        except HeadError:
            pass  # none ships for this target
    if own[0] != "specbound" and calibrated(pair.target):
        out.append(("specbound", "self"))
    return out


def calibrated(target: LoadedModel) -> bool:
    """Whether SpecBound is calibrated for `target` and its calibration does not predict a slowdown."""
    try:
        check_self_draftable(target.model)
    except ValueError:
        return False
    if target.dummy or not calibration_path(target.home).is_file():
        return False
    plan = SelfSpecPlan.make(target, DecodeSettings(method="specbound"))
    return not plan.fallback


def tune(pair: ModelPair, settings: DecodeSettings, prompts: list[list[int]], ids: list[str], objective: str,
         max_batch: int, lengths: list[int], drafters: list[tuple[str, str]] | None = None, docs: int | None = None,
         spare: tuple[list[list[int]], list[str]] = ([], []), references: list[str | None] | None = None) -> Tuned:
    """Decode `prompts` (the sample) and choose a plan (the module's docstring). `settings` is the job's own;
    max_batch: the most documents a batch could hold (the largest shard); lengths: the prompt tokens of the documents
    the plan is for (the longest bounds the batch's memory; the mean sets the cache a measured pass attends over);
    drafters: the arms (method, drafter) measured besides the pair's own (default: `alternatives`); docs: the
    documents the plan is for (the tuning's cost scales with them: another arm is measured only while the sample
    decodes stay within TUNE_SHARE of their predicted time; None: every arm is measured); spare: more documents
    (prompts, ids) the confirming decodes may take (their outputs are kept); references: the sample's reference
    texts, for relaxed verification's quality floor."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    start = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:  # the seconds since the last phase ended
        phases[name] = time.perf_counter() - start - sum(phases.values())

    model, notes, arms = pair.target.model, [], []  # the arms measured, the pair's own first
    if settings.drafts and pair.target.is_encoder_decoder:
        notes.append("an encoder-decoder target: only AR's batch size is tuned")
    elif settings.drafts:
        arms = [(settings.method, drafter_key(pair))] + (alternatives(pair, settings) if drafters is None else drafters)
    search = not settings.verify_tokens  # the verify budget's share is searched (auto), else the spec's
    k_max = settings.control.k_max
    row_mb = kv_row_mb(model, max(lengths) + settings.max_new_tokens + 2 * k_max + 8)
    batches = batches_within(max_batch, row_mb, free_memory_mb(pair.device)) if objective == "throughput" else [1]
    context = _bucket(sum(lengths) / len(lengths) + settings.max_new_tokens // 2)
    wanted = [(b, 1) for b in batches]
    if arms:
        wanted += [(1, t) for t in TOKEN_POINTS if t <= 1 + k_max] if search else \
            shapes(batches, settings.verify_tokens, k_max, True)
    widths = range(1, MAX_PASS + 1) if arms and search and pair.device.type == "cpu" else []  # the decoders' curve
    costs = _pass_costs(model, settings, wanted + [(1, t) for t in widths], context)
    curve = tuple(costs[1, t] / costs[1, 1] for t in widths)
    phase("pass costs")
    ar_decoder = Decoder(ModelPair(pair.target, None), settings.with_(method="ar", batch_size=1, trace=False))
    if not arms:
        ar_s, kept = _timed_decode(ar_decoder, prompts, ids, "ar")
        new = sum(len(g.token_ids) for g in kept)
        candidates = predict_ar(costs, Sample(len(prompts), new, max(0.0, ar_s - new * costs[1, 1])), batches,
                                row_mb)
        phase("sample decode")
        chosen, best_ar = choose(candidates, objective, set())
        return Tuned(_plan(objective, candidates, chosen, best_ar, start, notes, phases, curve), kept)
    ar: list[Generation] = []
    if not settings.lossless:  # relaxed: each arm's agreement with AR's own decode
        ar = _timed_decode(ar_decoder, prompts, ids, "ar")[1]
        phase("AR's decode")
    samples, allowed, outputs, spent, new = {}, set(), {}, 0.0, 0.0
    short = max(ALTERNATIVE_MIN_TOKENS, settings.max_new_tokens // 2)  # the others' outputs are not kept
    for arm in arms:
        if samples and docs is not None:  # another arm: measured while the tuning's budget allows
            expected = spent * short / settings.max_new_tokens
            budget = TUNE_SHARE * docs * new / max(c.tokens_per_s for c in predict_ar(costs, samples[arms[0]],
                                                                                      batches, row_mb))
            if spent + expected > budget:
                notes.append(f"{_name(arm)} not measured: its sample decode (~{expected:.1f} s) would take the "
                             f"tuning past {TUNE_SHARE:.0%} of the {docs} documents' predicted "
                             f"{budget / TUNE_SHARE:.0f} s")
                continue
        decoder = _arm_decoder(pair, arm, settings, settings.max_new_tokens if not samples else short, curve)
        sample, outputs[arm] = _measure_arm(decoder, model, prompts, ids, ar)
        new = new or sample.new_tokens / sample.docs  # the own arm's: the documents' whole length
        samples[arm], spent = sample, spent + (sample.spec_s or 0.0)
        phase(_name(arm))
        why = _refused(sample, settings, _quality_loss(pair, outputs[arm], ar, references))
        if why:
            notes.append(f"{_name(arm)}: {why}, left out")
        else:
            allowed.add(arm)

    def candidates_for(costs: dict[tuple[int, int], float]) -> list[Candidate]:
        return predict_ar(costs, samples[arms[0]], batches, row_mb) + [
            c for arm, sample in samples.items() for c in predict(
                costs, sample, *arm, settings.verify_tokens, k_max, batches, row_mb, settings.lossless, new,
                search=search)]

    candidates = candidates_for(costs)
    if search and objective == "throughput":
        fed = max((1 + s.drafted / s.iterations for s in samples.values() if s.iterations), default=1.0)
        widest = min([t for t in TOKEN_POINTS if t >= min(fed, 1 + k_max)] or [max(TOKEN_POINTS)])
        confirmable = [b for b in batches if b <= len(spare[0])]  # (a speculative batch > 1 is chosen confirmed)
        candidates = candidates_for(_widen(model, settings, costs, candidates_for, confirmable, widest, context))
        phase("wider passes")
    if all(c.method == "ar" for c in candidates):
        notes.append(f"the verify budget ({settings.verify_tokens} token(s) a pass) leaves no draft at any batch: "
                     f"{settings.method} decodes as AR does" if not search else
                     "the sample's decodes drafted nothing that was accepted: AR competes alone")
    chosen, best_ar = choose(candidates, objective, allowed)
    candidates, chosen, best_ar, confirmed = _confirm(pair, settings, candidates, chosen, best_ar, allowed,
                                                      objective, spare, notes, curve)
    if confirmed:
        phase("confirming decodes")
    # the sample's documents keep outputs the job would have written, whole (the own arm's; the others decoded
    # fewer tokens): strict, the own arm's where it is lossless (the target's own output); relaxed, the chosen
    # configuration's (AR's decode where AR was chosen); none otherwise (the job decodes them)
    own, best = arms[0], candidates[chosen]
    kept = outputs[own] if own in allowed and (settings.lossless or best.arm == own) else \
        ar if best.method == "ar" else []
    return Tuned(_plan(objective, candidates, chosen, best_ar, start, notes, phases, curve), kept + confirmed)



def _confirm(pair: ModelPair, settings: DecodeSettings, candidates: list[Candidate], chosen: int, best_ar: int,
             allowed: set[tuple[str, str | None]], objective: str, spare: tuple[list[list[int]], list[str]],
             notes: list[str], curve: tuple[float, ...] = ()) -> tuple[list[Candidate], int, int, list[Generation]]:
    """Real decodes on the spare documents, a batch each, of a speculative pick and of AR at its best batch (what it
    is compared with). A speculative candidate at a batch > 1 is chosen only once confirmed: its prediction rests on
    the acceptance measured at batch 1 (AR's on measured passes alone, batch 1's on its own decode); one whose batch
    the spare documents cannot fill gives way to the best that can be confirmed. The measured speed replaces the
    prediction, and the faster of the two is chosen. Returns the candidates, the chosen and AR's best indices, and
    the decodes the job keeps: both under strict verification (every lossless output is the target's own), else
    the chosen configuration's."""
    def key(i: int) -> float:
        return speed(candidates[i], objective)

    def trusted(i: int) -> bool:  # measured, or predicted from passes alone (AR) or from its own batch (batch 1)
        return candidates[i].measured or candidates[i].method == "ar" or candidates[i].batch_size == 1

    prompts, ids = spare
    if candidates[chosen].method == "ar":
        return candidates, chosen, best_ar, []  # AR's prediction is its measured passes': nothing to confirm
    pool = [i for i, c in enumerate(candidates) if (c.arm in allowed or c.method == "ar") and
            (objective == "throughput" or c.batch_size == 1)]
    promising = (1 + SPECULATIVE_MARGIN) * key(best_ar)
    fits = [i for i in pool if trusted(i) or candidates[i].batch_size <= len(prompts) and key(i) >= promising]
    if chosen not in fits:
        c = candidates[chosen]
        notes.append(f"{c.label} (predicted {c.tokens_per_s:.1f} tokens/s) not chosen: " + (
            f"a real decode must confirm it first and it needs {c.batch_size} documents, {len(prompts)} were "
            "left for it" if key(chosen) >= promising else f"a speculative batch > 1 is confirmed only where "
            f"predicted {1 + SPECULATIVE_MARGIN:.2f}x AR's best ({candidates[best_ar].label}) or more"))
        chosen = max(fits, key=key)
    used, decoded = 0, {}
    for i in [chosen, best_ar] if candidates[chosen].method != "ar" else []:
        c = candidates[i]
        if c.measured or len(prompts) - used < c.batch_size:
            continue  # (measured by the sample, or AR's prediction stands)
        part = slice(used, used + c.batch_size)
        used += c.batch_size
        decoder = Decoder(pair_for(pair, c.drafter) if c.method != "ar" else ModelPair(pair.target, None),
                          settings_for(settings, c), curve)
        decoder.prepare()
        seconds, gens = _timed_decode(decoder, prompts[part], ids[part], c.label)
        tokens = sum(len(g.token_ids) for g in gens)  # (a test's stopwatch may give it no time: as predicted)
        candidates[i] = replace(c, tokens_per_s=tokens / seconds if seconds > 0 else c.tokens_per_s,
                                doc_s=seconds or c.doc_s, measured=True, predicted_tokens_per_s=c.tokens_per_s)
        decoded[i] = gens
    chosen = max((i for i in (chosen, best_ar) if trusted(i)), key=key)
    keep = [g for i, gens in decoded.items() for g in gens if settings.lossless or i == chosen]
    return candidates, chosen, best_ar, keep


def _widen(model: torch.nn.Module, settings: DecodeSettings, costs: dict[tuple[int, int], float],
           candidates_for, batches: list[int], widest: int, context: int) -> dict[tuple[int, int], float]:
    """Measure wider passes where they could matter: at each batch size whose best speculative candidate, priced
    with the passes measured there (extrapolated beyond the widest: `cost`), beats AR's best by SPECULATIVE_MARGIN
    (else it could not be chosen: `_confirm`), the next token count of TOKEN_POINTS up to `widest` (the tokens a
    row fed a pass at batch 1, rounded up to a point: no row feeds more), until none could (on a CPU the second
    token a row already costs more than the drafts gain)."""
    while True:
        candidates = candidates_for(costs)
        best_ar = max(c.tokens_per_s for c in candidates if c.method == "ar")
        todo = []
        for b in batches:
            spec = max((c.tokens_per_s for c in candidates if c.method != "ar" and c.batch_size == b), default=0.0)
            measured = max(t for r, t in costs if r == b)
            wider = next((t for t in TOKEN_POINTS if measured < t <= widest), None)
            if spec > (1 + SPECULATIVE_MARGIN) * best_ar and wider is not None:
                todo.append((b, wider))
        if not todo:
            return costs
        costs = {**costs, **_pass_costs(model, settings, todo, context)}


def _pass_costs(model: torch.nn.Module, settings: DecodeSettings, wanted: list[tuple[int, int]], context: int
                ) -> dict[tuple[int, int], float]:
    with kernels.decode_kernels([model], settings.small_rows):
        return kernels.step_costs(model, wanted, context=context)


def _name(arm: tuple[str, str | None]) -> str:
    return f"{arm[0]}/{arm[1]}"


def _refused(sample: Sample, settings: DecodeSettings, quality_loss: float | None) -> str | None:
    """Why an arm may not compete (None: it may): strict, its output is not the target's greedy output on the
    sample; relaxed, its agreement with AR or its quality falls below the floors `cmsd-jobs eval` gates on."""
    if settings.lossless:
        return None if sample.identical else "its output is not the target's greedy output on the sample: not " \
            "lossless here"
    if (sample.agreement or 0) < RELAXED_MIN_AGREEMENT:
        return f"its agreement with AR on the sample ({sample.agreement:.2f}) is under {RELAXED_MIN_AGREEMENT}"
    if quality_loss is not None and quality_loss > RELAXED_MAX_QUALITY_LOSS:
        return (f"its chrF on the sample is {quality_loss:.1f} points below AR's (the floor: "
                f"{RELAXED_MAX_QUALITY_LOSS:g})")
    return None


def _quality_loss(pair: ModelPair, gens: list[Generation], ar: list[Generation],
                  references: list[str | None] | None) -> float | None:
    """AR's chrF on the sample's documents that have a reference minus the arm's (None: none has one, or no
    tokenizer gives the texts)."""
    tokenizer = pair.target.tokenizer
    pairs = [(g, h, r) for g, h, r in zip(gens, ar, references or []) if r is not None]
    if not pairs or tokenizer is None:
        return None
    import sacrebleu

    refs = [[r for _, _, r in pairs]]

    def chrf(outputs: list[Generation]) -> float:
        return sacrebleu.corpus_chrf([tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in outputs],
                                     refs).score

    return chrf([h for _, h, _ in pairs]) - chrf([g for g, _, _ in pairs])


def _arm_decoder(pair: ModelPair, arm: tuple[str, str | None], settings: DecodeSettings, new_tokens: int,
                 curve: tuple[float, ...] = ()) -> Decoder:
    """The decoder that measures one arm on the sample: batch 1, traced, with its one-time measurements taken (the
    automatic verify budget's among them, where the spec sets none: from `curve`, the tuning's own passes)."""
    method, drafter = arm
    decoder = Decoder(pair_for(pair, drafter), settings.with_(method=method, batch_size=1, trace=True,
                                                              max_new_tokens=new_tokens), curve)
    decoder.prepare()
    return decoder


def _plan(objective: str, candidates: list[Candidate], chosen: int, ar: int, start: float, notes: list[str],
          phases: dict[str, float], curve: tuple[float, ...]) -> Plan:
    return Plan(objective, candidates, chosen, ar, time.perf_counter() - start,
                datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "measured", notes, phases,
                curve)


def _measure_arm(decoder: Decoder, model: torch.nn.Module, prompts: list[list[int]], ids: list[str],
                 ar: list[Generation]) -> tuple[Sample, list[Generation]]:
    """Decode the sample with one arm at batch 1 and check it: strict, each output against the target's greedy
    output (one pass over it); relaxed, its agreement with AR's decode `ar`. The prefill of each prompt is timed."""
    settings = decoder.settings
    spec_s, gens = _timed_decode(decoder, prompts, ids, f"{settings.method}/{drafter_key(decoder.pair)}")
    with kernels.decode_kernels([model], settings.small_rows):
        checked = [_prefill_and_check(model, p, g.token_ids) for p, g in zip(prompts, gens)]
    if settings.temperature > 0:  # strict sampling is lossless in distribution, not token for token: no check
        checked = [(seconds, True) for seconds, _ in checked]
    if ar:
        matches, positions, _ = token_agreement([(g.token_ids, h.token_ids[:settings.max_new_tokens])
                                                 for g, h in zip(gens, ar)])  # (an arm may decode fewer tokens)
        agreement = matches / max(1, positions)
    else:
        agreement = sum(ok for _, ok in checked) / len(checked)
    stats = [g.stats for g in gens]
    sample = Sample(len(prompts), sum(len(g.token_ids) for g in gens), sum(s for s, _ in checked), spec_s,
                    sum(s.iterations for s in stats), sum(s.drafted for s in stats), tuple(_runs(gens)),
                    decoder.share(1), agreement, all(ok for _, ok in checked))
    return sample, gens


def _timed_decode(decoder: Decoder, prompts: list[list[int]], ids: list[str], name: str
                  ) -> tuple[float, list[Generation]]:
    out: list[Generation] = []
    seconds = kernels.timed(("decode", name, len(prompts)), lambda: out.extend(decoder.generate_ids(prompts, ids)))
    return seconds, out


def _prefill_and_check(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> tuple[float, bool]:
    """The seconds of the target's prefill of `prompt` (by the stopwatch), and whether `tokens` is its greedy
    continuation: one pass over them after the prompt's cache, each the argmax of the logits before it."""
    cache, logits = DynamicCache(), []
    with torch.inference_mode():
        def prefill() -> None:
            logits.append(model(input_ids=torch.tensor([prompt], device=model.device), past_key_values=cache,
                                use_cache=True, logits_to_keep=1).logits[0])
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)  # timed to its end

        seconds = kernels.timed(("prefill", len(prompt)), prefill)
        if len(tokens) > 1:
            logits.append(model(input_ids=torch.tensor([tokens[:-1]], device=model.device), past_key_values=cache,
                                use_cache=True).logits[0])
    return seconds, torch.cat(logits).argmax(-1).tolist() == list(tokens) if tokens else True


def _runs(generations: list[Generation]) -> list[int]:
    """Drafts accepted per verify pass that drafted, from the traces."""
    runs: dict[tuple[str, int], int] = {}
    for g in generations:
        trace = g.trace or {}
        for doc, iteration, accepted in zip(trace.get("doc_id", []), trace.get("iteration", []),
                                            trace.get("accepted", [])):
            runs[doc, iteration] = runs.get((doc, iteration), 0) + int(accepted)
    return list(runs.values())


def _bucket(tokens: float) -> int:
    """A cache length rounded to the nearest power of two, at least 64 (so that measured costs are reused across
    jobs)."""
    return 1 << max(6, round(math.log2(max(1.0, tokens))))


# -- plans on disk ---------------------------------------------------------------------------------------------
def plan_key(pair: ModelPair, settings: DecodeSettings, objective: str, max_batch: int, task: str) -> dict[str, Any]:
    """What a plan holds for: the machine, the models, the decode settings (less the batch size it picks), the
    task, the objective, the largest batch, and the versions of the code and of torch and transformers."""
    import transformers

    drafter = pair.drafter
    decode = {k: v for k, v in settings.to_dict().items() if k not in ("batch_size", "seed", "trace")}
    return {"machine": kernels.machine(pair.device), "target": fingerprint(pair.target.model),
            "drafter": fingerprint(drafter.model) if isinstance(drafter, LoadedModel) else
            fingerprint(drafter) if isinstance(drafter, torch.nn.Module) else drafter,
            "dtype": str(next(pair.target.model.parameters()).dtype), "decode": decode, "task": task,
            "objective": objective, "max_batch": max_batch, "code": code_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def plan_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir() / "plans" / f"{digest}.json"


def load_plan(key: dict[str, Any]) -> Plan | None:
    """The plan kept for `key`, as reused; None when there is none (or it is for another key)."""
    try:
        saved = json.loads(plan_path(key).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("key") != json.loads(json.dumps(key, default=str)):
        return None
    plan = Plan.from_dict(saved["plan"])
    plan.source, plan.seconds = "reused", 0.0  # this job spent nothing on it (phases: what measuring it took)
    return plan


def save_plan(key: dict[str, Any], plan: Plan) -> Path:
    path = plan_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps({"key": key, "plan": plan.to_dict()}, default=str, indent=1))
    os.replace(partial, path)  # atomic: actors of one machine tuning at once each write a whole file
    return path


_code: str | None = None


def code_version() -> str:
    """A digest of cmsd's source: a plan is measured again once the decoder's code changes."""
    global _code
    if _code is None:
        digest = hashlib.sha256()
        for path in sorted(Path(__file__).parent.rglob("*.py")):
            digest.update(path.read_bytes())
        _code = digest.hexdigest()[:16]
    return _code
