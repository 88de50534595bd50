"""The controller owns all adaptivity: it turns each iteration's drafted-token confidences into the next draft
length k_j and the verification thresholds tau_t (DESIGN.md). Drafters and rules know nothing of schedules.

    k_j   = clip(k_min + round(alpha * Cbar * (k_max - k_min)), k_min, k_max)   Cbar: mean C of the row's last draft
    tau_t = tau_base * C_t ** gamma

SpecBound instead drafts up to k_max and stops before a token whose confidence is under a per-row bound; the bound
falls by bound_step after a fully accepted draft and rises by it after a rejection.
"""

from __future__ import annotations

import torch

from cmsd.drafters.base import Draft, Keep
from cmsd.settings import DecodeSettings
from cmsd.syncs import HostReads, Read


class Controller:
    """`reads`: the decode's HostReads. The next draft lengths travel to the host with each verdict, so the decoder
    knows how far to draft without a sync of its own."""

    def __init__(self, settings: DecodeSettings, batch: int, device: torch.device,
                 reads: HostReads | None = None) -> None:
        self.control = settings.control
        self.drafts, self.adaptive = settings.drafts, settings.adaptive_k
        self.tau_on = settings.threshold_rule
        self.cbar = torch.full((batch,), float("nan"), device=device)  # [B] nan until a row has drafted
        self.specbound = settings.specbound if settings.bounded else None
        self.start_floor = self.specbound.bound if self.specbound else self.control.c_stop
        self.floor = torch.full((batch,), self.start_floor, device=device)  # [B] drafting stops before C < floor
        self.reads = reads or HostReads()
        self.first_k = int(self._wish(torch.full((1,), float("nan")))[0])  # a row's k before it drafts (on the host)
        self.wish: Read | list[int] = [self.first_k] * batch  # [B] each row's k before its budget, on the host
        self.begin_draft()

    def refill(self, rows: list[int]) -> None:
        """These rows start over with new documents (continuous batching): no draft seen yet, the first bound."""
        index = torch.tensor(rows, device=self.floor.device)
        self.cbar[index], self.floor[index] = float("nan"), self.start_floor
        self.wish = self._wishes()
        for row in rows:
            self.wish[row] = self.first_k

    def draft_lengths(self, budget: torch.Tensor) -> torch.Tensor:
        """budget: [B] the most drafted tokens a row can still use. Returns k: [B] (plan: the same on the host)."""
        return torch.minimum(self._wish(self.cbar), budget.clamp(min=0))

    def plan(self, budget: list[int]) -> list[int]:
        """draft_lengths on the host, from the k read with the last verdict (no sync of its own)."""
        return [min(k, max(b, 0)) for k, b in zip(self._wishes(), budget)]

    def _wish(self, cbar: torch.Tensor) -> torch.Tensor:
        """cbar: [B] -> each row's k before its budget [B]."""
        c = self.control
        if not self.drafts:
            return torch.zeros_like(cbar, dtype=torch.long)
        if self.specbound:
            return torch.full_like(cbar, c.k_max, dtype=torch.long)
        if self.adaptive:
            k = (c.k_min + torch.round(c.alpha * cbar * (c.k_max - c.k_min))).nan_to_num(c.k_min)
            return k.clamp(c.k_min, c.k_max).long()
        return torch.full_like(cbar, c.k, dtype=torch.long)

    def _wishes(self) -> list[int]:
        if isinstance(self.wish, Read):
            self.wish = self.wish.value
        return self.wish

    @property
    def gate(self) -> Keep | None:
        """keep, where it can stop a draft (c_stop, chain_stop, SpecBound's bound); None where it keeps every
        candidate (confidences are >= 0): drafters then need no sync to know where drafting stops."""
        gated = self.specbound is not None or self.control.c_stop > 0 or self.control.chain_stop > 0
        return self.keep if gated else None

    def begin_draft(self) -> None:
        self.chain = torch.ones_like(self.floor)  # [B] running product of C over the draft being built

    def keep(self, c: torch.Tensor) -> torch.Tensor:
        """c: [B] confidence of the next candidate draft token (called once per draft step, in order). Drafting
        stops before a token with C < c_stop (or the SpecBound bound), or where the running product of C, an
        estimate of the chance that the whole draft is accepted, falls below chain_stop."""
        self.chain = self.chain * c
        return (c >= self.floor) & (self.chain >= self.control.chain_stop)

    def thresholds(self, c: torch.Tensor) -> torch.Tensor:
        """c: [B, K] confidence of the drafted tokens. Returns tau: [B, K] (0 where verification is strict)."""
        if not self.tau_on:
            return torch.zeros_like(c)
        return self.control.tau_base * c.clamp(min=0) ** self.control.gamma

    def observe(self, draft: Draft, accepted: torch.Tensor) -> None:
        """draft: this iteration's draft; accepted: [B] how many of its tokens the target accepted."""
        drafted = draft.lengths > 0
        mean_c = draft.conf[..., 3].sum(1) / draft.lengths.clamp(min=1)
        self.cbar = torch.where(drafted, mean_c, self.cbar)
        if self.specbound:
            b = self.specbound
            step = torch.where(accepted >= draft.lengths, -b.bound_step, b.bound_step)
            self.floor = torch.where(drafted, self.floor + step, self.floor).clamp(b.bound_min, b.bound_max)
        if self.adaptive:  # (otherwise k does not change)
            self.wish = self.reads.ask(self._wish(self.cbar))  # the next draft lengths, read with the verdict

    def select(self, rows: torch.Tensor) -> None:
        self.cbar, self.floor, self.chain = self.cbar[rows], self.floor[rows], self.chain[rows]
        wishes = self._wishes()
        self.wish = [wishes[r] for r in rows.tolist()]
