"""A drafter distilled from its target, for targets without a small sibling that shares their tokenizer.

The drafter is the target cut down: its embedding (frozen, and tied to the LM head as in the target), a few of its
layers (the first ones and the last one) and its final norm. Only the layers and the norm train, on the target's
own next-token distributions (its top-k probabilities at every position of prompts + its greedy continuations, and
of corpus text). On a small model the LM head dominates a draft step (SmolLM2-135M: 28M of its 135M weights), so
the drafter may draft over a reduced vocabulary: the tokens the target predicts most often. It trains and drafts
over those ids only; tokens outside them are never drafted (the target still verifies every token).

The result is an ordinary Hugging Face directory (full-vocabulary head: transformers' assisted generation can use
it as is) plus draft_vocab.json, which `cmsd.load_pair` reads to swap in the reduced head when it loads the
directory as a drafter.

    data = teacher_targets(target, sequences, answer_starts, top_k)   # the target's distributions, once
    vocab = draft_vocabulary(data, size, always=eos ids)
    student = init_drafter(target, layers)
    train(student, data, vocab, settings)                             # soft cross-entropy on the top-k
    report = evaluate(student, vocab, held_out)                       # agreement, tokens per call at k = 4
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from cmsd.kernels import linear

DRAFT_VOCAB_FILE = "draft_vocab.json"
Progress = Callable[[int, dict[str, float]], None]  # (steps done, numbers to show)


@dataclass(frozen=True)
class DistillSettings:
    layers: int = 2  # transformer layers of the drafter: the target's first layers-1 and its last
    draft_vocab: int = 8192  # ids the drafter can draft (the target's most frequent predictions); 0 = all
    steps: int = 400  # optimizer steps
    batch_tokens: int = 2048  # tokens per step (whole sequences, padded)
    lr: float = 1e-3
    warmup: int = 20  # steps of linear warm-up before the cosine decay
    top_k: int = 32  # target probabilities kept per position
    seed: int = 0
    minutes: float | None = None  # stop training after this long (the last checkpoint is kept)

    def __post_init__(self) -> None:
        for name in ("layers", "steps", "batch_tokens", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0 (0 = the full vocabulary), got {self.draft_vocab}")


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
    for batch in _batches(list(range(len(seqs))), [len(s) for s in seqs], batch_tokens, shuffle=None):
        ids, mask = _pad([seqs[i] for i in batch], device)
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


def init_drafter(target: PreTrainedModel, layers: int) -> PreTrainedModel:
    """A copy of the target with only `layers` of its layers: the first layers-1 and the last one (which maps
    hidden states to the space the final norm and the LM head expect)."""
    config = copy.deepcopy(target.config)
    total = config.num_hidden_layers
    if not 1 <= layers < total:
        raise ValueError(f"layers must be between 1 and {total - 1} (the target has {total}), got {layers}")
    keep = list(range(layers - 1)) + [total - 1]
    config.num_hidden_layers = layers
    for key in ("quantization_config", "layer_types"):
        if hasattr(config, key):
            delattr(config, key)
    config.tie_word_embeddings = True
    student = type(target)(config).to(device=target.device, dtype=torch.float32)
    src = target.model
    with torch.no_grad():
        student.model.embed_tokens.weight.copy_(src.embed_tokens.weight)
        student.model.norm.load_state_dict(src.norm.state_dict())
        for mine, theirs in zip(student.model.layers, keep):
            mine.load_state_dict(src.layers[theirs].state_dict())
    student.tie_weights()
    student.model.embed_tokens.weight.requires_grad_(False)
    return student


def student_logits(student: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor,
                   vocab: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L, |vocab|]: the drafter's logits over the draft vocabulary only."""
    hidden = student.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden @ student.model.embed_tokens.weight[vocab].T


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


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train(student: PreTrainedModel, data: TeacherData, vocab: torch.Tensor, settings: DistillSettings,
          progress: Progress | None = None, checkpoint: Path | None = None, checkpoint_every: int = 50) -> TrainState:
    """Minimise the cross-entropy from the target's (top-k, draft-vocabulary) distribution to the drafter's at every
    position. Resumes from `checkpoint` when it exists and saves it every `checkpoint_every` steps."""
    device, index = student.device, vocab_index(vocab, student.config.vocab_size)

    def loss(rows: list[int]) -> torch.Tensor:
        ids, mask = _pad([data.seqs[i].tolist() for i in rows], device)
        cols, probs, counted = soft_targets(data, rows, ids.shape[1], index, device)
        logp = torch.log_softmax(student_logits(student, ids, mask, vocab.to(device)), -1)
        return -((logp.gather(-1, cols) * probs).sum(-1) * counted).sum() / counted.sum().clamp(min=1)

    return train_loop(student, data, settings, loss, progress, checkpoint, checkpoint_every)


