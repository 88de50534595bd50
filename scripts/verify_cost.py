"""The verify-cost curve: one SmolLM2-135M forward over W tokens per row on the caches of CNN/DM prompts (~950
tokens at batch 1), as transformers runs it and under cmsd.kernels.decode_kernels (the small-row linear product for
the row counts up to decode.small_rows where it was timed faster on this machine, and packed grouped-query attention).
Medians of 9 runs, alternating, in ms, and in units of the same setting's 1-token step.

    python scripts/verify_cost.py                 # batch 1, W = 1..8
    python scripts/verify_cost.py 8 1,2,3,4 64    # batch 8, W = 1..4, small_rows 8 and 64
"""

import contextlib
import json
import statistics
import sys
import time

import torch

from cmsd import PromptTemplate, load_pair
from cmsd.kernels import decode_kernels
from cmsd.kv import HoleyState

DATA = "../shared/data/"


@torch.inference_mode()
def main(batch: int = 1, widths: tuple[int, ...] = tuple(range(1, 9)), limits: tuple[int, ...] = (0, 8),
         runs: int = 9) -> None:
    pair = load_pair("smollm2", None, device="cpu", dtype="float32")
    rows = [json.loads(line) for line in open(DATA + "cnn_dailymail.test.jsonl")][:batch]
    template = PromptTemplate("summarization")
    prompts = [pair.tokenizer(template.render(pair.tokenizer, r["source"]))["input_ids"] for r in rows]
    state = HoleyState(pair.target.model, [p[:-1] for p in prompts], max(map(len, prompts)) + 16)
    times: dict[tuple[int, int], list[float]] = {}
    for _ in range(runs):
        for limit in limits:
            with decode_kernels([pair.target.model], limit) if limit else contextlib.nullcontext():
                for width in widths:
                    tokens = torch.tensor([p[-width:] for p in prompts])
                    start = time.perf_counter()
                    state.feed(tokens, torch.ones_like(tokens, dtype=torch.bool))
                    state.commit(torch.zeros(batch, dtype=torch.long))
                    times.setdefault((limit, width), []).append(time.perf_counter() - start)
    for limit in limits:
        one = statistics.median(times[(limit, widths[0])])
        name = f"cmsd small_rows {limit}" if limit else "transformers"
        print(f"batch {batch}, {name:>14}: " + "  ".join(
            f"W{w} {1000 * statistics.median(times[(limit, w)]):.1f} ({statistics.median(times[(limit, w)]) / one:.2f})"
            for w in widths))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]) if args else 1, tuple(int(w) for w in args[1].split(",")) if len(args) > 1 else tuple(range(1, 9)),
         (0, 8) + tuple(int(a) for a in args[2:]))
