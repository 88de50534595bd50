"""Statistics as raw counts that add up across documents, batches, shards and jobs.

Rates are computed once, at the end, by `DocStats.rates()` (vLLM's metrics style).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

# Names of the per-drafted-token trace columns (DESIGN.md, traces/shard-*.parquet).
TRACE_COLUMNS = ("doc_id", "iteration", "position", "token_id", "c_ent", "c_margin", "c_soft", "c",
                 "k_j", "tau_t", "accepted", "target_top1")


@dataclass
class DocStats:
    """Counts for one document (or a sum over many).

    decode_s is the document's share of its batch's decode wall time: each iteration's time (its prefill
    included) split evenly among the rows in it, so that summing decode_s over a decode gives its wall time;
    latency_s is the wall time from the document joining a batch until its last token (a max, not a sum, when
    aggregated).
    """

    docs: int = 0
    new_tokens: int = 0  # tokens generated, EOS included, prompt excluded
    decode_s: float = 0.0
    latency_s: float = 0.0
    target_calls: int = 0  # target forward passes this document took part in (prefill excluded)
    drafted: int = 0  # drafted tokens sent to verification
    accepted: int = 0  # drafted tokens accepted
    iterations: int = 0  # draft-verify iterations (an AR step counts as one)
    rollbacks: int = 0  # iterations with a rejected drafted token

    def __add__(self, other: DocStats) -> DocStats:
        return DocStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @classmethod
    def total(cls, items: list[DocStats]) -> DocStats:
        out = cls()
        for item in items:
            out = out + item
        return out

    def rates(self) -> dict[str, float]:
        """The derived numbers of DESIGN.md's table (mean accepted length + 1 per iteration = tokens_per_call)."""
        return {
            "tokens_per_s": self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0,
            "tokens_per_call": self.new_tokens / self.target_calls if self.target_calls else 0.0,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "mean_k": self.drafted / self.iterations if self.iterations else 0.0,
            "rollback_rate": self.rollbacks / self.iterations if self.iterations else 0.0,
        }

    def to_dict(self) -> dict[str, float]:
        out: dict[str, float] = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(self.rates())
        return out


def token_agreement(pairs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> tuple[int, int, int]:
    """(matching positions, positions, identical outputs) over (output, reference) token sequences: position i
    matches when both have a token there and it is the same; positions counts the longer of each pair."""
    matches = positions = exact = 0
    for a, b in pairs:
        matches += sum(x == y for x, y in zip(a, b))
        positions += max(len(a), len(b))
        exact += list(a) == list(b)
    return matches, positions, exact
