"""A shard's prompts on the worker: a prompt too long for the target (its context minus max_new_tokens) is refused,
not decoded.
"""

from __future__ import annotations


def too_long(tokens: int, budget: int) -> str | None:
    """The reason a prompt of `tokens` tokens is refused, or None when it fits `budget`."""
    if tokens <= budget:
        return None
    return f"too long for the model: prompt of {tokens} tokens > {budget} (the context minus max_new_tokens)"


def split_by_length(prompts: list[list[int]], budget: int) -> tuple[list[int], dict[int, str]]:
    """Of token-id prompts, the indices of those that fit, and the others with the reason each is refused."""
    keep: list[int] = []
    refused: dict[int, str] = {}
    for i, prompt in enumerate(prompts):
        reason = too_long(len(prompt), budget)
        if reason:
            refused[i] = reason
        else:
            keep.append(i)
    return keep, refused
