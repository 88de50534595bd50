"""One document's speed at batch 1 by verify budget, side by side in one process at one torch thread (a job actor's
share of a 2-core CPU), each configuration twice in turn: AR, and CM-ASD with the n-gram tree under a verify budget
of 2 and 4 tokens a pass (the tree cut by the cost curve within it) and under the automatic budget (the cut alone).

    python scripts/batch1_budget.py ../shared/data/cnn_dailymail.test.jsonl [--docs 8] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cmsd import DecodeSettings, Decoder, PromptTemplate, load_pair
from cmsd.decode import MAX_PASS
from cmsd.kernels import decode_kernels, forward_costs

CONFIGS = [("ar", 0), ("cmasd", 2), ("cmasd", 0), ("cmasd", 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus")
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pair = load_pair("smollm2", drafter="ngram")
    rows = [json.loads(line) for line in open(args.corpus)][:args.docs]
    prompts = [PromptTemplate("summarization").render(pair.tokenizer, r["source"]) for r in rows]
    with decode_kernels([pair.target.model], DecodeSettings().small_rows):
        curve = forward_costs(pair.target.model, MAX_PASS)
    print("cost curve (1..8 tokens, in 1-token passes):", " ".join(f"{c:.2f}" for c in curve))
    speeds, seen, texts = {}, {}, None
    for method, budget in CONFIGS + CONFIGS[::-1]:
        decoder = Decoder(pair, DecodeSettings(method=method, batch_size=1, max_new_tokens=args.new_tokens,
                                               verify_tokens=budget), curve)
        decoder.generate(prompts[:1])  # warm-up
        start = time.perf_counter()
        gens = decoder.generate(prompts)
        seconds = time.perf_counter() - start
        tokens = sum(len(g.token_ids) for g in gens)
        texts = texts or [g.text for g in gens]
        assert [g.text for g in gens] == texts, "strict decoding must reproduce AR's output"
        speeds.setdefault((method, budget), []).append(tokens / seconds)
        seen[method, budget] = (decoder.share(1), tokens / sum(g.stats.target_calls for g in gens))
    base = statistics.mean(speeds["ar", 0])
    print("| configuration | drafts a row | tokens/s (2 runs) | vs AR | tokens/call |\n| --- | --- | --- | --- | --- |")
    for method, budget in CONFIGS:
        runs = speeds[method, budget]
        name = "ar" if method == "ar" else f"cmasd, budget {budget or 'auto (the cut alone)'}"
        print(f"| {name} | {seen[method, budget][0] if method != 'ar' else 0} | "
              f"{' / '.join(f'{r:.2f}' for r in runs)} | {statistics.mean(runs) / base:.3f} | "
              f"{seen[method, budget][1]:.2f} |")


if __name__ == "__main__":
    main()
