"""Verification: which drafted tokens the target accepts, and the token it emits after them.

Glossary (vLLM's words):
    p            the target's distribution at a drafted position; q the drafter's.
    accepted     drafted tokens kept: the longest prefix of the draft that the rule accepts.
    correction   the target's token at the first rejected position (the rest of the draft is discarded).
    bonus        the target's token after a fully accepted draft.
Every iteration emits accepted + 1 tokens (the +1 is the correction or the bonus).

Rules (greedy, temperature 0):
    strict       x == argmax p                                   (lossless: the target's greedy output)
    threshold    x in top-beta(p) and p(1) - p(x) <= tau_t       (CM-ASD, tau_t = tau_base * C_t ** gamma)
    margin       x in top-m(p) and p(1) - p(2) <= delta           (margin-aware: the target is indecisive)
A relaxed method accepts where strict or any of its rules accepts. With temperature > 0, strict is speculative
sampling (accept with min(1, p/q), correct from norm(max(0, p - q))), lossless in distribution; relaxed rules
accept by the rule on the tempered p and correct by sampling p.

Tree drafts (strict greedy only): a drafted token is right where it is argmax p after its parent; the accepted
path is the chain of drafted tokens that are right with all their ancestors (siblings differ, so it is one chain).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmsd.kv import ancestors
from cmsd.settings import ControlSettings, MarginSettings


@dataclass
class Verdict:
    accepted: torch.Tensor  # [B] accepted drafted tokens per row
    next_token: torch.Tensor  # [B] correction or bonus token
    ok: torch.Tensor  # [B, K] the rule's answer at each drafted position (before the prefix cut)
    top1: torch.Tensor  # [B, K+1] the target's argmax at each verified position
    path: torch.Tensor | None = None  # [B, K] tree drafts: the order of the drafted tokens that ok, top1 and
    #                                   accepted refer to, the accepted path first (root to leaf); None: a chain


@dataclass(frozen=True)
class Rule:
    """The acceptance rule of a method, chosen once from the settings."""

    threshold: ControlSettings | None = None  # CM-ASD relaxed acceptance
    margin: MarginSettings | None = None  # margin-aware acceptance

    @property
    def strict(self) -> bool:
        return self.threshold is None and self.margin is None

    def relaxed_ok(self, p: torch.Tensor, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """p: [B, K, V] target probabilities, x: [B, K] drafted tokens, tau: [B, K]. Returns [B, K] bool."""
        depth = max(self.threshold.beta if self.threshold else 1, self.margin.m if self.margin else 1)
        top = p.topk(min(depth, p.shape[-1]), dim=-1)  # values, indices: [B, K, depth]
        p_x = p.gather(-1, x[..., None]).squeeze(-1)
        rank = (top.indices == x[..., None]).float().argmax(-1)  # rank of x where it is in the top-depth
        in_top = (top.indices == x[..., None]).any(-1)
        ok = torch.zeros_like(x, dtype=torch.bool)
        if self.threshold is not None:
            ok |= in_top & (rank < self.threshold.beta) & (top.values[..., 0] - p_x <= tau)
        if self.margin is not None and depth >= 2:
            indecisive = top.values[..., 0] - top.values[..., 1] <= self.margin.delta
            ok |= in_top & (rank < self.margin.m) & indecisive
        return ok


def verify(rule: Rule, draft_tokens: torch.Tensor, lengths: torch.Tensor, logits: torch.Tensor, tau: torch.Tensor,
           temperature: float = 0.0, q: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> Verdict:
    """draft_tokens: [B, K], lengths: [B], logits: [B, K+1, V] target logits at the verified positions,
    tau: [B, K] thresholds, q: [B, K, V] drafter probabilities (needed for strict sampling)."""
    batch, k = draft_tokens.shape
    top1 = logits.argmax(-1)  # [B, K+1]
    in_draft = torch.arange(k, device=logits.device)[None, :] < lengths[:, None]  # [B, K]
    if temperature > 0:
        p = torch.softmax(logits.float() / temperature, dim=-1)  # [B, K+1, V]
    else:
        p = torch.softmax(logits.float(), dim=-1) if not rule.strict else None
    # 1. the rule's answer at each drafted position
    if temperature > 0 and rule.strict and k > 0:
        assert q is not None, "speculative sampling needs the drafter's q"
        p_x = p[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)
        q_x = q.gather(-1, draft_tokens[..., None]).squeeze(-1).clamp(min=1e-20)
        u = torch.rand(batch, k, device=logits.device, generator=generator)
        ok = u < (p_x / q_x).clamp(max=1.0)
    else:
        ok = draft_tokens == top1[:, :k]
        if not rule.strict:
            ok |= rule.relaxed_ok(p[:, :k], draft_tokens, tau)
    # 2. accepted = the longest accepted prefix within the row's draft
    accepted = (ok & in_draft).long().cumprod(1).sum(1)  # [B]
    # 3. the correction (at the first rejection) or bonus (after a full draft) token
    at = accepted[:, None]
    if temperature == 0:
        next_token = top1.gather(1, at).squeeze(1)
    else:
        next_token = _sample_next(p, q if rule.strict else None, accepted, lengths, generator)
    return Verdict(accepted=accepted, next_token=next_token, ok=ok & in_draft, top1=top1)


def verify_tree(draft_tokens: torch.Tensor, lengths: torch.Tensor, parents: torch.Tensor,
                logits: torch.Tensor) -> Verdict:
    """Strict greedy verification of a tree draft. draft_tokens, parents: [B, K] (parents: the index of each
    drafted token's parent, -1 = the pending token), lengths: [B], logits: [B, K+1, V] at the pending token and
    at each drafted token. The Verdict lists the drafted tokens in the order `path`: the accepted path first."""
    k = draft_tokens.shape[1]
    top1 = logits.argmax(-1)  # [B, K+1]
    in_draft = torch.arange(k, device=logits.device)[None, :] < lengths[:, None]  # [B, K]
    expected = top1.gather(1, parents + 1)  # [B, K] the target's argmax at each drafted token's position
    ok = (draft_tokens == expected) & in_draft
    on_path = (~ancestors(parents) | ok[:, None, :]).all(-1)  # [B, K] right, and so are all its ancestors
    accepted = on_path.sum(1)
    path = torch.sort((~on_path).long(), dim=1, stable=True).indices  # parents come first: root to leaf
    slots = torch.cat([torch.zeros_like(accepted)[:, None], path + 1], 1)  # [B, K+1] the pending token, then the path
    next_token = top1.gather(1, slots.gather(1, accepted[:, None])).squeeze(1)  # argmax after the path's end
    return Verdict(accepted=accepted, next_token=next_token, ok=ok.gather(1, path),
                   top1=torch.cat([expected.gather(1, path), next_token[:, None]], 1), path=path)


def _sample_next(p: torch.Tensor, q: torch.Tensor | None, accepted: torch.Tensor, lengths: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Sample the token after the accepted prefix: from norm(max(0, p - q)) after a rejection in strict
    speculative sampling, from p otherwise (bonus, or relaxed rules)."""
    rows = torch.arange(p.shape[0], device=p.device)
    dist = p[rows, accepted]  # [B, V]
    if q is not None and q.shape[1]:  # (no row drafted this pass: nothing was rejected)
        rejected = accepted < lengths
        q_at = q[rows, accepted.clamp(max=q.shape[1] - 1)]
        residual = (dist - q_at).clamp(min=0)
        total = residual.sum(-1, keepdim=True)
        residual = torch.where(total > 0, residual / total.clamp(min=1e-30), dist)
        dist = torch.where(rejected[:, None], residual, dist)
    return torch.multinomial(dist, 1, generator=generator).squeeze(1)
