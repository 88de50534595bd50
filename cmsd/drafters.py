"""Drafters propose tokens with the drafter's distribution q and its confidence; they know nothing of schedules.

    propose(k [B], keep) -> Draft    draft up to k[b] tokens for row b; `keep(C [B]) -> [B] bool` says whether a
                                     candidate with confidence C is proposed (the controller's c_stop gate)
    commit(accepted [B], next [B],   the verdict: the first accepted[b] drafts stand, then the token next[b]; for a
           path [B, K] | None)       tree draft, the first accepted[b] drafts in the order path[b]
    select(rows)                     keep only these rows
    refill(rows, prompts)            these rows start over with new prompts (continuous batching), between iterations
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from transformers import PreTrainedModel

from cmsd.confidence import confidence
from cmsd.kv import open_state, refill_state
from cmsd.settings import ConfidenceSettings, NgramSettings

Keep = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Draft:
    tokens: torch.Tensor  # [B, K] drafted token ids (0 past a row's length)
    lengths: torch.Tensor  # [B] drafted tokens per row
    conf: torch.Tensor  # [B, K, 4] C_ent, C_margin, C_soft, C of each drafted token
    q: torch.Tensor | None = None  # [B, K, V] drafter probabilities (kept only when sampling)
    parents: torch.Tensor | None = None  # [B, K] a tree draft: each token's parent, -1 = the pending token

    @classmethod
    def empty(cls, batch: int, device: torch.device) -> Draft:
        return cls(torch.zeros(batch, 0, dtype=torch.long, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device), torch.zeros(batch, 0, 4, device=device))

    def reorder(self, order: torch.Tensor) -> Draft:
        """The drafted tokens in the order `order` [B, K] (a tree's accepted path first), read as a chain."""
        assert self.q is None, "tree drafts are greedy"
        conf = self.conf.gather(1, order[..., None].expand_as(self.conf))
        return replace(self, tokens=self.tokens.gather(1, order), conf=conf, parents=None)


@dataclass(frozen=True)
class Sampler:
    """Greedy (temperature 0) or sampling from softmax(logits / temperature)."""

    temperature: float = 0.0
    generator: torch.Generator | None = None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / max(self.temperature, 1e-6), dim=-1)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [B, V] -> [B] token ids."""
        if self.temperature == 0:
            return logits.argmax(-1)
        return torch.multinomial(self.probs(logits), 1, generator=self.generator).squeeze(1)


class Drafter(ABC):
    @abstractmethod
    def propose(self, k: torch.Tensor, keep: Keep) -> Draft: ...

    @abstractmethod
    def commit(self, accepted: torch.Tensor, next_token: torch.Tensor, path: torch.Tensor | None = None) -> None: ...

    @abstractmethod
    def select(self, rows: torch.Tensor) -> None: ...

    @abstractmethod
    def refill(self, rows: list[int], prompts: list[list[int]]) -> None: ...


class _DraftBuffer:
    """Collects one draft: [B, K] tokens, [B, K, 4] confidences and, when sampling, [B, K, V] q."""

    def __init__(self, batch: int, k: int, device: torch.device, keep_q: bool) -> None:
        self.tokens = torch.zeros(batch, k, dtype=torch.long, device=device)
        self.conf = torch.zeros(batch, k, 4, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.keep_q = keep_q
        self.q: torch.Tensor | None = None

    def put(self, j: int, ok: torch.Tensor, token: torch.Tensor, conf: torch.Tensor, q: torch.Tensor) -> None:
        """Column j for all rows: ok [B], token [B], conf [B, 4], q [B, V]."""
        self.tokens[:, j] = torch.where(ok, token, 0)
        self.conf[:, j] = conf * ok[:, None]
        if self.keep_q:
            self.q_columns(q.shape[-1])[:, j] = q
        self.lengths += ok.long()

    def take(self, j: int, z: torch.Tensor, active: torch.Tensor, k: torch.Tensor, keep: Keep,
             conf: ConfidenceSettings, sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Draft column j from the drafter's logits z [B, V]: each active row picks a token and keeps it where
        `keep` allows its confidence. Returns the tokens [B], the rows that draft on (kept, under their k [B]) and
        whether drafting stops here."""
        c = confidence(z, conf)
        x = sampler.pick(z)
        ok = active & keep(c[:, 3])
        self.put(j, ok, x, c, sampler.probs(z) if self.keep_q else z)
        active = ok & (j + 1 < k)
        return x, active, j + 1 == self.tokens.shape[1] or not bool(active.any())

    def q_columns(self, vocab: int) -> torch.Tensor:
        if self.q is None:
            self.q = torch.zeros(*self.tokens.shape, vocab, device=self.tokens.device)
        return self.q

    def draft(self) -> Draft:
        """The draft, cut to its longest row: columns no row filled would cost verification for nothing."""
        width = int(self.lengths.max()) if len(self.lengths) else 0
        q = self.q[:, :width] if self.q is not None else None
        return Draft(self.tokens[:, :width], self.lengths, self.conf[:, :width], q)


