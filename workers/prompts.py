"""A shard's prompts on the worker: each row rendered with the job's template and tokenized as the decoder will
tokenize it; a prompt too long for the target (its context minus max_new_tokens) is refused, not decoded.
"""

from __future__ import annotations

from typing import Any


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's token ids as cmsd's Decoder.generate makes them (no second BOS after a chat template's)."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]


def too_long(tokens: int, budget: int) -> str | None:
    """The reason a prompt of `tokens` tokens is refused, or None when it fits `budget`."""
    if tokens <= budget:
        return None
    return f"too long for the model: prompt of {tokens} tokens > {budget} (the context minus max_new_tokens)"


def split_by_length(tokenizer: Any, prompts: list[str], budget: int) -> tuple[list[int], dict[int, str]]:
    """The indices of the prompts that fit, and the others with the reason each is refused."""
    keep: list[int] = []
    refused: dict[int, str] = {}
    for i, prompt in enumerate(prompts):
        reason = too_long(len(prompt_ids(tokenizer, prompt)), budget)
        if reason:
            refused[i] = reason
        else:
            keep.append(i)
    return keep, refused
