"""The teacher's data: the target's next-token distributions over token sequences (top-k lists, and with a feature
head's training the features its LM head read), computed once and kept; the draft vocabulary chosen from them; and
the padding and length-bucketed batches training reads them in.

    seqs, starts = greedy_continuations(pair, prompts, new_tokens)     # the target's own outputs (strict CM-ASD)
    data = teacher_targets(target, seqs, starts, top_k)                # its distributions, once
    vocab = draft_vocabulary(data, size, vocab_size, always=eos ids)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from cmsd.decode import Decoder
from cmsd.models import ModelPair
from cmsd.settings import DecodeSettings


@dataclass
class TeacherData:
    """The target's next-token distributions over token sequences, as top-k lists (cheap to keep and reuse)."""

    seqs: list[torch.Tensor]  # [L] token ids each
    answer_starts: list[int]  # index of each sequence's first continuation token (len = no continuation)
    top_ids: list[torch.Tensor]  # [L, K] the target's top-k next tokens after each position
    top_p: list[torch.Tensor]  # [L, K] their probabilities
    features: list[torch.Tensor] = field(default_factory=list)  # [L, H] what its LM head read (a feature head's
    #                                                               data; empty when not asked for)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)

    def part(self, start: int, stop: int) -> TeacherData:
        return TeacherData(self.seqs[start:stop], self.answer_starts[start:stop], self.top_ids[start:stop],
                           self.top_p[start:stop], self.features[start:stop])

    def __add__(self, other: TeacherData) -> TeacherData:
        return TeacherData(self.seqs + other.seqs, self.answer_starts + other.answer_starts,
                           self.top_ids + other.top_ids, self.top_p + other.top_p, self.features + other.features)

    def save(self, path: Path) -> None:
        torch.save(asdict(self), path)

    @classmethod
    def load(cls, path: Path) -> TeacherData:
        return cls(**torch.load(path, weights_only=True))


@torch.inference_mode()
def teacher_targets(target: PreTrainedModel, seqs: list[list[int]], answer_starts: list[int], top_k: int,
                    batch_tokens: int = 2048, progress: Callable[[int], None] | None = None,
                    features: bool = False) -> TeacherData:
    """Run the target over each sequence once (batched, right-padded) and keep its top-k next-token probabilities
    (and with `features`, what its LM head read at every position, in float16)."""
    device = target.device
    out: dict[int, tuple[torch.Tensor, ...]] = {}
    for batch in batches(list(range(len(seqs))), [len(s) for s in seqs], batch_tokens, shuffle=None):
        ids, mask = pad([seqs[i] for i in batch], device)
        result = target(input_ids=ids, attention_mask=mask, output_hidden_states=features)
        top = torch.softmax(result.logits.float(), -1).topk(top_k, dim=-1)
        for row, i in enumerate(batch):
            n = len(seqs[i])
            out[i] = (top.indices[row, :n].int().cpu(), top.values[row, :n].half().cpu(),
                      *([result.hidden_states[-1][row, :n].half().cpu()] if features else []))
        if progress:
            progress(int(mask.sum()))
    columns = [[out[i][c] for i in range(len(seqs))] for c in range(3 if features else 2)]
    return TeacherData([torch.tensor(s) for s in seqs], list(answer_starts), *columns)


def draft_vocabulary(data: TeacherData, size: int, vocab_size: int, always: Collection[int] = ()) -> torch.Tensor:
    """The `size` ids the target predicts (top-1) most often, plus `always` (EOS); all ids when size is 0 or the
    whole vocabulary. Sorted ascending."""
    if size == 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.bincount(torch.cat([t[:, 0].long() for t in data.top_ids]), minlength=vocab_size).float()
    counts += 1e-3 * torch.bincount(torch.cat(data.seqs), minlength=vocab_size)  # ties: frequent in the text
    counts[list(always)] = float("inf")
    return counts.topk(size).indices.sort().values



def soft_targets(data: TeacherData, rows: list[int], width: int, index: torch.Tensor, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target's top-k per position mapped into the draft vocabulary and renormalised there.
    Returns columns [B, W, K] (0 where outside), probabilities [B, W, K] and which positions count [B, W]."""
    k = data.top_ids[0].shape[1]
    cols = torch.zeros(len(rows), width, k, dtype=torch.long)
    probs = torch.zeros(len(rows), width, k)
    for r, i in enumerate(rows):
        n = len(data.seqs[i])
        mapped = index[data.top_ids[i].long()]  # [n, K] column in the draft vocabulary, -1 outside
        cols[r, :n] = mapped.clamp(min=0)
        probs[r, :n] = data.top_p[i].float() * (mapped >= 0)
    mass = probs.sum(-1, keepdim=True)
    counted = mass.squeeze(-1) > 0
    return cols.to(device), (probs / mass.clamp(min=1e-9)).to(device), counted.to(device)


def vocab_index(vocab: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[V] the column of each id in the draft vocabulary, -1 for ids outside it."""
    index = torch.full((vocab_size,), -1, dtype=torch.long)
    index[vocab] = torch.arange(len(vocab))
    return index


def pad(seqs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] ids and their attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    return ids.to(device), mask.to(device)


def batches(items: list[int], lengths: list[int], batch_tokens: int, shuffle: random.Random | None
             ) -> list[list[int]]:
    """Groups of similar length whose padded size stays within batch_tokens (a longer sequence goes alone)."""
    order = sorted(items, key=lambda i: lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * max(lengths[j] for j in out[-1] + [i]) <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    if shuffle is not None:
        shuffle.shuffle(out)
    return out


def greedy_continuations(pair: ModelPair, prompts: list[list[int]], new_tokens: int,
                         progress: Callable[[int], None] | None = None) -> tuple[list[list[int]], list[int]]:
    """The target's greedy continuations of `prompts` (strict CM-ASD: the same tokens as greedy decoding, faster), as
    the sequences prompt + continuation and where each continuation starts. `progress(1)` as each prompt is done."""
    if not prompts:
        return [], []
    decoder = Decoder(pair, DecodeSettings(method="cmasd", verify="strict", max_new_tokens=new_tokens, batch_size=8,
                                           trace=False))
    gens = decoder.generate_ids(prompts, progress=progress)
    return [p + g.token_ids for p, g in zip(prompts, gens)], [len(p) for p in prompts]
