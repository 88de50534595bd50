"""The decode loop: draft, verify, commit, adapt, for a batch of rows at once.

Each row keeps its own draft length and acceptance; finished rows leave the batch. The loop only coordinates
the drafter (cmsd.drafters.*), the verification rule (cmsd.verify), the controller (cmsd.control) and the KV
states (cmsd.kv); one host transfer per iteration (cmsd.syncs.HostReads) carries back the verdict for bookkeeping,
the controller's next draft lengths and the caches' used slots: on a GPU, one sync per iteration (a head tree and
a gated draft cost more: cmsd.syncs).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

import torch

from cmsd.control import Controller
from cmsd.drafters.base import Draft, Drafter, Sampler
from cmsd.drafters.head import FeatureHead, HeadDrafter, names_head
from cmsd.drafters.model import ModelDrafter
from cmsd.drafters.ngram import NgramDrafter, NgramTreeDrafter
from cmsd.drafters.selfspec import SelfSpecPlan
from cmsd.kernels import decode_kernels, forward_costs
from cmsd.kv import HoleyState, SyncState, open_state, refill_state, refillable
from cmsd.models import LoadedModel, ModelPair
from cmsd.settings import DecodeSettings
from cmsd.stats import TRACE_COLUMNS, DocStats
from cmsd.syncs import HostReads, Read, outside_loop, to_device
from cmsd.verify import Rule, Verdict, verify, verify_tree


@dataclass
class Generation:
    doc_id: str
    token_ids: list[int]  # new tokens (EOS included)
    prompt_tokens: int
    stats: DocStats
    finish_reason: str = "length"  # eos | length | stop
    text: str = ""
    trace: dict[str, list] | None = None  # columns TRACE_COLUMNS, one row per drafted token


@dataclass
class _Row:
    """Host-side record of one row while it decodes."""

    doc_id: str
    prompt_tokens: int
    budget: int  # max new tokens for this row
    tokens: list[int] = field(default_factory=list)
    stats: DocStats = field(default_factory=lambda: DocStats(docs=1))
    finish: str | None = None
    trace: dict[str, list] | None = None
    started: float = 0.0  # perf_counter when the row joined a batch


@dataclass
class _Seen:
    """What the host reads of an iteration (asked for from HostReads: one transfer with the rest of it)."""

    accepted: Read  # [B] accepted drafted tokens
    next_token: Read  # [B]
    lengths: Read  # [B] drafted tokens
    tokens: Read  # [B, K] drafted tokens (a tree's accepted path first)
    trace: tuple[Read, Read, Read] | None  # confidences [B, K, 4], thresholds tau [B, K], the target's top1 [B, K+1]


class Decoder:
    """Decodes batches of prompts with a target and a drafter under one DecodeSettings."""

    def __init__(self, pair: ModelPair, settings: DecodeSettings, costs: tuple[float, ...] | None = None) -> None:
        if settings.drafts and pair.drafter is None:
            raise ValueError(f"method {settings.method!r} needs a drafter (a model, 'ngram' or 'self'); "
                             "use method 'ar' to decode with the target alone")
        if settings.method == "specbound" and pair.drafter != "self":
            raise ValueError("method 'specbound' drafts with the target's own shallow layers: use drafter 'self'")
        if pair.drafter == "self" and settings.method != "specbound":
            raise ValueError("drafter 'self' is SpecBound's self-drafter: use method 'specbound'")
        self.pair, self.settings = pair, settings
        self.self_spec = SelfSpecPlan.make(pair.target, settings) if settings.method == "specbound" else None
        if self.self_spec and self.self_spec.fallback:
            settings = settings.with_(method="ar")  # calibration predicts a slowdown: plain AR (warned)
            self.settings = settings
        self.rule = Rule(threshold=settings.control if settings.threshold_rule else None,
                         margin=settings.margin if settings.margin_rule else None)
        greedy = settings.temperature == 0 and self.rule.strict
        decoder_only = not pair.target.model.config.is_encoder_decoder
        head = names_head(pair.drafter)  # a head, or (a submit-time check) the name of one
        tree = settings.head if head else settings.ngram  # the drafter's tree settings
        if tree.branches == 0:  # auto: a tree where it is exact
            tree = replace(tree, branches=2 if greedy and decoder_only else 1)
            settings = settings.with_(**{"head" if head else "ngram": tree})
            self.settings = settings
        self.tree = settings.drafts and (head or pair.drafter == "ngram") and tree.branches > 1
        name = "head.branches" if head else "ngram.branches"
        if self.tree and not greedy:
            raise ValueError(f"{name} > 1 (tree drafts) needs strict greedy decoding: temperature 0 and "
                             "verify 'strict' (or a method without a relaxed rule)")
        if self.tree and not decoder_only:
            raise ValueError(f"{name} > 1 (tree drafts) needs a decoder-only target")
        self.eos = eos_ids(pair.target)
        # what a pass over 1, 2, ... tokens costs in 1-token steps (the automatic budget, a single row's tree cut):
        # given (a tuning measured it at the job's context), else measured at the first decode (forward_costs)
        self.costs = tuple(costs) if costs else None
        self.verify_tokens = settings.verify_tokens  # 0: resolved at the first decode (measured on CPU)
        self.iterations = 0  # decode-loop iterations (verify passes over the live rows) of the last generate call

    # -- text level ------------------------------------------------------------------------------------------
    def generate(self, prompts: list[str], doc_ids: list[str] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[Generation]:
        """Decode rendered prompts (see PromptTemplate). Returns one Generation per prompt, in order."""
        return self.with_text(self.generate_ids(self.encode(prompts), doc_ids, progress))

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """The token ids `generate` decodes for rendered prompts."""
        return [encode_prompt(self.pair.tokenizer, p) for p in prompts]

    def with_text(self, gens: list[Generation]) -> list[Generation]:
        """Fill each generation's text: its tokens decoded, cut at the first stop string."""
        for gen in gens:
            gen.text = _cut_at_stop(self.pair.tokenizer.decode(gen.token_ids, skip_special_tokens=True),
                                    self.settings.stop)
        return gens

    # -- token level -----------------------------------------------------------------------------------------
    def generate_ids(self, prompts: list[list[int]], doc_ids: list[str] | None = None,
                     progress: Callable[[int], None] | None = None) -> list[Generation]:
        """Decode token-id prompts, longest first (less padding), settings.batch_size rows at a time. With
        settings.continuous the next document takes a finished row's place at once; otherwise each batch drains
        before the next starts. `progress(1)` is called as each document finishes."""
        doc_ids = doc_ids or [str(i) for i in range(len(prompts))]
        if len(doc_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(doc_ids)} doc ids")
        for doc_id, prompt in zip(doc_ids, prompts):
            if not prompt:
                raise ValueError(f"document {doc_id}: empty prompt")
            if len(prompt) >= self.pair.max_context:
                raise ValueError(f"document {doc_id}: prompt of {len(prompt)} tokens does not fit the model's "
                                 f"context of {self.pair.max_context}")
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[Generation | None] = [None] * len(prompts)
        self.iterations = 0
        size = self.settings.batch_size
        step = max(1, len(order)) if self.continuous else size
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            gens = self._decode_batch([prompts[i] for i in chunk], [doc_ids[i] for i in chunk], start, progress)
            for i, gen in zip(chunk, gens):
                out[i] = gen
        return out  # type: ignore[return-value]

    @property
    def continuous(self) -> bool:
        """Whether a finished row's place goes to the next document (a SyncState's rows cannot start over)."""
        return self.settings.continuous and refillable(self.pair.target.model)

    @torch.inference_mode()
    def _decode_batch(self, prompts: list[list[int]], doc_ids: list[str], seed_offset: int,
                      progress: Callable[[int], None] | None) -> list[Generation]:
        """Decode a queue of prompts, at most settings.batch_size rows at once."""
        settings = self.settings
        generator = torch.Generator(device=self.pair.device).manual_seed(settings.seed + seed_offset)
        sampler = Sampler(settings.temperature, generator)
        with ExitStack() as kernels:
            with outside_loop():
                kernels.enter_context(decode_kernels(self._models(), settings.small_rows))
                self._measure()
            return self._decode_rows(prompts, doc_ids, sampler, generator, progress)

    def prepare(self) -> None:
        """Take the one-time measurements now (the kernels' row counts, the verify budget's cost curve; kept on disk
        per machine and model), so that no timed decode pays for them (a worker calls it as it loads)."""
        with decode_kernels(self._models(), self.settings.small_rows):
            self._measure()

    def _models(self) -> list:
        drafter = self.pair.drafter
        return [self.pair.target.model, drafter.model if isinstance(drafter, LoadedModel) else
                drafter if isinstance(drafter, FeatureHead) else None]

    def _measure(self) -> None:
        if not self.settings.verify_tokens and self.settings.drafts:
            self.costs = self.costs or forward_costs(self.pair.target.model, MAX_PASS)
            self.verify_tokens = pass_budget(self.costs, self.pair.device)

    def _decode_rows(self, prompts: list[list[int]], doc_ids: list[str], sampler: Sampler,
                     generator: torch.Generator, progress: Callable[[int], None] | None) -> list[Generation]:
        settings, device = self.settings, self.pair.device
        queue = deque(range(len(prompts)))
        rows: list[_Row] = []
        reads = HostReads()  # what the host reads of an iteration: one transfer

        def admit(count: int) -> list[int]:
            """The next documents of the queue; returns their indices into `prompts`."""
            taken = [queue.popleft() for _ in range(min(count, len(queue)))]
            for i in taken:  # rows[i] is the record of prompts[i]: the queue is taken in order
                budget = min(settings.max_new_tokens, self.pair.max_context - len(prompts[i]))
                rows.append(_Row(doc_ids[i], len(prompts[i]), budget, started=time.perf_counter(),
                                 trace={c: [] for c in TRACE_COLUMNS} if settings.trace else None))
            return taken

        with outside_loop():
            live = admit(settings.batch_size)  # batch row b decodes prompts[live[b]]
            capacity = max(len(prompts[i]) for i in live) + settings.max_new_tokens + 2 * settings.control.k_max + 8
            drafting = settings.drafts and self.drafts_at(len(live))  # none left at this batch: AR's own path
            target, pending, drafter = self._open([prompts[i] for i in live], capacity, sampler, drafting,
                                                  reads)  # 1. prefill
            controller = Controller(settings, len(live), device, reads)
        iteration, mark = 0, rows[0].started
        while live:
            k_host = self._draft_lengths([rows[r] for r in live], controller)  # 2. how far to draft
            controller.begin_draft()
            draft = (drafter.propose(to_device(torch.tensor(k_host), device), k_host, controller.gate) if drafter
                     else Draft.empty(len(live), device))
            verdict, draft, tau = self._verify(target, pending, draft, controller, generator)  # 3. verify, 4. roll back
            controller.observe(draft, verdict.accepted)  # 5. adapt
            seen = self._ask(reads, draft, verdict, tau)
            if drafter:
                drafter.commit(verdict.accepted, verdict.next_token, verdict.path)
            pending = verdict.next_token
            self._record([rows[r] for r in live], seen, k_host, iteration)  # 6. the host's bookkeeping
            iteration += 1
            self.iterations += 1
            now = time.perf_counter()
            for r in live:  # the iteration's wall time, shared by the rows in it
                rows[r].stats.decode_s += (now - mark) / len(live)
            mark = now
            done = [b for b, r in enumerate(live) if rows[r].finish is not None]
            if not done:
                continue
            if progress:
                progress(len(done))
            with outside_loop():
                new = admit(len(done)) if self.continuous else []  # 7. the next documents take finished rows' places
                if new:
                    places = done[:len(new)]
                    pending = pending.clone()
                    pending[torch.tensor(places, device=device)] = self._refill(target, drafter, controller, places,
                                                                                [prompts[i] for i in new])
                    for b, i in zip(places, new):
                        live[b] = i
                stay = [b for b, r in enumerate(live) if rows[r].finish is None]
                if len(stay) < len(live):  # 8. finished rows with nothing to take their place leave the batch
                    index = torch.tensor(stay, device=device, dtype=torch.long)
                    for part in (target, drafter, controller):
                        if part:
                            part.select(index)
                    pending = pending[index]
                    live = [live[b] for b in stay]
        return [self._finish(row) for row in rows]

    def _draft_lengths(self, rows: list[_Row], controller: Controller) -> list[int]:
        """How far each row drafts, on the host: its share of the verify budget and its remaining tokens cap a tree,
        and the controller's k_j within them a chain."""
        share = self.share(len(rows))
        budget = [min(share, row.budget - len(row.tokens) - 1) for row in rows]
        return [max(b, 0) for b in budget] if self.tree else controller.plan(budget)

    def _ask(self, reads: HostReads, draft: Draft, verdict: Verdict, tau: torch.Tensor) -> _Seen:
        """Ask for what the host reads of this iteration: it comes back in one transfer with what the controller and
        the caches asked for (the first read of any of it)."""
        trace = (reads.ask(draft.conf), reads.ask(tau), reads.ask(verdict.top1)) if self.settings.trace else None
        return _Seen(reads.ask(verdict.accepted), reads.ask(verdict.next_token), reads.ask(draft.lengths),
                     reads.ask(draft.tokens), trace)

    def _refill(self, target: HoleyState, drafter: Drafter | None, controller: Controller, places: list[int],
                prompts: list[list[int]]) -> torch.Tensor:
        """Batch rows `places` start over with new prompts; returns the first token each of them feeds."""
        first = refill_state(target, places, prompts)
        if drafter:
            drafter.refill(places, prompts)
        controller.refill(places)
        return first

    def _verify(self, target: HoleyState | SyncState, pending: torch.Tensor, draft: Draft, controller: Controller,
                generator: torch.Generator) -> tuple[Verdict, Draft, torch.Tensor]:
        """Verify [pending, drafts] in one target pass and roll back what was rejected. Returns the verdict, the
        draft (a tree comes back as a chain, its accepted path first) and the thresholds tau [B, K]."""
        tokens = torch.cat([pending[:, None], draft.tokens], 1)  # [B, 1 + K]
        valid = torch.cat([torch.ones_like(pending[:, None], dtype=torch.bool),
                           torch.arange(draft.tokens.shape[1], device=pending.device) < draft.lengths[:, None]], 1)
        known = None if not draft.tokens.shape[1] else valid  # no draft: every token valid, as the host knows
        if draft.parents is not None and draft.tokens.shape[1]:  # a tree: each draft sees the cache, the pending
            #                                                      token and its ancestors
            logits = target.feed(tokens, valid, parents=torch.cat([torch.full_like(tokens[:, :1], -1),
                                                                   draft.parents + 1], 1))
            verdict = verify_tree(draft.tokens, draft.lengths, draft.parents, logits)
            on_path = torch.arange(draft.tokens.shape[1], device=pending.device) < verdict.accepted[:, None]
            keep = torch.zeros_like(valid).scatter(1, 1 + verdict.path, on_path)  # [B, 1 + K] the accepted path
            keep[:, 0] = True  # and the pending token
            target.commit(keep)
            return verdict, draft.reorder(verdict.path), torch.zeros_like(draft.conf[..., 3])
        logits = target.feed(tokens, known)  # [B, 1 + K, V]
        tau = controller.thresholds(draft.conf[..., 3])
        verdict = verify(self.rule, draft.tokens, draft.lengths, logits, tau, self.settings.temperature, draft.q,
                         generator)
        target.commit(1 + verdict.accepted)
        return verdict, draft, tau

    def drafts_at(self, rows: int) -> bool:
        """Whether the verify budget leaves a row any draft at a batch of `rows` rows."""
        return self.share(rows) > 0

    def share(self, rows: int) -> int:
        """The most a row drafts at a batch of `rows` rows: verify_tokens // rows - 1 (k_max with no budget). With
        the automatic budget a single row's tree takes the whole measured cost curve: its cut (worth_drafting)
        already keeps only the nodes that pay for their share of the pass, which a fixed budget can only
        approximate (on this CPU, CNN/DM at one thread: 1.78 tokens a pass against 1.43 under the 1.3-step cap)."""
        if not self.verify_tokens:
            return self.settings.control.k_max
        if rows == 1 and self.tree and self.costs and not self.settings.verify_tokens:
            return len(self.costs) - 1
        return self.verify_tokens // rows - 1

    def _open(self, prompts: list[list[int]], capacity: int, sampler: Sampler, drafting: bool, reads: HostReads
              ) -> tuple[HoleyState | SyncState, torch.Tensor, Drafter | None]:
        """Prefill the target (and a model drafter, when `drafting`); returns the target state, the first token each
        row feeds, and the drafter (None: no drafter work at all, as AR). They all read with `reads`."""
        settings, drafter, model = self.settings, self.pair.drafter, self.pair.target.model
        if self.self_spec and drafting:
            return self.self_spec.open(model, prompts, capacity, settings.confidence, sampler, reads)
        target, first = open_state(model, prompts, capacity, features=drafting and isinstance(drafter, FeatureHead),
                                   reads=reads)
        if not drafting:
            return target, first, None
        if isinstance(drafter, FeatureHead):
            return target, first, HeadDrafter(drafter, target, prompts, capacity, settings.confidence, sampler,
                                              settings.head if self.tree else None, self.costs, reads)
        if isinstance(drafter, LoadedModel):
            return target, first, ModelDrafter(drafter.model, prompts, capacity, settings.confidence, sampler, reads)
        if drafter == "ngram":
            vocab = model.config.get_text_config(decoder=True).vocab_size
            args = (prompts, vocab, settings.ngram, settings.confidence, sampler, self.pair.device)
            return target, first, (NgramTreeDrafter(*args, costs=self.costs, reads=reads) if self.tree
                                   else NgramDrafter(*args, reads=reads))
        raise ValueError(f"unknown drafter {drafter!r}")

    def _record(self, rows: list[_Row], seen: _Seen, k: list[int], iteration: int) -> None:
        """Append each row's accepted drafts and next token (cut at EOS / budget) and count everything."""
        accepted, nxt, lengths, drafted = (r.value for r in (seen.accepted, seen.next_token, seen.lengths, seen.tokens))
        conf, tau, top1 = (r.value for r in seen.trace) if seen.trace else (None, None, None)
        now = time.perf_counter()
        for i, row in enumerate(rows):
            a, n = accepted[i], lengths[i]
            if row.trace is not None and n:
                _trace(row, iteration, drafted[i][:n], a, k[i], conf[i][:n], tau[i][:n], top1[i][:n])
            new = drafted[i][:a] + [nxt[i]]
            for t in new:
                row.tokens.append(t)
                if t in self.eos or len(row.tokens) >= row.budget:
                    row.finish = "eos" if t in self.eos else "length"
                    break
            if self.settings.stop and row.finish is None and self._hit_stop(row):
                row.finish = "stop"
            s = row.stats
            s.target_calls, s.iterations, s.drafted, s.accepted = s.target_calls + 1, s.iterations + 1, s.drafted + n, s.accepted + a
            s.rollbacks += int(a < n)
            if row.finish:
                s.latency_s = now - row.started

    def _hit_stop(self, row: _Row) -> bool:
        tokenizer = self.pair.tokenizer
        if tokenizer is None:
            return False
        text = tokenizer.decode(row.tokens[-64:], skip_special_tokens=True)
        return any(stop in text for stop in self.settings.stop)

    def _finish(self, row: _Row) -> Generation:
        row.stats.new_tokens = len(row.tokens)
        return Generation(row.doc_id, row.tokens, row.prompt_tokens, row.stats, row.finish or "length", trace=row.trace)


