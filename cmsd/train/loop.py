"""The training loop both kinds of drafter share: AdamW over the trainable parameters on a loss of length-bucketed
batches, warm-up then cosine decay, and a checkpoint that an interrupted run resumes from."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cmsd.train.data import TeacherData, batches

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
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


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
    queue: list[list[int]] = []
    model.train()
    started = time.perf_counter() - state.seconds
    while state.step < settings.steps:
        if settings.minutes is not None and time.perf_counter() - started > 60 * settings.minutes:
            if checkpoint is not None:
                _save_checkpoint(checkpoint, model, opt, schedule, state)
            break
        if not queue:
            queue = batches(list(range(len(data.seqs))), lengths, settings.batch_tokens, shuffle=rng)
        value = loss(queue.pop())
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


