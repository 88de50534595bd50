"""Tiny random models built from a config (both families) and helpers shared by the tests."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import BartConfig, BartForConditionalGeneration, LlamaConfig, LlamaForCausalLM

TINY_VOCAB = 64
UNCAPPED = 1024  # decode.verify_tokens without a cap: batched rows draft as on a GPU (on CPU the automatic budget,
#                  a few tokens a pass, stops drafting for wide batches, so a batch-8 test would only exercise AR steps)


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = TINY_VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).eval()


def tiny_bart(seed: int = 0, vocab: int = TINY_VOCAB, init_std: float = 0.02,
              positions: int = 128) -> BartForConditionalGeneration:
    """init_std 0.02 (BART's) makes a random model's output hardly depend on its input; 0.3 makes it do."""
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=positions, pad_token_id=1, bos_token_id=0, eos_token_id=None,
                        decoder_start_token_id=2, forced_eos_token_id=None, init_std=init_std)
    model = BartForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    return model


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A copy of `model` with noise on every weight: a drafter that agrees with the target often, not always."""
    torch.manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn_like(p) * scale)
    return out


def greedy_reference(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' own greedy decoding of one unpadded prompt: the ground truth for strict mode."""
    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                  pad_token_id=0)
    if model.config.is_encoder_decoder:
        out = model.generate(ids, forced_bos_token_id=None, forced_eos_token_id=None, no_repeat_ngram_size=0,
                             eos_token_id=None, **kwargs)
        return out[0, 1:].tolist()
    return model.generate(ids, **kwargs)[0, len(prompt):].tolist()


def random_prompts(seed: int, count: int, low: int = 2, high: int = 40) -> list[list[int]]:
    """Prompts of different lengths; each repeats a stretch of itself so the n-gram drafter finds matches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in torch.randint(low, high, (count,), generator=g).tolist():
        p = torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist()
        out.append(p + p[: n // 2])
    return out


def repetitive_prompts(seed: int, count: int) -> list[list[int]]:
    """Prompts made of a few random segments repeated in random order: a suffix has several continuations."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        segments = [torch.randint(3, TINY_VOCAB, (int(n),), generator=g).tolist()
                    for n in torch.randint(2, 6, (4,), generator=g)]
        order = torch.randint(0, 4, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g)
        out.append([t for i in order.tolist() for t in segments[i]])
    return out


class ModelledCosts:
    """A stopwatch for cmsd.kernels' cost measurements (`use_stopwatch`) that runs the work and returns modelled
    seconds instead of the wall clock: a verify pass over n tokens costs 1 + slope (n - 1) single steps (at 0.1 the
    automatic verify budget is 4 tokens a pass; a pass of r rows of t tokens, as r t tokens; a tuning sample's
    decode costs nothing beyond its passes), and the (W @ x.T).T product costs half of torch's for the row counts
    in `faster_rows`, the same for the others (so exactly those use it). tests/conftest.py installs one for the
    session with no faster rows (torch's own product, the faster one on most CPUs), so every test takes the same
    decode paths on any machine and under any load; tests/cmsd/test_kernels.py decodes with the small-row product."""

    def __init__(self, slope: float = 0.1, faster_rows: frozenset[int] = frozenset()) -> None:
        self.slope, self.faster_rows = slope, faster_rows
        self.calls: list[tuple] = []

    def __call__(self, what: tuple, work) -> float:
        work()
        self.calls.append(what)
        if what[0] == "forward":
            return 1.0 + self.slope * (what[1] - 1)
        if what[0] == "step":  # a pass of `rows` rows of `tokens` tokens: as a pass over rows x tokens tokens
            return 1.0 + self.slope * (what[1] * what[2] - 1)
        if what[0] in ("decode", "prefill"):  # a tuning sample's decode: nothing beyond its passes (no prefill, no
            return 0.0  # drafter cost)
        _, rows, small = what
        return 0.5 if small and rows in self.faster_rows else 1.0


@contextmanager
def timed_by(stopwatch) -> Iterator[None]:
    """cmsd.kernels' measurements use `stopwatch` inside the block."""
    from cmsd import kernels

    previous = kernels.use_stopwatch(stopwatch)
    try:
        yield
    finally:
        kernels.use_stopwatch(previous)