def _trace(row: _Row, iteration: int, tokens: list[int], accepted: int, k: int, conf: list[list[float]],
           tau: list[float], top1: list[int]) -> None:
    """One row's drafted tokens of an iteration (host copies: tokens, conf, tau, top1 cut to its n drafts)."""
    n = len(tokens)
    columns = {
        "doc_id": [row.doc_id] * n, "iteration": [iteration] * n,
        "position": list(range(len(row.tokens), len(row.tokens) + n)), "token_id": tokens,
        "c_ent": [c[0] for c in conf], "c_margin": [c[1] for c in conf], "c_soft": [c[2] for c in conf],
        "c": [c[3] for c in conf], "k_j": [k] * n, "tau_t": tau, "accepted": [j < accepted for j in range(n)],
        "target_top1": top1,
    }
    for name, values in columns.items():
        row.trace[name].extend(values)


MAX_PASS = 8  # the widest pass whose cost is measured for the automatic verify budget
MAX_PASS_COST = 1.3  # ... which is the widest pass costing at most this many 1-token steps


def pass_budget(costs: tuple[float, ...] | None, device: torch.device) -> int:
    """decode.verify_tokens = 0 (auto): the widest pass (tokens over the batch) such that it and every narrower pass
    cost at most MAX_PASS_COST single steps by the measured curve; 4 on CPU where nothing was measured (an
    encoder-decoder); no cap (0) on a GPU, whose forward stays memory bound for many more tokens."""
    if not costs:
        return 4 if device.type == "cpu" else 0
    over = [n for n, c in enumerate(costs, 1) if n > 1 and c > MAX_PASS_COST]
    return over[0] - 1 if over else len(costs)


def eos_ids(model: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (model.model.generation_config, model.model.config, model.tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return ids


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A rendered prompt's token ids. A prompt rendered with a chat template may already carry the BOS token: no
    second one is added."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cuts = [text.index(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text
