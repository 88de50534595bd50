"""Write a summarization shard whose greedy AR outputs end (EOS) anywhere from about 10 to 128 new tokens: the
corpus of jobs/suites/continuous.yaml, on which continuous batching is measured against draining batches.

    python scripts/mixed_lengths.py [OUT.jsonl] [DOCS]    # default jobs/suites/mixed_lengths.jsonl, 48 documents

Candidates are test rows of ../shared/data (their README gives origins and licences): Multi30k captions and WMT21
sentences (their English sources, without a reference), DialogSum dialogues, XSum and CNN/DailyMail articles. Each
is decoded once with AR (SmolLM2-135M-Instruct, 128 new tokens, batch 8, about 10 minutes on 2 cores), and DOCS
of them are picked nearest to evenly spaced output lengths. Each written row carries its AR length
(`ar_new_tokens`) so a reader can see the spread.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# (file, rows from its end): image captions and news sentences summarize in a few tokens, dialogues in a few
# dozen, news articles run to the budget
POOL = (("multi30k_en_de.test2016.jsonl", 40), ("wmt21_en_de.test.jsonl", 40), ("dialogsum.test.jsonl", 48),
        ("xsum.test.jsonl", 16), ("cnn_dailymail.test.jsonl", 12))


def main(out: Path, docs: int) -> None:
    from cmsd import DecodeSettings, Decoder, PromptTemplate, load_pair

    rows = [json.loads(line) for name, n in POOL for line in (DATA / name).read_text().splitlines()[-n:]]
    for row in rows:  # a translation row's reference is in another language: no reference for a summary
        if row.get("task") != "summarization":
            row.update(task="summarization", reference=None)
    pair = load_pair("smollm2", None)
    template = PromptTemplate("summarization")
    decoder = Decoder(pair, DecodeSettings(method="ar", max_new_tokens=128, batch_size=8))
    gens = decoder.generate_ids(decoder.encode([template.render(pair.tokenizer, r["source"]) for r in rows]))
    pool = sorted(zip(gens, rows), key=lambda pair: len(pair[0].token_ids))
    shortest = len(pool[0][0].token_ids)
    picked = []
    for i in range(docs):  # the nearest unpicked document to each of DOCS evenly spaced lengths
        want = shortest + i * (128 - shortest) / (docs - 1)
        best = min(pool, key=lambda pair: abs(len(pair[0].token_ids) - want))
        pool.remove(best)
        picked.append(best)
    with out.open("w") as f:
        for gen, row in picked:
            f.write(json.dumps({**row, "ar_new_tokens": len(gen.token_ids)}) + "\n")
    lengths = [len(g.token_ids) for g, _ in picked]
    print(f"{out}: {docs} documents, AR outputs of {min(lengths)} to {max(lengths)} tokens "
          f"({sum(g.finish_reason == 'eos' for g, _ in picked)} end with EOS)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "jobs" / "suites" /
         "mixed_lengths.jsonl", int(sys.argv[2]) if len(sys.argv) > 2 else 48)
