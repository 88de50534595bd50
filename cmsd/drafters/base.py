"""What every drafter shares: the interface, the draft it returns, the sampler, the draft buffer and the tree cut.

Drafters propose tokens with the drafter's distribution q and its confidence; they know nothing of schedules.

    propose(k [B], k_host, keep)     draft up to k[b] tokens for row b (k_host: the same on the host, so that no
            -> Draft                 sync is needed to know how far to draft); `keep(C [B]) -> [B] bool` says whether
                                     a candidate with confidence C is proposed (the controller's gate; None: no gate,
                                     every row drafts its k)
    commit(accepted [B], next [B],   the verdict: the first accepted[b] drafts stand, then the token next[b]; for a
           path [B, K] | None)       tree draft, the first accepted[b] drafts in the order path[b]
    select(rows)                     keep only these rows
    refill(rows, prompts)            these rows start over with new prompts (continuous batching), between iterations
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from cmsd.confidence import confidence
from cmsd.settings import ConfidenceSettings
from cmsd.syncs import to_device

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

    def to(self, device: torch.device) -> Draft:
        """A draft made on the host, onto the device without a sync."""
        tensors = (self.tokens, self.lengths, self.conf, self.q, self.parents)
        return Draft(*(to_device(t, device) if t is not None else None for t in tensors))

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
    def propose(self, k: torch.Tensor, k_host: list[int], keep: Keep | None) -> Draft: ...

    @abstractmethod
    def commit(self, accepted: torch.Tensor, next_token: torch.Tensor, path: torch.Tensor | None = None) -> None: ...

    @abstractmethod
    def select(self, rows: torch.Tensor) -> None: ...

    @abstractmethod
    def refill(self, rows: list[int], prompts: list[list[int]]) -> None: ...


class DraftBuffer:
    """Collects one draft: [B, K] tokens, [B, K, 4] confidences and, when sampling, [B, K, V] q (device None: on
    the host)."""

    def __init__(self, batch: int, k: int, device: torch.device | None, keep_q: bool) -> None:
        self.tokens = torch.zeros(batch, k, dtype=torch.long, device=device)
        self.conf = torch.zeros(batch, k, 4, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.keep_q = keep_q
        self.q: torch.Tensor | None = None
        self.width = 0  # the columns some row filled (known on the host)

    def put(self, j: int, ok: torch.Tensor, token: torch.Tensor, conf: torch.Tensor, q: torch.Tensor) -> None:
        """Column j for all rows: ok [B], token [B], conf [B, 4], q [B, V]."""
        self.tokens[:, j] = torch.where(ok, token, 0)
        self.conf[:, j] = conf * ok[:, None]
        if self.keep_q:
            self.q_columns(q.shape[-1])[:, j] = q
        self.lengths += ok.long()

    def take(self, j: int, z: torch.Tensor, active: torch.Tensor, k: torch.Tensor, keep: Keep | None,
             conf: ConfidenceSettings, sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Draft column j from the drafter's logits z [B, V]: each active row picks a token and keeps it where
        `keep` allows its confidence. Returns the tokens [B], the rows that draft on (kept, under their k [B]) and
        whether drafting stops here. Without a gate the rows stop at their k, which the buffer's width is the largest
        of: no sync. A gate stops rows by the device's numbers: one sync per column, to stop when no row drafts on
        (drafting on regardless would cost a drafter step per sync saved)."""
        c = confidence(z, conf)
        x = sampler.pick(z)
        ok = active & keep(c[:, 3]) if keep else active
        self.put(j, ok, x, c, sampler.probs(z) if self.keep_q else z)
        active = ok & (j + 1 < k)
        last = j + 1 == self.tokens.shape[1]
        if keep is None:
            self.width = j + 1
            return x, active, last
        filled, going = torch.stack([ok.any(), active.any()]).tolist()
        self.width = j + 1 if filled else self.width
        return x, active, last or not going

    def q_columns(self, vocab: int) -> torch.Tensor:
        if self.q is None:
            self.q = self.tokens.new_zeros(*self.tokens.shape, vocab, dtype=torch.float32)
        return self.q

    def draft(self, device: torch.device | None = None) -> Draft:
        """The draft, cut to its longest row: columns no row filled would cost verification for nothing. device: a
        host buffer's draft goes there (asynchronously: cmsd.syncs.to_device)."""
        width = self.width
        q = self.q[:, :width] if self.q is not None else None
        draft = Draft(self.tokens[:, :width], self.lengths, self.conf[:, :width], q)
        return draft.to(device) if device is not None else draft



def worth_drafting(estimates: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """How many of a row's drafted tokens pay for themselves: estimates [B, M] their estimated acceptances (the
    product of q along each one's path), costs [C] what a pass over 1, 2, ... tokens costs in 1-token steps (on the
    estimates' device, in their dtype: made once, so that no copy of it waits for the device). Returns
    [B] the m that maximizes the expected tokens per cost, (1 + the m likeliest estimates) / costs[m] (the likeliest
    m of a tree's nodes are a tree)."""
    likeliest = estimates.sort(1, descending=True).values[:, :len(costs) - 1]
    gain = torch.cat([likeliest.new_ones(len(likeliest), 1), 1 + likeliest.cumsum(1)], 1)
    return (gain / costs[:gain.shape[1]]).argmax(1)


