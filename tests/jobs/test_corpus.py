"""Corpus readers: every format gives the same rows; unreadable corpora and missing fields are BadInput."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.batch.corpus import detect_format, read_corpus
from jobs.errors import BadInput
from jobs.batch.spec import CorpusSpec

ROWS = [{"id": "a", "text": "first doc, with a comma", "summary": "one"},
        {"id": "b", "text": 'second "quoted" doc', "summary": "two"},
        {"id": "c", "text": "third doc", "summary": "three"}]


def _table() -> pa.Table:
    return pa.Table.from_pylist(ROWS)


def write(kind: str, folder: Path) -> Path:
    """The ROWS corpus in one format."""
    if kind == "jsonl":
        path = folder / "c.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "csv":
        import csv

        path = folder / "c.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["id", "text", "summary"])
            writer.writeheader()
            writer.writerows(ROWS)
    elif kind == "tsv":  # no quoting in TSV: quotes are text
        path = folder / "c.tsv"
        path.write_text("id\ttext\tsummary\n" + "".join("\t".join(r.values()) + "\n" for r in ROWS))
    elif kind == "parquet":
        path = folder / "c.parquet"
        pq.write_table(_table(), path)
    elif kind in ("arrow", "arrow-stream"):
        path = folder / f"{kind}.arrow"
        opener = pa.ipc.new_file if kind == "arrow" else pa.ipc.new_stream
        with pa.OSFile(str(path), "wb") as sink, opener(sink, _table().schema) as writer:
            writer.write_table(_table())
    else:  # a datasets directory
        import datasets

        path = folder / "ds"
        datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tsv", "parquet", "arrow", "arrow-stream", "datasets"])
def test_every_format_reads_the_same_rows(kind: str, tmp_path: Path) -> None:
    path = write(kind, tmp_path)
    corpus = read_corpus(CorpusSpec(path=str(path), source_field="text", reference_field="summary"))
    assert corpus.size == 3
    assert corpus.sources == [r["text"] for r in ROWS]
    assert corpus.references == [r["summary"] for r in ROWS]
    assert corpus.ids == ["a", "b", "c"] and corpus.spec.id_field == "id"


def test_aligned_text_files(tmp_path: Path) -> None:
    (tmp_path / "src.txt").write_text("hello world\nsecond line\n")
    (tmp_path / "ref.txt").write_text("hallo welt\nzweite zeile\n")
    corpus = read_corpus(CorpusSpec(path=str(tmp_path / "src.txt"), reference_path=str(tmp_path / "ref.txt")))
    assert corpus.sources == ["hello world", "second line"] and corpus.references == ["hallo welt", "zweite zeile"]
    assert corpus.ids is None
    (tmp_path / "short.txt").write_text("only one\n")
    with pytest.raises(BadInput, match="has 2 lines but"):
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


def test_broken_json_lines_are_rows_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"source": "ok"}\n{"source": \n[1, 2]\n')
    corpus = read_corpus(CorpusSpec(path=str(path)))
    assert corpus.size == 3 and set(corpus.broken) == {1, 2}
    assert "not valid JSON" in corpus.broken[1] and "not a JSON object" in corpus.broken[2]


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
