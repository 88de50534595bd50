"""The n-gram drafter (prompt lookup): continuation counts of the longest suffix of a row's sequence that occurred
before form q, so confidence drives it as it drives a model drafter; no model runs. A SuffixIndex keeps every
n-gram's continuations up to date as tokens are appended. NgramTreeDrafter drafts a trie of candidates instead of a
chain (strict greedy decoding), verified in one target pass.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from cmsd.confidence import confidence
from cmsd.drafters.base import Draft, DraftBuffer, Drafter, Keep, Sampler, worth_drafting
from cmsd.settings import ConfidenceSettings, NgramSettings
from cmsd.syncs import HostReads, to_device


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
    """Prompt lookup: continuation counts of the longest suffix that occurred before form q (no model). It drafts on
    the host, from host copies of the verdicts (read with the decoder's, `reads`), and uploads its draft without a
    sync; a controller's gate costs a sync per drafted token (the gate's state is on the device)."""

    def __init__(self, contexts: list[list[int]], vocab_size: int, settings: NgramSettings,
                 conf: ConfidenceSettings, sampler: Sampler, device: torch.device,
                 reads: HostReads | None = None) -> None:
        self.indexes = [SuffixIndex(c, settings) for c in contexts]
        self.vocab_size, self.settings, self.conf_settings = vocab_size, settings, conf
        self.sampler, self.device = sampler, device
        self.reads = reads or HostReads()
        self.drafts: list[list[int]] = [[] for _ in contexts]

    def propose(self, k: torch.Tensor, k_host: list[int], keep: Keep | None) -> Draft:
        batch, width = len(k_host), max(k_host, default=0)
        buf = DraftBuffer(batch, width, None, keep_q=self.sampler.temperature > 0)  # on the host
        self.drafts = [[] for _ in range(batch)]
        active = [n > 0 for n in k_host]
        for j in range(width):  # one column at a time, so the controller sees every row's candidate together
            logits = torch.full((batch, self.vocab_size), -1e4)  # rows without a candidate: no confidence
            for row in (r for r in range(batch) if active[r]):
                found = next(self.indexes[row].continuations(self.drafts[row]), None)
                if found is None:
                    active[row] = False
                else:
                    logits[row] = self._log_q(*found)
            c = confidence(logits, self.conf_settings)
            ok = torch.tensor(active)
            if keep:
                ok &= keep(to_device(c[:, 3], self.device)).cpu()
            x = self.sampler.pick(logits)  # the most frequent continuation (greedy) or a sample of q
            oks, xs = ok.tolist(), x.tolist()
            for row in (r for r in range(batch) if oks[r]):
                self.drafts[row].append(xs[row])
            buf.put(j, ok, x, c, self.sampler.probs(logits) if buf.keep_q else logits)
            buf.width = j + 1 if any(oks) else buf.width
            active = [a and o and j + 1 < n for a, o, n in zip(active, oks, k_host)]
            if not any(active):
                break
        return buf.draft(self.device)

    def _log_q(self, tokens: np.ndarray, counts: np.ndarray, n: int) -> torch.Tensor:
        """log q over the vocabulary: the continuation counts, trusted with weight n / (n + kappa) after an
        n-token match (longer matches are accepted more often), mixed with a uniform rest."""
        trust = n / (n + self.settings.kappa)
        q = torch.full((self.vocab_size,), (1 - trust) / self.vocab_size)
        q[torch.as_tensor(tokens)] += trust * torch.as_tensor(counts, dtype=torch.float32) / float(counts.sum())
        return q.log()

    def commit(self, accepted: torch.Tensor, next_token: torch.Tensor, path: torch.Tensor | None = None) -> None:
        counts, tokens = self.reads.ask(accepted), self.reads.ask(next_token)  # in the transfer of the decoder's
        orders = self.reads.ask(path).value if path is not None else [range(len(d)) for d in self.drafts]
        for index, draft, order, a, t in zip(self.indexes, self.drafts, orders, counts.value, tokens.value):
            index.extend([draft[j] for j in order[:a]] + [t])

    def select(self, rows: torch.Tensor) -> None:
        keep = rows.tolist()
        self.indexes = [self.indexes[r] for r in keep]
        self.drafts = [self.drafts[r] for r in keep]

    def refill(self, rows: list[int], prompts: list[list[int]]) -> None:
        for row, prompt in zip(rows, prompts):
            self.indexes[row], self.drafts[row] = SuffixIndex(prompt, self.settings), []


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

    def propose(self, k: torch.Tensor, k_host: list[int], keep: Keep | None) -> Draft:
        costs = self.costs if len(self.indexes) == 1 else None  # at batch > 1 a row's tokens share the pass
        trees = [self._tree(index, depth, costs) for index, depth in zip(self.indexes, k_host)]
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
        return Draft(tokens, lengths, conf, parents=parents).to(self.device)

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
            curve = torch.tensor(costs, dtype=torch.float64)
            nodes = nodes[:int(worth_drafting(torch.tensor([scores], dtype=torch.float64), curve))]
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
