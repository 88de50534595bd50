"""Peers: what users would pick instead of cmsd, run through transformers itself (and vLLM where installed) on
the same token ids and the same loaded models.

    greedy         model.generate, greedy; batches with left padding
    assisted       assistant_model = the suite's drafter model (batch 1; its default schedule and
                   assistant_confidence_threshold unless the suite sets them)
    prompt-lookup  prompt_lookup_num_tokens = N (batch 1)
    early-exit     assistant_early_exit = L: the target's first L layers draft (batch 1)
    vllm           vLLM's offline LLM with its own speculative decoding (ngram or the drafter model)

With dummy weights (models.load_format dummy) the transformers peers run on cmsd's dummy models themselves; vLLM
cannot take them and builds its own random weights of the same shapes (its load_format "dummy").

Counts come from a forward pre-hook on the target: every full-depth call is a target call. Assisted generation
has no separate prefill: its first call is fed the prompt plus c drafted tokens, each later call 1 + c tokens.
Accepted drafts = new tokens - target calls (each call emits its accepted drafts plus one token; a cut at EOS or
at max_new_tokens can make this a slight overcount). Rollbacks are not visible from outside: rollback_rate n/a.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from jobs.eval.runners import WARMUP_TOKENS, RawOutput, Runner, RunnerInfo
from jobs.eval.suite import PeerEntry

DRAFT_RATES = ("tokens_per_call", "acceptance_rate", "mean_k")


class PeerSkipped(Exception):
    """This peer cannot run with this suite (the reason is shown in the report)."""


class CallCounter:
    """Counts a model's full-depth forward calls and the tokens fed to each, while in a `with` block."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.base_config = getattr(model, model.base_model_prefix, model).config
        self.depth = getattr(self.base_config, "num_hidden_layers", None)
        self.fed: list[int] = []

    def __enter__(self) -> CallCounter:
        self.fed = []
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _hook(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        if getattr(self.base_config, "num_hidden_layers", None) != self.depth:
            return  # an early-exit draft call (transformers lowers num_hidden_layers while drafting)
        ids = kwargs.get("input_ids", kwargs.get("decoder_input_ids"))
        if ids is None and args:
            ids = args[0]
        self.fed.append(int(ids.shape[1]) if ids is not None and ids.dim() == 2 else 1)


class HFRunner(Runner):
    """A transformers `generate` peer on the target (and the drafter model, for assisted generation)."""

    def __init__(self, entry: PeerEntry, target: Any, drafter: Any, max_new_tokens: int) -> None:
        self.name, self.limit, self.entry = entry.name, entry.limit, entry
        self.model, self.tokenizer = target.model, target.tokenizer
        self.encoder_decoder = bool(self.model.config.is_encoder_decoder)
        self.eos = sorted(eos_ids(target))
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (self.eos or [0])[0]
        self.extra = _generate_kwargs(entry, self.model, drafter)
        self.max_new_tokens = max_new_tokens
        self.counter = CallCounter(self.model)
        settings = {k: v for k, v in self.extra.items() if k != "assistant_model"}
        self.info = RunnerInfo(kind=entry.kind, measured=DRAFT_RATES if self.extra else ("tokens_per_call",),
                               lossless=True, batched=entry.batched, settings=settings)

    def run(self, prompts: list[list[int]], doc_ids: list[str]) -> list[RawOutput]:
        new = self._generate(prompts, self.max_new_tokens)
        fed, width = self.counter.fed, max(len(p) for p in prompts)
        calls = len(fed)
        # the first call is fed the (padded) prompt plus its drafts, every later one its last token plus its drafts
        drafted = sum(n - base for n, base in zip(fed, [width] + [1] * calls)) if self.extra else 0
        return [RawOutput(ids, calls=calls, iterations=calls, drafted=drafted,
                          accepted=min(drafted, max(0, len(ids) - calls))) for ids in new]

    def warmup(self, prompt: list[int]) -> None:
        self._generate([prompt], WARMUP_TOKENS)

    def _generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        import torch
        from transformers import GenerationConfig

        input_ids, mask = left_pad(prompts, self.pad, self.model.device)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=self.eos or None, pad_token_id=self.pad,
                                  **{k: v for k, v in self.extra.items() if k != "assistant_model"})
        kwargs = {"assistant_model": self.extra["assistant_model"]} if "assistant_model" in self.extra else {}
        with torch.inference_mode(), self.counter:
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config, **kwargs)
        start = 1 if self.encoder_decoder else input_ids.shape[1]  # decoder start token / the prompt
        return [cut_at_eos(row, set(self.eos)) for row in out[:, start:].tolist()]


