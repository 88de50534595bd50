"""Tokens per target call of the n-gram drafter, one chain (ngram.branches 1) against tree drafts, with strict
CM-ASD on SmolLM2-135M: 4 CNN/DM + 4 XSum documents, 128 new tokens, batch 1. Counts, not timings: the predicted
speedup over AR takes a verify pass to cost 1 + 0.17 * drafted tokens (tree nodes), as scripts/ngram_study.py.

    OMP_NUM_THREADS=1 python scripts/tree_study.py                  # the default list below
    OMP_NUM_THREADS=1 python scripts/tree_study.py 3,10,0.1 4,16,0   # branches,tree_tokens,tree_min_p[,chain_stop]
    OMP_NUM_THREADS=1 python scripts/tree_study.py 1,10,0,0.15 1,10,0,0.25   # one chain with control.chain_stop
"""

import json
import sys

from cmsd import ControlSettings, DecodeSettings, Decoder, DocStats, NgramSettings, PromptTemplate, load_pair

DATA = "../shared/data/"


def main(trees: list[tuple[int, int, float, float]], docs: int = 4) -> None:
    rows = [json.loads(line) for line in open(DATA + "cnn_dailymail.test.jsonl")][:docs]
    rows += [json.loads(line) for line in open(DATA + "xsum.test.jsonl")][:docs]
    pair = load_pair("smollm2", "ngram", device="cpu", dtype="float32")
    prompts = [PromptTemplate("summarization").render(pair.tokenizer, r["source"]) for r in rows]
    outputs = None
    for branches, tree_tokens, min_p, chain_stop in trees:
        ngram = NgramSettings(branches=branches, tree_tokens=tree_tokens, tree_min_p=min_p)
        settings = DecodeSettings(method="cmasd", verify="strict", max_new_tokens=128, batch_size=1, ngram=ngram,
                                  control=ControlSettings(chain_stop=chain_stop))
        gens = Decoder(pair, settings).generate(prompts)
        same = outputs is None or [g.token_ids for g in gens] == outputs
        outputs = outputs or [g.token_ids for g in gens]
        s = DocStats.total([g.stats for g in gens])
        per_call, nodes = s.new_tokens / s.target_calls, s.drafted / s.target_calls
        print(f"branches={branches} tree_tokens={tree_tokens} tree_min_p={min_p} chain_stop={chain_stop}: tokens/call {per_call:.3f}, "
              f"drafted/call {nodes:.2f}, predicted speedup {per_call / (1 + 0.17 * nodes):.3f} ({s.new_tokens} tokens, {s.target_calls} calls,"
              f" output {'same' if same else 'DIFFERENT'})", flush=True)


if __name__ == "__main__":
    fields = [(a.split(",") + ["0"])[:4] for a in sys.argv[1:]]
    trees = [(int(b), int(t), float(p), float(c)) for b, t, p, c in fields]
    main(trees or [(1, 10, 0.0, 0.0), (2, 8, 0.15, 0.0), (3, 10, 0.1, 0.0), (3, 10, 0.15, 0.0), (3, 10, 0.2, 0.0)])
