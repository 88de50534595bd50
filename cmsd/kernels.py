"""Linear layers and attention for the few-token forwards of speculative decoding on CPU.

A verify pass feeds each row 1 + k tokens, so a linear layer multiplies a handful of rows by its weight. How torch's
x @ W.T (MKL sgemm) handles that depends on the CPU: on one of our machines it ran 2 or 3 rows as that many passes
over the weight (SmolLM2-135M's forward went 47 ms for 1 token -> 99 ms for 3 on 2 cores), and computing the product
as (W @ x.T).T streamed the weight once (30 / 31 / 34 / 34 ms for 1-4 tokens); on another the same trick was twice as
slow as torch's own product for every row count. So it is not assumed: `small_row_counts` times both products over
a model's own weights once per process (a pass over all its linear layers, as a forward streams them) and the
(W @ x.T).T product is used only for the row counts where it is faster. On a GPU nothing changes: cuBLAS already
reads the weight once for skinny products.

Attention of a multi-token pass: with grouped-query attention and a mask (every verify pass: the cache has holes,
a tree has its own mask) transformers' SDPA path copies each key/value head once per query head (repeat_kv). For one
query token it instead folds the query heads of a group into the query length; `packed_sdpa` does the same for
W tokens ([B, H, W, D] -> [B, H_kv, G * W, D], the mask repeated G times), so no cache is copied.

What a measurement times goes through a stopwatch (`use_stopwatch`): the wall clock by default; a test injects
modelled costs instead, so nothing it asserts follows timing noise.

`decode_kernels(models, rows)` turns both on for a decode (the Decoder does it for its target and drafter), and
leaves the models as they were afterwards, so other code sharing them (transformers' generate in `cmsd-jobs eval`)
runs transformers' and torch's own paths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Collection, Iterator
from typing import Any
from pathlib import Path
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from cmsd.identity import cache_dir, fingerprint
from cmsd.kv import HoleyState

PACKED_SDPA = "cmsd_packed_sdpa"
SMALL_ROWS = range(1, 9)
log = logging.getLogger(__name__)
_counts: weakref.WeakKeyDictionary[nn.Module, dict[int, frozenset[int]]] = weakref.WeakKeyDictionary()
_costs: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[float, ...]]] = weakref.WeakKeyDictionary()

Stopwatch = Callable[[tuple, Callable[[], object]], float]
"""Runs `work` and returns the seconds it took; `what` says what is timed: ("forward", tokens) or
("linear", rows, small) with small True for the (W @ x.T).T product."""


def wall_clock(what: tuple, work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


_stopwatch: Stopwatch = wall_clock


def use_stopwatch(stopwatch: Stopwatch) -> Stopwatch:
    """Time the measurements with `stopwatch` from now on; returns the one it replaces. Costs measured before stay
    cached for their models."""
    global _stopwatch
    previous, _stopwatch = _stopwatch, stopwatch
    return previous


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           rows: Collection[int] = SMALL_ROWS) -> torch.Tensor:
    """x @ weight.T (+ bias), as (weight @ x.T).T when x's row count (all leading dims together) is in `rows`
    (on CPU)."""
    n = x.numel() // x.shape[-1]
    if n not in rows or x.device.type != "cpu":
        return nn.functional.linear(x, weight, bias)
    flat = x.reshape(n, x.shape[-1])
    if n in (1, 3):  # MKL's skinny product is fastest on an even column count: one more (repeated) row is free
        flat = torch.cat([flat, flat[-1:]])
    out = torch.mm(weight, flat.t()).t()[:n]
    if bias is not None:
        out = out + bias
    return out.contiguous().view(*x.shape[:-1], weight.shape[0])


class SmallRowsLinear(nn.Linear):
    """nn.Linear whose forward goes through `linear` (the class is swapped in place by `decode_kernels`, which also
    sets `small_rows`, the row counts that use (W @ x.T).T)."""

    small_rows: frozenset[int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.small_rows)


def packed_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with a multi-token query of a grouped-query model folded onto its key/value
    heads instead of repeating them (module doc)."""
    batch, heads, width, dim = query.shape
    groups = heads // key.shape[1]
    shared_mask = attention_mask is not None and attention_mask.shape[1] == 1  # one mask for every head
    if groups == 1 or width == 1 or not shared_mask or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    packed = query.reshape(batch, key.shape[1], groups * width, dim)  # head h = kv * groups + g -> row g * W + t
    mask = attention_mask.repeat(1, 1, groups, 1)
    out = nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=dropout,
                                                     scale=scaling)
    return out.reshape(batch, heads, width, dim).transpose(1, 2).contiguous(), None


