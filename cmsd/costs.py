"""Cost curves: what decides speculative decoding's speed on the device a model is on, measured there.

A curve holds, for one model (real or dummy weights: the costs are the same) on one device and dtype:

- `steps`: one decode pass of B rows x k tokens each over a cache of L slots (cmsd.kernels.step_costs: the cache as
  the decode feeds it), the grid the tuner and the projection predict from;
- `prefill`: one row's prompt of n tokens (cmsd.kv.open_state, the decode's own prefill);
- `loops`: real decodes of a few prompts by each arm (AR, or a method with one drafter) at each batch size: seconds
  per loop iteration, and `host_s`, the share of an iteration that is not the target's pass (the loop's own work and
  the drafter's: on a GPU the work that does not overlap the device's), device-to-host transfers per iteration
  (cmsd.syncs), new tokens a second and the device's peak memory.

Timed to the end of the device's work: CUDA events on a GPU, the stopwatch on CPU (cmsd.kernels.device_seconds; a test
gives modelled costs). `Curve.pass_s` interpolates the grid (linearly in tokens, rows and cache length), and
cmsd.projection turns a curve and a decode's traces into tokens a second.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmsd import kernels
from cmsd.decode import Decoder
from cmsd.identity import ModelError
from cmsd.kv import open_state
from cmsd.models import LoadedModel, ModelPair, load_drafter
from cmsd.settings import DecodeSettings
from cmsd.tuning import between, drafter_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loop:
    """One arm's decode at one batch size (`Curve.loops`)."""

    method: str
    drafter: str | None
    rows: int
    iterations: int  # of the decode loop (verify passes)
    new_tokens: int
    seconds: float  # the whole decode, its prefill included
    prefill_s: float  # of that, the rows' prefill (timed apart)
    pass_s: float  # of one iteration, the target's pass (by the curve, at the tokens a row fed)
    fed: float  # tokens a row fed a pass (1 + its drafts)
    context: float  # the cache a pass attended over (on average)
    syncs: float | None  # device-to-host transfers per iteration
    peak_mb: float | None  # the device's peak memory (None on CPU)

    @property
    def iteration_s(self) -> float:
        return (self.seconds - self.prefill_s) / max(1, self.iterations)

    @property
    def host_s(self) -> float:
        """An iteration's seconds besides the target's pass: the loop's and the drafter's work."""
        return max(0.0, self.iteration_s - self.pass_s)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Curve:
    model: str  # a shape name or the model's name
    device: str  # the device's name (the GPU's, or the CPU's)
    dtype: str
    dummy: bool  # measured on dummy weights (the costs hold; acceptance in `loops` means nothing)
    steps: dict[tuple[int, int, int], float]  # (rows, tokens, context) -> seconds
    prefill: dict[int, float]  # prompt tokens -> seconds
    loops: list[Loop] = field(default_factory=list)

    def pass_s(self, rows: float, tokens: float, context: float) -> float:
        """A pass's seconds, interpolated linearly in each of rows, tokens and cache length (clamped to the grid)."""
        total = 0.0
        for r, wr in between({r for r, _, _ in self.steps}, rows):
            for c, wc in between({c for rr, _, c in self.steps if rr == r}, context):
                for t, wt in between({t for rr, t, cc in self.steps if rr == r and cc == c}, tokens):
                    total += wr * wc * wt * self.steps[r, t, c]
        return total

    def prefill_s(self, tokens: float) -> float:
        """One row's prefill: interpolated on the grid, in proportion to the tokens beyond it."""
        (low, _), *_ = between(self.prefill, tokens)
        scale = tokens / low if tokens > max(self.prefill) or tokens < min(self.prefill) else 1.0
        return scale * sum(w * self.prefill[n] for n, w in between(self.prefill, tokens))

    def host_s(self, method: str, drafter: str | None, rows: int) -> float | None:
        """An iteration's host seconds for an arm at `rows` rows: measured at the nearest batch sizes, interpolated
        linearly between them; None where the arm was not measured."""
        measured = {loop.rows: loop.host_s for loop in self.loops if (loop.method, loop.drafter) == (method, drafter)}
        return sum(w * measured[r] for r, w in between(measured, rows)) if measured else None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "dtype": self.dtype, "dummy": self.dummy,
                "steps": [{"rows": r, "tokens": t, "context": c, "s": s}
                          for (r, t, c), s in sorted(self.steps.items())],
                "prefill": [{"tokens": n, "s": s} for n, s in sorted(self.prefill.items())],
                "loops": [{**asdict(loop), "iteration_s": loop.iteration_s, "host_s": loop.host_s,
                           "tokens_per_s": loop.tokens_per_s} for loop in self.loops]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Curve:
        fields = set(Loop.__dataclass_fields__)
        return cls(data["model"], data["device"], data["dtype"], data["dummy"],
                   {(s["rows"], s["tokens"], s["context"]): s["s"] for s in data["steps"]},
                   {p["tokens"]: p["s"] for p in data["prefill"]},
                   [Loop(**{k: v for k, v in loop.items() if k in fields}) for loop in data.get("loops", [])])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Curve:
        return cls.from_dict(json.loads(Path(path).read_text()))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else kernels.machine(device)["cpu"]


