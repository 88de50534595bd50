"""Is a projection right where it can be checked? On this machine: the cost curve of the SmolLM2-135M shape with
dummy weights (as the GPU check measures one), then real decodes of held-out documents by the real model, each
projected from its own traces onto that curve and compared with its measured speed, side by side in one process.

    .venv/bin/python scripts/projection_check.py --corpus ../shared/data/xsum.test.jsonl --docs 16

--save writes the real model's batch-1 traces (scripts/data/smollm2-135m.traces.json) and the demo prompts as token
ids (scripts/data/demo-prompts.json), which scripts/gpu_check.py projects and decodes on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cmsd.costs import measure_curve  # noqa: E402
from cmsd.decode import Decoder  # noqa: E402
from cmsd.models import ModelPair, load_drafter, load_model  # noqa: E402
from cmsd.projection import as_ar, project, traced_generations  # noqa: E402
from cmsd.prompts import PromptTemplate  # noqa: E402
from cmsd.settings import DecodeSettings  # noqa: E402

DATA = ROOT / "scripts" / "data"
RUNS = [("ar", None, 1), ("ar", None, 8), ("cmasd", "ngram", 1), ("cmasd", "head", 1), ("cmasd", "ngram", 4)]


def prompts_of(path: Path, tokenizer, limit: int) -> list[list[int]]:
    template = PromptTemplate("summarization")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
    return [tokenizer(template.render(tokenizer, r["source"]), add_special_tokens=False)["input_ids"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared/data/xsum.test.jsonl")
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    real = load_model("smollm2", "cpu", "float32")
    prompts = prompts_of(args.corpus, real.tokenizer, args.docs)
    demo = prompts_of(ROOT / "jobs/data/demo.jsonl", real.tokenizer, 24)
    batches = sorted({b for _, _, b in RUNS})

    started = time.perf_counter()
    dummy = load_model("smollm2-135m", "cpu", "float32", load_format="dummy")
    mean = sum(map(len, prompts)) / len(prompts)
    # the loops: on the demo prompts, with dummy weights, as the GPU check does
    curve, _ = measure_curve(dummy, batches, [1, 2, 3, 5, 9], [256, 512, 1024], [128, 512, 1024], RUNS, demo,
                             args.new_tokens)
    print(f"curve of the dummy SmolLM2-135M shape measured in {time.perf_counter() - started:.0f} s "
          f"(prompts of {mean:.0f} tokens on average)")

    print("| decode (real weights) | batch | measured tokens/s | projected | projected / measured |")
    print("|---|---|---|---|---|")
    saved = []
    for method, name, b in RUNS:
        pair = ModelPair(real, load_drafter(real, name))
        decoder = Decoder(pair, DecodeSettings(method=method, batch_size=b, max_new_tokens=args.new_tokens))
        decoder.prepare()
        start = time.perf_counter()
        gens = decoder.generate_ids(prompts)
        seconds = time.perf_counter() - start
        measured = sum(len(g.token_ids) for g in gens) / seconds
        arm = traced_generations(method, name, gens)
        (projected,) = project(curve, arm, [b], decoder.verify_tokens, decoder.settings.control.k_max) or \
            project(curve, as_ar(arm), [b])  # the budget leaves no draft at this batch: it decodes as AR
        print(f"| {arm.label} | {b} | {measured:.2f} | {projected.tokens_per_s:.2f} | "
              f"{projected.tokens_per_s / measured:.3f} |", flush=True)
        if b == 1:
            saved.append(arm.to_dict())
    if args.save:
        DATA.mkdir(exist_ok=True)
        source = (f"SmolLM2-135M-Instruct (real weights, fp32, CPU), {args.docs} documents of {args.corpus.name}, "
                  f"{args.new_tokens} new tokens, batch 1, strict greedy")
        (DATA / "smollm2-135m.traces.json").write_text(json.dumps({"source": source, "arms": saved}, indent=1))
        (DATA / "demo-prompts.json").write_text(json.dumps(demo))
        print(f"saved {DATA / 'smollm2-135m.traces.json'} and {DATA / 'demo-prompts.json'}")


if __name__ == "__main__":
    main()