def _on_disk(model: nn.Module, what: str, params: tuple, measure: Callable[[], list]) -> list:
    """measure() once per machine and model: kept in $CMSD_CACHE/kernels/, keyed by the model (cmsd.identity.
    fingerprint, dtype), what is measured and how, the CPU, the thread count and the torch version; a later process
    (the next job, another actor) reads it back instead of timing again. Measured anew, not kept, when a test's
    stopwatch times it (use_stopwatch) or the cache cannot be written."""
    if _stopwatch is not wall_clock:
        return measure()
    weight = next(model.parameters())
    key = {"what": what, "params": list(params), "model": fingerprint(model), "dtype": str(weight.dtype),
           **machine(weight.device), "torch": torch.__version__}
    path = cache_dir() / "kernels" / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
                                      + ".json")
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            log.info("%s: measured before on this machine (%s)", what, path)
            return saved["value"]
    except (OSError, ValueError):
        pass
    value = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"key": key, "value": value}))
        os.replace(partial, path)  # atomic: actors measuring at once each write a whole file
    except OSError as err:
        log.warning("cannot keep the %s measurement in %s: %s", what, path, err)
    return value


def machine(device: torch.device) -> dict[str, Any]:
    """What identifies the hardware a measurement holds for: the CPU, its cores and the threads torch uses, and the
    GPU where the model is on one."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": _cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def small_row_counts(model: nn.Module, rows: int, repeats: int = 3) -> frozenset[int]:
    """The row counts n <= rows at which (W @ x.T).T beats torch's x @ W.T over `model`'s linear layers on CPU (none
    on other devices). Each candidate is timed as a pass over all the layers in order (each weight streamed from
    memory as in a forward) after a warm-up pass, alternating which goes first, median of up to `repeats` rounds
    (two when a product is 1.5x the other: a clear case); (W @ x.T).T must win by 5 %. Once per model and `rows` on
    a machine (kept on disk, `_on_disk`)."""
    if rows <= 0 or not _on_cpu(model):
        return frozenset()
    known = _counts.setdefault(model, {})
    if rows not in known:
        known[rows] = frozenset(_on_disk(model, "small-row linear", (rows, repeats),
                                         lambda: _time_small_rows(model, rows, repeats)))
    return known[rows]


def _time_small_rows(model: nn.Module, rows: int, repeats: int) -> list[int]:
    layers = [m for m in model.modules() if type(m) in (nn.Linear, SmallRowsLinear)]
    started, faster = time.perf_counter(), set()
    with torch.inference_mode():
        for n in range(1, rows + 1):
            inputs = [torch.randn(n, m.in_features, dtype=m.weight.dtype) for m in layers]
            timings: dict[bool, list[float]] = {False: [], True: []}

            def one_pass(small: bool) -> float:
                return _stopwatch(("linear", n, small), lambda: [
                    linear(x, layer.weight, layer.bias, (n,) if small else ()) for layer, x in zip(layers, inputs)])

            one_pass(True)  # warm-up
            for round_ in range(max(repeats, 2)):
                for small in (round_ % 2 == 0, round_ % 2 == 1):
                    timings[small].append(one_pass(small))
                ratio = statistics.median(timings[True]) / statistics.median(timings[False])
                if round_ and not 1 / 1.5 < ratio < 1.5:
                    break
            if ratio < 0.95:
                faster.add(n)
    log.info("small-row linear: (W @ x.T).T is faster for row counts %s of %d (timed in %.1f s)",
             sorted(faster) or "none", rows, time.perf_counter() - started)
    return sorted(faster)


def forward_costs(model: nn.Module, width: int = 8, repeats: int = 3, context: int = 512
                  ) -> tuple[float, ...] | None:
    """What a verify pass of a decoder-only `model` over n = 1..width tokens costs in units of a 1-token pass: batch
    1, fed after a `context`-token cache as the decode feeds it (cmsd.kv.HoleyState: its mask, attention over the
    cache), with the kernels in effect when called (inside `decode_kernels`: the decode's own); the fastest of
    `repeats` after a warm-up, alternating (other work on the machine only slows a run down). Timed once per model
    and kernel setting on a machine (kept on disk, `_on_disk`). None on a GPU (no host timing of asynchronous
    kernels; its forward is memory bound for a few tokens) or for an encoder-decoder."""
    if not _on_cpu(model) or model.config.is_encoder_decoder:
        return None
    kernels = (model.config._attn_implementation,
               next((m.small_rows for m in model.modules() if isinstance(m, SmallRowsLinear)), None))
    known = _costs.setdefault(model, {})
    if (width, kernels) not in known:
        small = sorted(kernels[1]) if kernels[1] is not None else None
        known[width, kernels] = tuple(_on_disk(model, "forward cost", (width, repeats, context, kernels[0], small),
                                               lambda: _time_forwards(model, width, repeats, context)))
    return known[width, kernels]


def _time_forwards(model: nn.Module, width: int, repeats: int, context: int) -> list[float]:
    started = time.perf_counter()
    timings: dict[int, list[float]] = {n: [] for n in range(1, width + 1)}
    config = model.config.get_text_config(decoder=True)
    length = max(1, min(context, getattr(config, "max_position_embeddings", context) - width - 1))
    state = _TimingState(model, [[i % config.vocab_size for i in range(length)]], length + width + 8)
    ids = {n: torch.zeros(1, n, dtype=torch.long, device=model.device) for n in timings}

    def verify_pass(n: int) -> None:
        state.feed(ids[n], torch.ones_like(ids[n], dtype=torch.bool))
        state.commit(torch.zeros(1, dtype=torch.long, device=model.device))  # the cache as it was

    for round_ in range(repeats + 1):  # round 0: warm-up
        for n in timings:
            seconds = _stopwatch(("forward", n), lambda: verify_pass(n))
            if round_:
                timings[n].append(seconds)
    one = min(timings[1])
    costs = [min(t) / one for t in timings.values()]
    log.info("forward cost for 1..%d tokens, in 1-token forwards: %s (timed in %.1f s)", width,
             " ".join(f"{c:.2f}" for c in costs), time.perf_counter() - started)
    return costs


def timed(what: tuple, work: Callable[[], object]) -> float:
    """The seconds `work` took by the stopwatch in use (the wall clock, or a test's modelled costs)."""
    return _stopwatch(what, work)


def device_seconds(device: torch.device, what: tuple, work: Callable[[], object]) -> float:
    """The seconds `work` took on `device`: on a GPU by CUDA events recorded around it (the stream's time from the
    first kernel to the last, host gaps between them included), elsewhere (or with a test's stopwatch) by the
    stopwatch."""
    if device.type != "cuda" or _stopwatch is not wall_clock:
        return _stopwatch(what, work)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def step_costs(model: nn.Module, shapes: Collection[tuple[int, int]], context: int, repeats: int = 2
               ) -> dict[tuple[int, int], float]:
    """Seconds of one decode pass of a decoder-only `model` per (rows, tokens a row) in `shapes`: every row after a
    `context`-token cache (HoleyState, as the decode feeds it; two rows prefilled, 8 tokens apart, then copied, so
    no prefill of many rows is paid and a batch's cache has the holes of its shorter prompts), the fastest of
    `repeats` after a warm-up, by `device_seconds` (CUDA events on a GPU). Kept on disk once per machine and model
    (`_on_disk`), with the kernels in effect when called."""
    shapes = sorted(set(shapes))
    kernels = (model.config._attn_implementation,
               next((sorted(m.small_rows) for m in model.modules() if isinstance(m, SmallRowsLinear)), None))
    value = _on_disk(model, "step cost", (shapes, context, repeats, *kernels, "ragged rows"),
                     lambda: _time_steps(model, shapes, context, repeats))
    return {(rows, tokens): seconds for (rows, tokens), seconds in zip(shapes, value)}


def _time_steps(model: nn.Module, shapes: list[tuple[int, int]], context: int, repeats: int) -> list[float]:
    started = time.perf_counter()
    config = model.config.get_text_config(decoder=True)
    width = max(tokens for _, tokens in shapes)
    length = max(1, min(context, getattr(config, "max_position_embeddings", context) - width - 1))
    prompt = [i % config.vocab_size for i in range(length)]
    # the rows of a batch have prompts of different lengths, so the shorter ones' caches start with holes and the
    # mask is applied (a row alone has none: its steps skip the mask): a row and one 8 tokens shorter, copied to the
    # batch's rows in turn, the whole one alone for one row
    state = _TimingState(model, [prompt, prompt[:max(1, length - 8)]], length + width + 8)
    seconds, held = {}, [0, 1]  # the prompt (0: the whole, 1: the shorter) each row of the state holds
    with torch.inference_mode():
        for rows, tokens in sorted(shapes, key=lambda s: (s[0] == 1, s)):  # one row last (the shorter goes then)
            want = [i % 2 for i in range(rows)]
            state.select(torch.tensor([held.index(w) for w in want], device=model.device))
            held = want
            ids = torch.zeros(rows, tokens, dtype=torch.long, device=model.device)

            def one_pass() -> None:
                state.feed(ids, torch.ones_like(ids, dtype=torch.bool))
                state.commit(torch.zeros(rows, dtype=torch.long, device=model.device))  # the cache as it was

            one_pass()  # warm-up
            seconds[rows, tokens] = min(device_seconds(model.device, ("step", rows, tokens), one_pass)
                                        for _ in range(repeats))
    out = [seconds[shape] for shape in shapes]
    log.info("step cost for (rows, tokens) %s: %s s (timed in %.1f s)", shapes, " ".join(f"{c:.4f}" for c in out),
             time.perf_counter() - started)
    return out


class _TimingState(HoleyState):
    """A HoleyState for timing passes: each prompt's cache is its first TIMING_PREFIX tokens' keys and values,
    repeated to the prompt's length. A pass attends over the whole cache whatever it holds, and a real prefill of a
    long context would cost more than the passes it serves (seconds at one thread for two 512-token rows)."""

    def _prefill(self, row: int, prompt: list[int], cache) -> None:
        head = prompt[:TIMING_PREFIX]
        self.model(input_ids=torch.tensor([head], device=self.mask.device), past_key_values=cache, use_cache=True,
                   logits_to_keep=1)
        repeats = -(-len(prompt) // len(head)) - 1  # more copies of the prefix, the last one cut short
        for layer in cache.layers if repeats else []:
            keys, values = (t.repeat(1, 1, repeats, 1)[:, :, :len(prompt) - len(head)]
                            for t in (layer.keys, layer.values))
            layer.update(keys, values)


TIMING_PREFIX = 16  # the tokens a timing state really prefills (`_TimingState`)


@contextmanager
def decode_kernels(models: list[nn.Module | None], rows: int) -> Iterator[None]:
    """Within the block: the CPU models' nn.Linear layers fed n <= `rows` rows compute (W @ x.T).T where
    `small_row_counts` found that faster (rows 0: never), and the models on transformers' SDPA attention use
    `packed_sdpa`."""
    models = list({id(m): m for m in models if m is not None}.values())  # a model may come twice
    layers = [(m, counts) for model in models if (counts := small_row_counts(model, rows))
              for m in model.modules() if type(m) is nn.Linear]
    configs = [m.config for m in models if getattr(m.config, "_attn_implementation", None) == "sdpa"]
    for layer, counts in layers:
        layer.__class__ = SmallRowsLinear
        layer.small_rows = counts
    for config in configs:
        config._attn_implementation = PACKED_SDPA
    try:
        yield
    finally:
        for layer, _ in layers:
            layer.__class__ = nn.Linear
            del layer.small_rows
        for config in configs:
            config._attn_implementation = "sdpa"


def _on_cpu(model: nn.Module) -> bool:
    weight = next(model.parameters(), None)
    return weight is not None and weight.device.type == "cpu"