class ModelDrafter(Drafter):
    """A separate (small) Hugging Face model sharing the target's tokenizer, with its own KV cache."""

    def __init__(self, model: PreTrainedModel, prompts: list[list[int]], capacity: int, conf: ConfidenceSettings,
                 sampler: Sampler) -> None:
        self.state, first = open_state(model, prompts, capacity)
        self.conf_settings, self.sampler = conf, sampler
        device = model.device
        self.pending = first[:, None]  # [B, P] tokens not yet in the drafter's cache
        self.pending_ok = torch.ones_like(self.pending, dtype=torch.bool)
        self.fed_drafts = torch.zeros(len(first), dtype=torch.long, device=device)  # drafts fed to the cache
        self.tokens = self.pending[:, :0]
        self.fed = False

    @torch.inference_mode()
    def propose(self, k: torch.Tensor, keep: Keep) -> Draft:
        batch, width = len(k), int(k.max()) if len(k) else 0
        device = self.pending.device
        self.fed = width > 0
        if width == 0:
            self.tokens = self.pending[:, :0]
            return Draft.empty(batch, device)
        k = k.to(device)
        buf = _DraftBuffer(batch, width, device, keep_q=self.sampler.temperature > 0)
        tokens, valid = self.pending, self.pending_ok
        active = k > 0
        self.fed_drafts.zero_()
        for j in range(width):
            logits = self.state.feed(tokens, valid)  # [B, W, V]
            last = (valid.long() * torch.arange(valid.shape[1], device=device)).argmax(1)
            z = logits[torch.arange(batch, device=device), last]  # [B, V] logits after each row's last token
            x, active, done = buf.take(j, z, active, k, keep, self.conf_settings, self.sampler)
            if done:
                break
            tokens, valid = x[:, None], active[:, None]
            self.fed_drafts += active.long()
        self.tokens = buf.tokens
        return buf.draft()

    def commit(self, accepted: torch.Tensor, next_token: torch.Tensor, path: torch.Tensor | None = None) -> None:
        assert path is None, "a model drafter drafts chains"
        if not self.fed:  # nothing was fed: the old pending tokens wait, the new one joins them
            self.pending = torch.cat([self.pending, next_token[:, None]], 1)
            self.pending_ok = torch.cat([self.pending_ok, torch.ones_like(self.pending_ok[:, :1])], 1)
            return
        self.state.commit(self.pending_ok.sum(1) + torch.minimum(accepted, self.fed_drafts))
        unfed = accepted > self.fed_drafts  # the last accepted draft was never fed to the drafter
        last = self.tokens.gather(1, (accepted - 1).clamp(min=0)[:, None]).squeeze(1)
        self.pending = torch.stack([torch.where(unfed, last, next_token), next_token], 1)
        self.pending_ok = torch.stack([torch.ones_like(unfed), unfed], 1)

    def select(self, rows: torch.Tensor) -> None:
        self.state.select(rows)
        self.pending, self.pending_ok = self.pending[rows], self.pending_ok[rows]
        self.fed_drafts, self.tokens = self.fed_drafts[rows], self.tokens[rows]

    def refill(self, rows: list[int], prompts: list[list[int]]) -> None:
        first = refill_state(self.state, rows, prompts)
        index = torch.tensor(rows, device=self.pending.device)
        self.pending[index, 0], self.pending_ok[index] = first, False
        self.pending_ok[index, 0] = True


