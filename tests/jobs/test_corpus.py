"""Corpus readers: every format gives the same rows, streamed in bounded batches; unreadable corpora and missing
fields are BadInput."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.batch.corpus import detect_format, open_corpus, read_corpus
from jobs.errors import BadInput
from jobs.batch.spec import CorpusSpec

ROWS = [{"id": "a", "text": "first doc, with a comma", "summary": "one"},
        {"id": "b", "text": 'second "quoted" doc', "summary": "two"},
        {"id": "c", "text": "third doc", "summary": "three"}]


def write(kind: str, folder: Path, rows: list[dict[str, str]] = ROWS) -> Path:
    """A corpus (ROWS by default) in one format."""
    table = pa.Table.from_pylist(rows)
    if kind == "jsonl":
        path = folder / "c.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        import csv

        path = folder / "c.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["id", "text", "summary"])
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "tsv":  # no quoting in TSV: quotes are text
        path = folder / "c.tsv"
        path.write_text("id\ttext\tsummary\n" + "".join("\t".join(r.values()) + "\n" for r in rows))
    elif kind == "parquet":
        path = folder / "c.parquet"
        pq.write_table(table, path)
    elif kind in ("arrow", "arrow-stream"):
        path = folder / f"{kind}.arrow"
        opener = pa.ipc.new_file if kind == "arrow" else pa.ipc.new_stream
        with pa.OSFile(str(path), "wb") as sink, opener(sink, table.schema) as writer:
            writer.write_table(table)
    else:  # a datasets directory
        import datasets

        path = folder / "ds"
        datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tsv", "parquet", "arrow", "arrow-stream", "datasets"])
def test_every_format_reads_the_same_rows(kind: str, tmp_path: Path) -> None:
    path = write(kind, tmp_path)
    corpus = read_corpus(CorpusSpec(path=str(path), source_field="text", reference_field="summary"))
    assert corpus.size == 3
    assert corpus.sources == [r["text"] for r in ROWS]
    assert corpus.references == [r["summary"] for r in ROWS]
    assert corpus.ids == ["a", "b", "c"] and corpus.spec.id_field == "id"


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tsv", "parquet", "arrow", "arrow-stream", "datasets"])
def test_every_format_streams_batches_no_larger_than_asked(kind: str, tmp_path: Path) -> None:
    """What a reader holds at a time is one batch of at most batch_rows rows, whatever the corpus's size."""
    path = write(kind, tmp_path, [{"id": f"r{i}", "text": f"text {i}", "summary": f"s{i}"} for i in range(11)])
    stream = open_corpus(CorpusSpec(path=str(path), source_field="text", reference_field="summary"), batch_rows=3)
    batches = list(stream.batches)
    assert [b.size for b in batches] == [3, 3, 3, 2] and [b.start for b in batches] == [0, 3, 6, 9]
    assert [i for b in batches for i in b.ids] == [f"r{i}" for i in range(11)]
    assert stream.fields == ("id", "text", "summary") and stream.spec.id_field == "id"


def test_a_bad_json_line_in_the_middle_is_one_bad_row_with_its_line_number(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("jobs.batch.corpus.BLOCK_BYTES", 7)  # lines cut across many blocks
    lines = [json.dumps({"id": f"d{i}", "source": f"text {i}"}) for i in range(9)]
    lines[5] = '{"id": "d5", "source": "cut'
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\r\n")  # a blank line, a CRLF at the end
    stream = open_corpus(CorpusSpec(path=str(path)), batch_rows=4)
    batches = list(stream.batches)
    assert [b.size for b in batches] == [4, 4, 1] and batches[2].sources == ["text 8"]
    assert {row: why[:28] for b in batches for row, why in b.broken.items()} == {5: "line 7 is not valid JSON: Un"}


def test_aligned_text_files(tmp_path: Path) -> None:
    (tmp_path / "src.txt").write_text("hello world\nsecond line\n")
    (tmp_path / "ref.txt").write_text("hallo welt\nzweite zeile\n")
    corpus = read_corpus(CorpusSpec(path=str(tmp_path / "src.txt"), reference_path=str(tmp_path / "ref.txt")))
    assert corpus.sources == ["hello world", "second line"] and corpus.references == ["hallo welt", "zweite zeile"]
    assert corpus.ids is None
    (tmp_path / "short.txt").write_text("only one\n")
    with pytest.raises(BadInput, match="src.txt has a line 2 but .*short.txt has 1 lines"):
        read_corpus(CorpusSpec(path=str(tmp_path / "src.txt"), reference_path=str(tmp_path / "short.txt")))


def test_a_corpus_without_references_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"source": "x"}\n{"source": "y"}\n')
    corpus = read_corpus(CorpusSpec(path=str(path)))
    assert corpus.references is None and corpus.spec.reference_field is None and corpus.ids is None


def test_limit_keeps_the_first_rows(tmp_path: Path) -> None:
    for kind in ("jsonl", "parquet"):
        corpus = read_corpus(CorpusSpec(path=str(write(kind, tmp_path)), source_field="text", limit=2))
        assert corpus.ids == ["a", "b"]
        batches = list(open_corpus(CorpusSpec(path=str(write(kind, tmp_path)), source_field="text", limit=2),
                                   batch_rows=1).batches)
        assert [b.ids for b in batches] == [["a"], ["b"]], "the stream stops at the limit"


def test_broken_json_lines_are_rows_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"source": "ok"}\n{"source": \n[1, 2]\n')
    corpus = read_corpus(CorpusSpec(path=str(path)))
    assert corpus.size == 3 and set(corpus.broken) == {1, 2}
    assert corpus.broken[1].startswith("line 2 is not valid JSON") and corpus.broken[2] == "line 3 is not a JSON object"


@pytest.mark.parametrize("spec, words", [
    (dict(source_field="body"), "no field 'body'"),
    (dict(source_field="text", reference_field="gold"), "no field 'gold'"),
    (dict(source_field="text", id_field="key"), "no field 'key'"),
])
def test_a_missing_field_names_the_file_and_the_field(spec: dict, words: str, tmp_path: Path) -> None:
    path = write("jsonl", tmp_path)
    with pytest.raises(BadInput, match=words) as err:
        read_corpus(CorpusSpec(path=str(path), **spec))
    assert str(path) in str(err.value) and "fields: id, text, summary" in str(err.value)


def test_unreadable_corpora(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="cannot read corpus file"):
        read_corpus(CorpusSpec(path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(BadInput, match="Parquet"):
        read_corpus(CorpusSpec(path=str(tmp_path / "junk.parquet")))
    (tmp_path / "junk.jsonl").write_text("not json\nnor this\n")
    with pytest.raises(BadInput, match="no line is a JSON object"):
        read_corpus(CorpusSpec(path=str(tmp_path / "junk.jsonl")))
    (tmp_path / "x.docx").write_text("?")
    with pytest.raises(BadInput, match="cannot tell its format"):
        read_corpus(CorpusSpec(path=str(tmp_path / "x.docx")))


def test_a_hub_name_offline_fails_at_once_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert detect_format(CorpusSpec(path="EdinburghNLP/xsum")) == "hub"
    with pytest.raises(BadInput, match="cannot load hub dataset 'EdinburghNLP/xsum'.*HF_DATASETS_OFFLINE"):
        read_corpus(CorpusSpec(path="EdinburghNLP/xsum"))