def _generate_kwargs(entry: PeerEntry, model: Any, drafter: Any) -> dict[str, Any]:
    """The generation arguments that make transformers run this peer (empty for greedy)."""
    optional = {k: getattr(entry, k) for k in ("num_assistant_tokens", "num_assistant_tokens_schedule",
                                               "assistant_confidence_threshold") if getattr(entry, k) is not None}
    if entry.kind == "greedy":
        return {}
    if entry.kind == "prompt-lookup":
        out = {"prompt_lookup_num_tokens": entry.prompt_lookup_num_tokens}
        return out | ({"max_matching_ngram_size": entry.max_matching_ngram_size}
                      if entry.max_matching_ngram_size else {})
    if entry.kind == "assisted":
        if drafter is None or isinstance(drafter, str):
            raise PeerSkipped(f"assisted generation needs a drafter model; this suite's drafter is {drafter!r}")
        return {"assistant_model": drafter.model, **optional}
    layers = getattr(model.config.get_text_config(decoder=True), "num_hidden_layers", 2)
    layer = entry.assistant_early_exit or max(1, layers // 2)
    if layer >= layers:
        raise PeerSkipped(f"assistant_early_exit={layer} must be below the target's {layers} layers")
    return {"assistant_early_exit": layer, **optional}


class VllmRunner(Runner):
    """vLLM's offline LLM with speculative decoding: ngram prompt lookup, or the drafter model."""

    def __init__(self, entry: PeerEntry, target: Any, drafter: Any, max_new_tokens: int) -> None:
        from vllm import LLM, SamplingParams

        self.name, self.limit = entry.name, entry.limit
        speculative = _vllm_speculative(entry, drafter)
        # dummy weights: vLLM's own random weights of the same shapes (it cannot take cmsd's), the same tokenizer
        dummy = {"load_format": "dummy", "tokenizer": str(target.tokenizer.name_or_path)} if target.dummy else {}
        self.llm = LLM(model=_location(target), speculative_config=speculative, seed=0, **dummy)
        self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        self.warm = SamplingParams(temperature=0.0, max_tokens=WARMUP_TOKENS)
        self.info = RunnerInfo(kind="vllm", measured=(), lossless=True, batched=entry.batched,
                               settings={"speculative_config": {k: v for k, v in (speculative or {}).items()},
                                         **({"load_format": "dummy"} if dummy else {})})

    def run(self, prompts: list[list[int]], doc_ids: list[str]) -> list[RawOutput]:
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], self.params, use_tqdm=False)
        return [RawOutput(list(o.outputs[0].token_ids)) for o in outs]

    def warmup(self, prompt: list[int]) -> None:
        self.llm.generate([{"prompt_token_ids": prompt}], self.warm, use_tqdm=False)


def _vllm_speculative(entry: PeerEntry, drafter: Any) -> dict[str, Any] | None:
    if drafter == "ngram":
        return {"method": "ngram", "num_speculative_tokens": entry.num_speculative_tokens, "prompt_lookup_max": 4}
    if drafter is None or isinstance(drafter, str):
        return None
    return {"method": "draft_model", "model": _location(drafter),
            "num_speculative_tokens": entry.num_speculative_tokens}


def make_peer(entry: PeerEntry, target: Any, drafter: Any, max_new_tokens: int) -> Runner:
    """The runner of one peer entry; PeerSkipped when it cannot run here (the reason says why)."""
    if entry.kind != "vllm":
        return HFRunner(entry, target, drafter, max_new_tokens)
    if importlib.util.find_spec("vllm") is None:
        raise PeerSkipped("vLLM is not installed (`import vllm` fails); install it on a GPU machine to compare")
    try:
        return VllmRunner(entry, target, drafter, max_new_tokens)
    except (ImportError, RuntimeError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PeerSkipped(f"vLLM could not start: {first}") from err


def left_pad(prompts: list[list[int]], pad: int, device: Any) -> tuple[Any, Any]:
    """[B, T] token ids padded on the left, and the [B, T] attention mask."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """Generated tokens up to and including the first EOS (what follows is padding)."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i + 1]
    return tokens


def eos_ids(loaded: Any) -> set[int]:
    """Every EOS id the model's generation config, config and tokenizer name (cmsd stops at the same set)."""
    out: set[int] = set()
    for source in (loaded.model.generation_config, loaded.model.config, loaded.tokenizer):
        value = getattr(source, "eos_token_id", None)
        out.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int))
    return out


def _location(loaded: Any) -> str:
    return str(getattr(loaded.model.config, "_name_or_path", "") or loaded.name)