class SuffixIndex:
    """The continuations of every n-gram (n <= settings.max_ngram) of a growing token sequence, kept up to date as
    tokens are appended, so a lookup costs O(continuations) instead of a scan of the whole sequence (the drafter looks
    up several suffixes per drafted token, thousands of prompt tokens back; host time that a GPU step would wait on)."""

    def __init__(self, tokens: Iterable[int], settings: NgramSettings) -> None:
        self.settings = settings
        self.seq: list[int] = []
        self.follow: dict[tuple[int, ...], dict[int, list[int]]] = {}  # n-gram -> next token -> [count, last index]
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        seq, follow, longest = self.seq, self.follow, self.settings.max_ngram
        for token in map(int, tokens):
            i = len(seq)
            for n in range(1, min(longest, i) + 1):
                entry = follow.setdefault(tuple(seq[i - n:i]), {}).setdefault(token, [0, 0])
                entry[0] += 1
                entry[1] = i
            seq.append(token)

    def continuations(self, path: Sequence[int] = ()) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """For every suffix of seq + path that occurred before (longest first; at least settings.min_count times,
        settings.min_ngram tokens): the tokens that followed its earlier occurrences, ordered by count, ties to
        the most recent, their counts, and the suffix length."""
        s, committed = self.settings, len(self.seq)
        total = committed + len(path)
        window = self.seq[-s.max_ngram:] + list(map(int, path))  # all an occurrence followed by a path token uses
        offset = total - len(window)
        for n in range(min(s.max_ngram, total - 1), s.min_ngram - 1, -1):
            key = tuple(window[-n:])
            found = {token: list(entry) for token, entry in self.follow.get(key, {}).items()}
            for i in range(max(committed, n), total):  # occurrences followed by a token of the path
                if tuple(window[i - n - offset:i - offset]) == key:
                    entry = found.setdefault(window[i - offset], [0, 0])
                    entry[0] += 1
                    entry[1] = i
            if sum(count for count, _ in found.values()) < s.min_count:  # (min_count >= 1: no match is skipped)
                continue
            ranked = sorted(found.items(), key=lambda item: (-item[1][0], -item[1][1]))
            yield (np.array([token for token, _ in ranked], dtype=np.int64),
                   np.array([entry[0] for _, entry in ranked], dtype=np.int64), n)


def continuation_counts(seq: Sequence[int], settings: NgramSettings) -> tuple[np.ndarray, np.ndarray, int] | None:
    """The tokens that followed earlier occurrences of the longest matching suffix of `seq`, their counts, and
    the length of that suffix (SuffixIndex.continuations); None without a match."""
    return next(SuffixIndex(seq, settings).continuations(), None)


