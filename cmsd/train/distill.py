"""A drafter distilled from its target, for targets without a small sibling that shares their tokenizer.

The drafter is the target cut down: its embedding (frozen, and tied to the LM head as in the target), a few of its
layers (the first ones and the last one) and its final norm. Only the layers and the norm train, on the target's
own next-token distributions (its top-k probabilities at every position of prompts + its greedy continuations, and
of corpus text). On a small model the LM head dominates a draft step (SmolLM2-135M: 28M of its 135M weights), so
the drafter may draft over a reduced vocabulary: the tokens the target predicts most often. It trains and drafts
over those ids only; tokens outside them are never drafted (the target still verifies every token).

The result is an ordinary Hugging Face directory (full-vocabulary head: transformers' assisted generation can use
it as is) plus draft_vocab.json, which `cmsd.load_pair` reads to swap in the reduced head when it loads the
directory as a drafter (cmsd.drafters.model).

    data = teacher_targets(target, sequences, answer_starts, top_k)   # cmsd.train.data: the target's distributions
    vocab = draft_vocabulary(data, size, always=eos ids)
    student = init_drafter(target, layers)
    train(student, data, vocab, settings)                             # soft cross-entropy on the top-k
    report = evaluate(student, vocab, held_out)                       # agreement, tokens per call at k = 4
    save_drafter(student, tokenizer, vocab, out, card, meta)
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from cmsd.drafters.model import DRAFT_VOCAB_FILE
from cmsd.train.data import TeacherData, pad, soft_targets, vocab_index
from cmsd.train.loop import DistillSettings, Progress, TrainState, train_loop


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


def train(student: PreTrainedModel, data: TeacherData, vocab: torch.Tensor, settings: DistillSettings,
          progress: Progress | None = None, checkpoint: Path | None = None, checkpoint_every: int = 50) -> TrainState:
    """Minimise the cross-entropy from the target's (top-k, draft-vocabulary) distribution to the drafter's at every
    position. Resumes from `checkpoint` when it exists and saves it every `checkpoint_every` steps."""
    device, index = student.device, vocab_index(vocab, student.config.vocab_size)

    def loss(rows: list[int]) -> torch.Tensor:
        ids, mask = pad([data.seqs[i].tolist() for i in rows], device)
        cols, probs, counted = soft_targets(data, rows, ids.shape[1], index, device)
        logp = torch.log_softmax(student_logits(student, ids, mask, vocab.to(device)), -1)
        return -((logp.gather(-1, cols) * probs).sum(-1) * counted).sum() / counted.sum().clamp(min=1)

    return train_loop(student, data, settings, loss, progress, checkpoint, checkpoint_every)


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
        ids, mask = pad([seq.tolist()], device)
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