def measure_curve(target: LoadedModel, rows: list[int], tokens: list[int], contexts: list[int], prefill: list[int],
                  runs: list[tuple[str, str | None, int]], prompts: list[list[int]], new_tokens: int
                  ) -> tuple[Curve, list[str]]:
    """`target`'s curve on its device: the pass grid (rows x tokens x contexts), the prefill of `prefill` tokens, and
    a loop per run (method, drafter, batch size) decoding that many of `prompts` (taken in turn) for `new_tokens`.
    A drafter that cannot be had for the target (no head of its shape) is left out, and the notes say why."""
    model = target.model
    curve = Curve(target.name, device_name(model.device), str(model.dtype).removeprefix("torch."), target.dummy,
                  measure_steps(model, rows, tokens, contexts), measure_prefill(model, prefill))
    log.info("%s: pass grid and prefill measured", target.name)
    pairs: dict[str | None, ModelPair | None] = {}
    notes = []
    for method, drafter, batch in runs:
        if drafter not in pairs:
            try:
                pairs[drafter] = ModelPair(target, load_drafter(target, drafter))
            except ModelError as err:
                pairs[drafter] = None
                notes.append(f"{method}/{drafter} not run: {str(err).splitlines()[0]}")
        if pairs[drafter] is not None:
            settings = DecodeSettings(method=method, batch_size=batch, max_new_tokens=new_tokens)
            curve.loops.append(measure_loop(pairs[drafter], settings, [prompts[i % len(prompts)]
                                                                        for i in range(batch)], curve))
            log.info("%s: %s/%s at batch %d: %.1f tokens/s", target.name, method, drafter, batch,
                     curve.loops[-1].tokens_per_s)
    return curve, notes


def measure_steps(model: torch.nn.Module, rows: list[int], tokens: list[int], contexts: list[int],
                  repeats: int = 3, small_rows: int = DecodeSettings.small_rows) -> dict[tuple[int, int, int], float]:
    """The pass grid: every (rows, tokens) at every cache length (kernels.step_costs; kept on disk per machine),
    with the decode's own kernels (small_rows: its setting)."""
    out = {}
    with kernels.decode_kernels([model], small_rows):
        for context in contexts:
            costs = kernels.step_costs(model, [(r, t) for r in rows for t in tokens], context, repeats)
            out.update({(r, t, context): s for (r, t), s in costs.items()})
    return out


def measure_prefill(model: torch.nn.Module, lengths: list[int], repeats: int = 3,
                    small_rows: int = DecodeSettings.small_rows) -> dict[int, float]:
    """One row's prefill of n tokens, the fastest of `repeats` after a warm-up, with the decode's own kernels."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    out = {}
    with torch.inference_mode(), kernels.decode_kernels([model], small_rows):
        for n in lengths:
            prompt = [[i * 7919 % vocab for i in range(n)]]
            open_state(model, prompt, n + 8)  # warm-up
            out[n] = min(kernels.device_seconds(model.device, ("prefill", n), lambda: open_state(model, prompt, n + 8))
                         for _ in range(repeats))
    return out


def measure_loop(pair: ModelPair, settings: DecodeSettings, prompts: list[list[int]], curve: Curve) -> Loop:
    """Decode `prompts` in one batch (settings.batch_size of them) and time it, then their prefill alone; a short
    decode of them after it counts the loop's transfers per iteration (cmsd.syncs: counting slows a decode, so it is
    not the one timed). The pass it is compared with comes from `curve`'s grid."""
    from cmsd.syncs import syncs_per_iteration

    decoder = Decoder(pair, settings.with_(trace=False))
    decoder.prepare()
    device, model = pair.device, pair.target.model
    short = Decoder(pair, settings.with_(trace=False, max_new_tokens=min(8, settings.max_new_tokens),
                                         verify_tokens=decoder.verify_tokens))  # the budget just measured
    short.generate_ids(prompts)  # warm-up: this batch's shapes once
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gens = []
    seconds = kernels.device_seconds(device, ("decode", settings.method, len(prompts)),
                                     lambda: gens.extend(decoder.generate_ids(prompts)))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    with torch.inference_mode(), kernels.decode_kernels([model], settings.small_rows):  # the rows' prefill alone
        capacity = max(map(len, prompts)) + settings.max_new_tokens + 8
        prefill_s = kernels.device_seconds(device, ("prefill", len(prompts)),
                                           lambda: open_state(model, prompts, capacity))
    syncs = syncs_per_iteration(short, prompts)
    iterations = decoder.iterations
    new = sum(len(g.token_ids) for g in gens)
    rows = len(prompts)
    fed = 1 + sum(g.stats.drafted for g in gens) / max(1, sum(g.stats.iterations for g in gens))
    context = sum(len(p) for p in prompts) / rows + new / rows / 2
    return Loop(settings.method, drafter_key(pair) if settings.drafts else None, rows, iterations, new, seconds,
                prefill_s, curve.pass_s(rows, fed, context), fed, context, syncs, peak)