class NgramDrafter(Drafter):
    """Prompt lookup: continuation counts of the longest suffix that occurred before form q (no model)."""

    def __init__(self, contexts: list[list[int]], vocab_size: int, settings: NgramSettings,
                 conf: ConfidenceSettings, sampler: Sampler, device: torch.device) -> None:
        self.indexes = [SuffixIndex(c, settings) for c in contexts]
        self.vocab_size, self.settings, self.conf_settings = vocab_size, settings, conf
        self.sampler, self.device = sampler, device
        self.drafts: list[list[int]] = [[] for _ in contexts]

    def propose(self, k: torch.Tensor, keep: Keep) -> Draft:
        ks = k.tolist()
        batch, width = len(ks), max(ks, default=0)
        buf = _DraftBuffer(batch, width, self.device, keep_q=self.sampler.temperature > 0)
        self.drafts = [[] for _ in range(batch)]
        active = [n > 0 for n in ks]
        for j in range(width):  # one column at a time, so the controller sees every row's candidate together
            logits = torch.full((batch, self.vocab_size), -1e4)  # rows without a candidate: no confidence
            for row in (r for r in range(batch) if active[r]):
                found = next(self.indexes[row].continuations(self.drafts[row]), None)
                if found is None:
                    active[row] = False
                else:
                    logits[row] = self._log_q(*found)
            c = confidence(logits, self.conf_settings)
            ok = torch.tensor(active) & keep(c[:, 3])
            x = self.sampler.pick(logits)  # the most frequent continuation (greedy) or a sample of q
            for row in ok.nonzero().squeeze(1).tolist():
                self.drafts[row].append(int(x[row]))
            buf.put(j, ok.to(self.device), x.to(self.device), c.to(self.device),
                    self.sampler.probs(logits).to(self.device) if buf.keep_q else logits)
            active = [a and bool(o) and j + 1 < n for a, o, n in zip(active, ok.tolist(), ks)]
            if not any(active):
                break
        return buf.draft()

    def _log_q(self, tokens: np.ndarray, counts: np.ndarray, n: int) -> torch.Tensor:
        """log q over the vocabulary: the continuation counts, trusted with weight n / (n + kappa) after an
        n-token match (longer matches are accepted more often), mixed with a uniform rest."""
        trust = n / (n + self.settings.kappa)
        q = torch.full((self.vocab_size,), (1 - trust) / self.vocab_size)
        q[torch.as_tensor(tokens)] += trust * torch.as_tensor(counts, dtype=torch.float32) / float(counts.sum())
        return q.log()

    def commit(self, accepted: torch.Tensor, next_token: torch.Tensor, path: torch.Tensor | None = None) -> None:
        orders = path.tolist() if path is not None else [range(len(d)) for d in self.drafts]
        for index, draft, order, a, t in zip(self.indexes, self.drafts, orders, accepted.tolist(),
                                             next_token.tolist()):
            index.extend([draft[j] for j in order[:a]] + [t])

    def select(self, rows: torch.Tensor) -> None:
        keep = rows.tolist()
        self.indexes = [self.indexes[r] for r in keep]
        self.drafts = [self.drafts[r] for r in keep]

    def refill(self, rows: list[int], prompts: list[list[int]]) -> None:
        for row, prompt in zip(rows, prompts):
            self.indexes[row], self.drafts[row] = SuffixIndex(prompt, self.settings), []


def worth_drafting(estimates: torch.Tensor, costs: tuple[float, ...]) -> torch.Tensor:
    """How many of a row's drafted tokens pay for themselves: estimates [B, M] their estimated acceptances (the
    product of q along each one's path), costs what a pass over 1, 2, ... tokens costs in 1-token steps. Returns
    [B] the m that maximizes the expected tokens per cost, (1 + the m likeliest estimates) / costs[m] (the likeliest
    m of a tree's nodes are a tree)."""
    likeliest = estimates.sort(1, descending=True).values[:, :len(costs) - 1]
    gain = torch.cat([likeliest.new_ones(len(likeliest), 1), 1 + likeliest.cumsum(1)], 1)
    return (gain / torch.tensor(costs[:gain.shape[1]], device=gain.device, dtype=gain.dtype)).argmax(1)


