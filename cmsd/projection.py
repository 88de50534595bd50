"""A projection: the tokens a second each arm (AR, or a method with one drafter) would decode at each batch size on
a device, from a decode's traces (what the drafts gained: measured with the real model, on any machine) and that
device's cost curve (cmsd.costs: measured there, dummy weights will do).

It is cmsd.tuning's prediction with the curve's costs in place of those the tuner times: a batch of b documents of
P prompt and N new tokens takes b prefill(P) + (N / gained) (pass(b, t, L) + host(b)), with t the tokens a row feeds
a pass, gained the tokens a pass gains (both from the traces, cut to the verify budget's share at b), L the cache a
pass attends over (P + N / 2) and host(b) the curve's measured host time of an iteration of that arm. It is labelled
a projection wherever it is shown: the acceptance comes from another device's (or the same) decode, and a dummy
curve's loops say nothing of acceptance.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from cmsd.costs import Curve
from cmsd.tuning import Candidate, Sample, predict, predict_ar, shapes


@dataclass(frozen=True)
class Traced:
    """What one arm's decode gave, whatever the device: per document sums and the drafts accepted per pass."""

    method: str
    drafter: str | None
    docs: int
    prompt_tokens: int
    new_tokens: int
    iterations: int  # verify passes (AR: one per token)
    drafted: int
    runs: dict[int, int] = field(default_factory=dict)  # drafts accepted -> passes that drafted

    @property
    def label(self) -> str:
        return self.method if self.method == "ar" else f"{self.method}/{self.drafter}"

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "runs": {str(a): n for a, n in sorted(self.runs.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Traced:
        return cls(**{**data, "runs": {int(a): n for a, n in data.get("runs", {}).items()}})


def traced(method: str, drafter: str | None, docs: list[dict[str, int]],
           trace: tuple[list[str], list[int], list[bool]]) -> Traced:
    """A decode's Traced from its documents' numbers (prompt_tokens, new_tokens, iterations, drafted: a job's
    results columns, or cmsd.decode.Generation's) and its trace columns (doc_id, iteration, accepted)."""
    accepted: Counter[tuple[str, int]] = Counter()
    for doc, iteration, ok in zip(*trace):
        accepted[doc, iteration] += int(ok)
    return Traced(method, None if method == "ar" else drafter, len(docs), sum(d["prompt_tokens"] for d in docs),
                  sum(d["new_tokens"] for d in docs), sum(d["iterations"] for d in docs),
                  sum(d["drafted"] for d in docs), dict(Counter(accepted.values())))


def project(curve: Curve, arm: Traced, batches: list[int], verify_tokens: int = 0, k_max: int = 8
            ) -> list[Candidate]:
    """`arm`'s candidates at `batches` on `curve`'s device (the module's docstring): verify_tokens, the verify
    budget (0: none, as on a GPU), and k_max bound the drafts a row carries at each batch as the decoder does."""
    prompt, new = arm.prompt_tokens / arm.docs, arm.new_tokens / arm.docs
    context = prompt + new / 2
    host = {b: curve.host_s(arm.method, arm.drafter, b) for b in batches}
    if any(h is None for h in host.values()):  # the arm's loop was not measured: AR's (no drafter cost)
        host = {b: curve.host_s("ar", None, b) or 0.0 for b in batches}
    costs = {(b, t): curve.pass_s(b, t, context) + host[b] for b, t in shapes(batches, verify_tokens, k_max, True)}
    runs = tuple(a for a, n in sorted(arm.runs.items()) for _ in range(n))
    sample = Sample(arm.docs, arm.new_tokens, arm.docs * curve.prefill_s(prompt), None, arm.iterations,
                    arm.drafted, runs)
    out = predict_ar(costs, sample, batches, 0.0) if arm.method == "ar" else \
        predict(costs, sample, arm.method, arm.drafter, verify_tokens, k_max, batches, 0.0, True, drafter_s=0.0)
    return [replace(c, measured=False, kv_mb=0.0) for c in out]


def as_ar(arm: Traced) -> Traced:
    """AR on `arm`'s documents: a pass a token, nothing drafted (under strict verification, the same tokens)."""
    return Traced("ar", None, arm.docs, arm.prompt_tokens, arm.new_tokens, arm.new_tokens, 0)


def traced_generations(method: str, drafter: str | None, gens: list) -> Traced:
    """A decode's Traced from its cmsd.decode.Generations (decoded with settings.trace on)."""
    docs = [{"prompt_tokens": g.prompt_tokens, "new_tokens": len(g.token_ids), "iterations": g.stats.iterations,
             "drafted": g.stats.drafted} for g in gens]
    trace = tuple([v for g in gens for v in (g.trace or {}).get(c, [])] for c in ("doc_id", "iteration", "accepted"))
    return traced(method, drafter, docs, trace)
