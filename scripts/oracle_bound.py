"""The most any n-gram drafter could gain here: an oracle that drafts, at every step, exactly the tokens of the
target's greedy continuation that its candidates contain (the true token among the `branches` likeliest
continuations, step after step, at most budget - 1 of them) and nothing wrong, priced with this machine's measured
forward-cost curve. SmolLM2-135M, 4 CNN/DM + 4 XSum documents (jobs/suites/performance.yaml), 128 new tokens.

Its decode speedup over AR is sum(T * 1 step) / sum(cost of each oracle pass); the end-to-end bound adds the
measured prefill of each prompt to both sides (tokens/s counts the whole generate call, as `cmsd-jobs eval` does).

    python scripts/oracle_bound.py            # branches 1 (one chain), 2, 3 and all candidates
"""

import json
import statistics
import sys
import time

import torch

from cmsd import DecodeSettings, Decoder, NgramSettings, PromptTemplate, load_pair
from cmsd.decode import MAX_PASS
from cmsd.drafters.base import Sampler
from cmsd.drafters.ngram import NgramTreeDrafter, SuffixIndex
from cmsd.kernels import decode_kernels, forward_costs
from cmsd.kv import HoleyState
from cmsd.settings import ConfidenceSettings

DATA = "../shared/data/"


def matched(drafter: NgramTreeDrafter, index: SuffixIndex, out: list[int], t: int, limit: int) -> int:
    """How many of out[t:] in a row are among the drafter's candidates after the sequence so far (index)."""
    length = 0
    while length < limit and t + length < len(out):
        found = drafter._candidates(index, out[t:t + length])
        if found is None or out[t + length] not in {token for token, _ in found[0]}:
            break
        length += 1
    return length


def runs(drafter: NgramTreeDrafter, prompt: list[int], out: list[int], limit: int) -> list[int]:
    index = SuffixIndex(prompt, drafter.settings)
    found = []
    for t, token in enumerate(out):
        found.append(matched(drafter, index, out, t, limit))
        index.extend([token])
    return found


@torch.inference_mode()
def main(branch_counts: list[int]) -> None:
    rows = [json.loads(line) for line in open(DATA + "cnn_dailymail.test.jsonl")][:4]
    rows += [json.loads(line) for line in open(DATA + "xsum.test.jsonl")][:4]
    pair = load_pair("smollm2", "ngram", device="cpu", dtype="float32")
    template = PromptTemplate("summarization")
    prompts = [pair.tokenizer(template.render(pair.tokenizer, r["source"]))["input_ids"] for r in rows]
    outs = [g.token_ids for g in Decoder(pair, DecodeSettings(method="ar", max_new_tokens=128, batch_size=8))
            .generate_ids(prompts)]
    model = pair.target.model
    with decode_kernels([model], DecodeSettings().small_rows):
        costs = forward_costs(model, MAX_PASS)
        prefill, steps = [], []
        for prompt in prompts:  # the prefill of each prompt and a 1-token step after it, as a decode runs them
            start = time.perf_counter()
            state = HoleyState(model, [prompt[:-1]], len(prompt) + 16)
            prefill.append(time.perf_counter() - start)
            token = torch.tensor([prompt[-1:]])
            for _ in range(5):
                start = time.perf_counter()
                state.feed(token, torch.ones_like(token, dtype=torch.bool))
                state.commit(torch.zeros(1, dtype=torch.long))
                steps.append(time.perf_counter() - start)
    step = statistics.median(steps)
    tokens = sum(map(len, outs))
    ar_s = sum(prefill) + tokens * step
    share = 100 * sum(prefill) / ar_s
    print(f"measured: pass costs for 1-{MAX_PASS} tokens {' '.join(f'{c:.2f}' for c in costs)}; 1-token step "
          f"{1000 * step:.1f} ms; prefill {sum(prefill):.2f} s of AR's {ar_s:.2f} s ({share:.0f} %)")
    for branches in branch_counts:
        drafter = NgramTreeDrafter([[0]], pair.target.model.config.vocab_size, NgramSettings(branches=branches),
                                   ConfidenceSettings(), Sampler(), torch.device("cpu"))
        matches = [runs(drafter, prompt, out, MAX_PASS - 1) for prompt, out in zip(prompts, outs)]
        best = None
        for budget in range(1, MAX_PASS + 1):
            calls = cost = 0.0
            for run, out in zip(matches, outs):
                t = 0
                while t < len(out):
                    drafted = min(run[t], budget - 1, len(out) - t - 1)
                    calls, cost, t = calls + 1, cost + costs[drafted], t + drafted + 1
            total_s = sum(prefill) + cost * step
            if best is None or total_s < best[0]:
                best = (total_s, budget, tokens / calls, tokens * step / (cost * step))
        total_s, budget, per_call, decode_x = best
        name = "all candidates" if branches >= 10 ** 6 else f"branches {branches}"
        print(f"{name}: best budget {budget} tokens, {per_call:.2f} tokens/call, decode {decode_x:.2f}x AR, "
              f"end to end {ar_s / total_s:.2f}x AR")


if __name__ == "__main__":
    main([int(b) for b in sys.argv[1:]] or [1, 2, 3, 10 ** 6])