class NgramTreeDrafter(NgramDrafter):
    """Prompt lookup drafting a tree (strict greedy only): per row a trie of up to min(settings.tree_tokens, k[b])
    candidate tokens, grown best first by the product of q along each path (its estimated acceptance), which must
    reach settings.tree_min_p. A node's children are the settings.branches likeliest tokens after it: those of the
    longest matching suffix, then of shorter ones. With `costs` (what a pass over 1, 2, ... tokens costs in 1-token
    steps) a single row's tree is then cut to the best-first prefix of m nodes that maximizes the expected tokens
    per cost, (1 + sum of the m estimates) / costs[m]. The controller's keep gate and k_j are not used: the floor and
    the cut play their part."""

    def __init__(self, *args, costs: tuple[float, ...] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.costs = costs

    def propose(self, k: torch.Tensor, keep: Keep) -> Draft:
        costs = self.costs if len(self.indexes) == 1 else None  # at batch > 1 a row's tokens share the pass
        trees = [self._tree(index, depth, costs) for index, depth in zip(self.indexes, k.tolist())]
        batch, width = len(trees), max((len(tokens) for _, tokens, _ in trees), default=0)
        tokens = torch.zeros(batch, width, dtype=torch.long)
        parents = torch.full((batch, width), -1, dtype=torch.long)
        conf = torch.zeros(batch, width, 4)
        for row, (up, nodes, logq) in enumerate(trees):
            if nodes:
                tokens[row, :len(nodes)], parents[row, :len(nodes)] = torch.tensor(nodes), torch.tensor(up)
                conf[row, :len(nodes)] = confidence(logq, self.conf_settings)
        self.drafts = [nodes for _, nodes, _ in trees]
        lengths = torch.tensor([len(nodes) for nodes in self.drafts], dtype=torch.long)
        return Draft(tokens.to(self.device), lengths.to(self.device), conf.to(self.device),
                     parents=parents.to(self.device))

    def _tree(self, index: SuffixIndex, depth: int, costs: tuple[float, ...] | None
              ) -> tuple[list[int], list[int], torch.Tensor | None]:
        """The trie after the row's sequence: each node's parent (-1: the pending token, parents first), its token,
        and the log q [nodes, V] it was drawn from."""
        nodes: list[tuple[int, int, int]] = []  # parent, token, index in logq
        scores: list[float] = []
        logq: list[torch.Tensor] = []
        heap: list[tuple[float, int, int, int, int, list[int]]] = []  # -score, tie, parent, token, dist, path
        tie = itertools.count()

        def grow(parent: int, score: float, path: list[int]) -> None:
            found = self._candidates(index, path) if len(path) < depth else None
            if found is not None:
                logq.append(self._log_q(*found[1]))
                for token, q in found[0]:
                    if score * q >= self.settings.tree_min_p:
                        heapq.heappush(heap, (-score * q, next(tie), parent, token, len(logq) - 1, path))

        grow(-1, 1.0, [])
        size = min(self.settings.tree_tokens, depth)
        while heap and len(nodes) < size:
            score, _, parent, token, dist, path = heapq.heappop(heap)
            nodes.append((parent, token, dist))
            scores.append(-score)
            if len(nodes) < size:
                grow(len(nodes) - 1, -score, path + [token])
        if costs:  # best first, so every prefix is a tree
            nodes = nodes[:int(worth_drafting(torch.tensor([scores], dtype=torch.float64), costs))]
        if not nodes:
            return [], [], None
        parents, tokens, dists = (list(column) for column in zip(*nodes))
        return parents, tokens, torch.stack(logq)[dists]

    def _candidates(self, index: SuffixIndex, path: list[int]) -> tuple[list[tuple[int, float]], tuple] | None:
        """The settings.branches likeliest tokens after the row's sequence + path with their q: an n-token match's
        continuation counts get weight n / (n + kappa) of the mass that longer matches left. Also returns the
        longest match (continuation_counts), or None without any match."""
        found: dict[int, float] = {}
        rest, longest = 1.0, None
        for tokens, counts, n in index.continuations(path):
            longest = longest or (tokens, counts, n)
            trust = n / (n + self.settings.kappa)
            for token, count in zip(tokens.tolist(), counts.tolist()):
                found.setdefault(token, rest * trust * count / counts.sum())
            rest *= 1 - trust
            if len(found) >= self.settings.branches:
                break
        return (list(found.items())[:self.settings.branches], longest) if longest else None
