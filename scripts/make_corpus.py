"""Write an N-row JSON Lines corpus for corpus-scale measurements: real documents repeated with fresh ids.

    python scripts/make_corpus.py /tmp/corpus-1m.jsonl --rows 1000000          # XSum: about 2.4 KB a row
    python scripts/make_corpus.py /tmp/c.jsonl --rows 200000 --sets xsum,cnn_dailymail

The documents (source, reference) come from ../shared/data (or --data), cycled in file order; row i gets the id
doc-<i>. Five rows, spread over the corpus, are deliberately bad, one of each kind the driver refuses while
streaming: a line that is not JSON, a line that is not an object, an empty source, a source that is not text,
an id seen before. A job over the corpus therefore has N - 5 good rows (more may be refused by the workers as
too long for the model).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def documents(data: Path, sets: list[str]) -> list[tuple[str, str]]:
    """(source, reference) of every document of the sets, each already JSON-encoded."""
    out = []
    for name in sets:
        for line in (data / f"{name}.test.jsonl").read_text().splitlines():
            record = json.loads(line)
            out.append((json.dumps(record["source"], ensure_ascii=False),
                        json.dumps(record["reference"], ensure_ascii=False)))
    return out


def bad_rows(rows: int) -> dict[int, str]:
    """Row -> the line written there instead of a good row: one of each kind, spread over the corpus."""
    lines = ['{"id": "broken", "source": "a line cut short', '["not", "an", "object"]',
             '{"id": "empty", "source": "  "}', '{"id": "number", "source": 12345}',
             '{"id": "doc-0000000", "source": "the first row\'s id again"}']
    return {(k + 1) * rows // (len(lines) + 1): line for k, line in enumerate(lines) if rows > len(lines) + 1}


def write_corpus(path: Path, rows: int, docs: list[tuple[str, str]]) -> None:
    bad = bad_rows(rows)
    with path.open("w", encoding="utf-8") as sink:
        for i, (source, reference) in zip(range(rows), itertools.cycle(docs)):
            sink.write(bad[i] + "\n" if i in bad else
                       f'{{"id": "doc-{i:07d}", "source": {source}, "reference": {reference}}}\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--sets", default="xsum", help="comma-separated file stems in --data (default: xsum)")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    write_corpus(args.out, args.rows, documents(args.data, args.sets.split(",")))
    print(f"{args.out}: {args.rows} rows, {args.out.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