def train_loop(model: torch.nn.Module, data: TeacherData, settings: DistillSettings,
               loss: Callable[[list[int]], torch.Tensor], progress: Progress | None = None,
               checkpoint: Path | None = None, checkpoint_every: int = 50) -> TrainState:
    """AdamW over `model`'s trainable parameters on `loss(rows)` of length-bucketed batches of `data`'s sequences
    (settings.batch_tokens each), warm-up then cosine decay. Resumes from `checkpoint` when it exists and saves it
    every `checkpoint_every` steps (and when settings.minutes runs out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, settings))
    state = TrainState()
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(saved["model"], strict=False)
        opt.load_state_dict(saved["opt"])
        schedule.load_state_dict(saved["schedule"])
        state = TrainState(**saved["state"])
    rng = random.Random(settings.seed + state.step)
    lengths = [len(s) for s in data.seqs]
    batches: list[list[int]] = []
    model.train()
    started = time.perf_counter() - state.seconds
    while state.step < settings.steps:
        if settings.minutes is not None and time.perf_counter() - started > 60 * settings.minutes:
            if checkpoint is not None:
                _save_checkpoint(checkpoint, model, opt, schedule, state)
            break
        if not batches:
            batches = _batches(list(range(len(data.seqs))), lengths, settings.batch_tokens, shuffle=rng)
        value = loss(batches.pop())
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        state.step += 1
        state.losses.append(value.item())
        state.seconds = time.perf_counter() - started
        if progress:
            progress(1, {"loss": state.losses[-1]})
        if checkpoint is not None and (state.step % checkpoint_every == 0 or state.step == settings.steps):
            _save_checkpoint(checkpoint, model, opt, schedule, state)
    model.eval()
    return state


def _save_checkpoint(path: Path, model: torch.nn.Module, opt, schedule, state: TrainState) -> None:
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    trainable = {k: v for k, v in model.state_dict().items() if k in names}
    tmp = path.with_suffix(".tmp")
    torch.save({"model": trainable, "opt": opt.state_dict(), "schedule": schedule.state_dict(),
                "state": asdict(state)}, tmp)
    tmp.replace(path)


def _lr_factor(step: int, settings: DistillSettings) -> float:
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class HeldOut:
    """How well the drafter matches the target on held-out sequences (prompt + the target's greedy continuation)."""

    positions: int  # continuation positions scored
    agreement: float  # drafter top-1 == target top-1 at continuation positions
    agreement_all: float  # ... at every position (prompts included)
    tokens_per_call: float  # strict greedy decoding with a fixed draft of k tokens: tokens emitted per target call
    k: int
    kl: float  # KL(target || drafter) over the draft vocabulary, mean over all positions
    coverage: float  # share of the target's top-1 continuation tokens inside the draft vocabulary
    confident_share: float = 0.0  # continuation positions where the drafter's top-1 probability is >= 0.5
    confident_agreement: float = 0.0  # agreement at those positions (what confidence-gated drafting sees)


@torch.inference_mode()
def evaluate(student: PreTrainedModel, vocab: torch.Tensor, data: TeacherData, k: int = 4) -> HeldOut:
    """Score the drafter against the target's distributions in `data` (computed with top_k covering most mass).

    Tokens per call is exact for strict greedy drafting with a fixed k: on the target's own greedy continuation,
    the drafter's prediction at each position is what it would draft there, so an iteration starting at position s
    accepts the run of agreeing positions from s (at most k) and emits one more token."""
    device, was_training = student.device, student.training
    student.eval()
    index = vocab_index(vocab, student.config.vocab_size)
    agree_cont = agree_all = positions = total = emitted = calls = inside = sure = sure_agree = 0
    kl_sum = 0.0
    for i, seq in enumerate(data.seqs):
        ids, mask = _pad([seq.tolist()], device)
        logp = torch.log_softmax(student_logits(student, ids, mask, vocab.to(device)), -1)[0]  # [L, |vocab|]
        cols, probs, counted = soft_targets(data, [i], len(seq), index, device)
        p = probs[0] * counted[0, :, None]
        kl_sum += float((p * (p.clamp(min=1e-12).log() - logp.gather(-1, cols[0]))).sum())
        mine = vocab.to(device)[logp.argmax(-1)].cpu()  # [L] drafter's top-1 as token ids
        theirs = data.top_ids[i][:, 0].long()
        match = mine == theirs
        agree_all += int(match.sum())
        total += len(seq)
        start = data.answer_starts[i] - 1  # the position whose next token is the first continuation token
        cont = match[max(start, 0):len(seq) - 1]
        confident = (logp.max(-1).values.exp().cpu() >= 0.5)[max(start, 0):len(seq) - 1]
        sure, sure_agree = sure + int(confident.sum()), sure_agree + int((cont & confident).sum())
        agree_cont += int(cont.sum())
        positions += len(cont)
        inside += int((index[theirs[max(start, 0):len(seq) - 1]] >= 0).sum())
        s = 0
        while s < len(cont):
            run = 0
            while run < k and s + run < len(cont) and bool(cont[s + run]):
                run += 1
            emitted += run + 1
            calls += 1
            s += run + 1
    student.train(was_training)
    return HeldOut(positions=positions, agreement=agree_cont / max(positions, 1), agreement_all=agree_all / max(total, 1),
                   tokens_per_call=emitted / max(calls, 1), k=k, kl=kl_sum / max(total, 1),
                   coverage=inside / max(positions, 1), confident_share=sure / max(positions, 1),
                   confident_agreement=sure_agree / max(sure, 1))


def save_drafter(student: PreTrainedModel, tokenizer, vocab: torch.Tensor, out: Path, card: str,
                 meta: dict) -> None:
    """An ordinary Hugging Face directory (+ draft_vocab.json and a model card)."""
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    full = len(vocab) == student.config.vocab_size
    (out / DRAFT_VOCAB_FILE).write_text(json.dumps({"ids": [] if full else vocab.tolist(), **meta}))
    (out / "README.md").write_text(card)


class DraftVocabHead(torch.nn.Module):
    """An LM head over a subset of the vocabulary: logits for those ids, a large negative value elsewhere, so the
    drafter's distribution and confidences are over the draft vocabulary while ids stay the target's."""

    def __init__(self, weight: torch.Tensor, ids: torch.Tensor) -> None:
        super().__init__()
        self.vocab_size = weight.shape[0]
        self.register_buffer("ids", ids.to(weight.device))
        self.register_buffer("weight_sub", weight[ids].detach().clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        sub = linear(hidden, self.weight_sub)
        out = sub.new_full((*sub.shape[:-1], self.vocab_size), -1e4)
        out[..., self.ids] = sub
        return out


def use_draft_vocab(model: PreTrainedModel, path: Path) -> bool:
    """Swap in the reduced head when the directory has a draft vocabulary. Returns whether it did."""
    file = Path(path) / DRAFT_VOCAB_FILE
    if not file.is_file():
        return False
    ids = json.loads(file.read_text()).get("ids") or []
    if not ids:
        return False
    model.lm_head = DraftVocabHead(model.get_input_embeddings().weight, torch.tensor(ids, dtype=torch.long))
    return True


def _pad(seqs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    return ids.to(device), mask.to(device)


def _batches(items: list[int], lengths: list[int], batch_tokens: int, shuffle: random.Random | None
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
