"""Row checks (bad rows become error records), and shards written as the corpus streams by: deterministic,
contiguous, sorted by length, each written as soon as it is complete."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from jobs.batch.corpus import Rows, read_corpus
from jobs.batch.prepare import create_job, prepare
from jobs.batch.rows import BadRow, GoodRow, RowChecker, SeenIds, check_rows
from jobs.batch.shards import ShardWriter, equal_sizes, shard_count, shard_sizes
from jobs.batch.spec import CorpusSpec, ExecutionSpec, JobSpec
from jobs.errors import BadInput
from tests.raytest import articles, write_jsonl
from workers.store import JobStore, checksum, read_ipc


def words(prompts: list[str]) -> list[int]:
    return [len(p.split()) for p in prompts]


def render(source: str, src_lang: str | None, tgt_lang: str | None) -> str:
    return f"[{src_lang}>{tgt_lang}] {source}"


def test_bad_rows_get_a_reason_and_good_rows_a_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"id": "a", "source": "fine text", "reference": "r", "src_lang": "en", "tgt_lang": "de"},
        {"id": "b", "source": "   "},
        {"id": "c", "source": 42},
        {"id": "d"},
        '{"id": "e", "source": ',
        {"id": "a", "source": "same id again"},
        {"id": "f", "source": "far " * 30},
        {"id": 7, "source": "an integer id is fine", "reference": ""},
        {"id": ["x"], "source": "a list id is not"},
        {"id": "g", "source": "text", "reference": 3},
    ])
    good, bad = check_rows(read_corpus(CorpusSpec(path=str(path))), render, words, token_budget=20)
    assert [(g.row, g.id, g.reference) for g in good] == [(0, "a", "r"), (7, "7", None)]
    assert good[0].prompt == "[en>de] fine text" and good[0].prompt_tokens == 3
    reasons = {b.row: b.reason for b in bad}
    assert reasons[1] == "empty 'source'" and reasons[3] == "missing 'source'"
    assert reasons[2].startswith("'source' is not text: int")
    assert reasons[4] == "line 5 is not valid JSON: Expecting value"
    assert "duplicate id 'a' (first at row 0)" == reasons[5]
    assert reasons[6].startswith("too long for the model: prompt of 31 tokens > 20")
    assert "id is not text" in reasons[8] and "'reference' is not text" in reasons[9]


def batch(start: int, ids: list[str]) -> Rows:
    return Rows(start=start, sources=[f"text {i}" for i in ids], references=None, ids=list(ids), langs={}, broken={})


def test_duplicate_ids_are_found_within_and_across_batches() -> None:
    checker = RowChecker(CorpusSpec(path="x.jsonl", id_field="id"))
    first = checker.check(batch(0, ["a", "b", "a", "c"]))
    second = checker.check(batch(4, ["c", "d", "b", "d"]))
    reasons = {r.row: r.reason for r in first + second if isinstance(r, BadRow)}
    assert reasons == {2: "duplicate id 'a' (first at row 0)", 4: "duplicate id 'c' (first at row 3)",
                       6: "duplicate id 'b' (first at row 1)", 7: "duplicate id 'd' (first at row 5)"}


def test_seen_ids_take_16_bytes_an_id() -> None:
    seen = SeenIds()
    for start in range(0, 10_000, 1000):
        assert seen.first_rows([f"doc-{i}" for i in range(start, start + 1000)], list(range(start, start + 1000))) \
            == [None] * 1000
    assert seen.first_rows(["doc-1234", "new"], [10_000, 10_001]) == [1234, None]
    assert seen._digests.nbytes + seen._rows.nbytes == 16 * 10_001


def good_rows(n: int, start: int = 0) -> list[GoodRow]:
    return [GoodRow(row=i, id=f"d{i}", source="x" * ((7 * i) % 11 + 1), reference=None, src_lang=None,
                    tgt_lang=None) for i in range(start, start + n)]


def write(store: JobStore, rows: Iterable[GoodRow | BadRow], sizes: Iterator[int]) -> ShardWriter:
    writer = ShardWriter(store, sizes)
    writer.add_all(rows)
    writer.finish()
    return writer


def shard_rows(store: JobStore, index: int) -> list[int]:
    return read_ipc(store.read_bytes(f"shards/shard-{index:05d}.arrow")).column("row").to_pylist()


def test_shards_are_contiguous_and_sorted_by_length(tmp_path: Path) -> None:
    store = JobStore(str(tmp_path))
    writer = write(store, list(good_rows(10)), itertools.repeat(4))
    assert [e["rows"] for e in writer.entries] == [4, 4, 2]
    assert [(e["start"], e["stop"]) for e in writer.entries] == [(0, 4), (4, 8), (8, 10)]
    for entry in writer.entries:
        table = read_ipc(store.read_bytes(entry["path"]))
        keys = [(len(s), r) for s, r in zip(table.column("source").to_pylist(), table.column("row").to_pylist())]
        assert keys == sorted(keys), "sorted by the characters of the source, then row"
        assert sorted(r for _, r in keys) == list(range(entry["start"], entry["stop"]))


def test_bad_rows_go_to_the_shard_that_covers_them(tmp_path: Path) -> None:
    bad = {0: BadRow(0, "d0", "x"), 5: BadRow(5, "d5", "y"), 6: BadRow(6, "d6", "y"), 11: BadRow(11, "d11", "z")}
    rows = [bad.get(r.row, r) for r in good_rows(12)]
    store = JobStore(str(tmp_path))
    writer = write(store, rows, iter(equal_sizes(8, 3)))
    assert [e["rows"] for e in writer.entries] == [2, 3, 3] and (writer.good, writer.bad) == (8, 4)
    # a shard's range runs from its first good row (0 for the first) to the next shard's first good row
    assert [(e["start"], e["stop"], e["errors"]) for e in writer.entries] == [(0, 3, 1), (3, 8, 2), (8, 12, 1)]
    assert [r["row"] for r in store.read_jsonl("errors/shard-00001.jsonl")] == [5, 6]
    assert sorted(shard_rows(store, 1)) == [3, 4, 7]


def test_a_shard_is_written_as_soon_as_it_is_complete(tmp_path: Path) -> None:
    """The writer holds one shard at a time: shard 0 is on disk before the corpus has been read further."""
    store = JobStore(str(tmp_path))

    def stream() -> Iterator[GoodRow]:
        for row in good_rows(100):
            if row.row == 11:  # shard 0 (rows 0-9) is complete once row 10 arrives
                assert store.exists("shards/shard-00000.arrow") and not store.exists("shards/shard-00001.arrow")
            yield row

    writer = write(store, stream(), itertools.repeat(10))
    assert len(writer.entries) == 10 and not writer._rows


def test_shard_sizes() -> None:
    counted: list[int] = []

    def sizes(n: int, **execution: int) -> list[int]:
        got, _ = shard_sizes(ExecutionSpec(**execution), iter(good_rows(n)), lambda: counted.append(n) or n)
        return list(itertools.islice(got, 5))

    assert sizes(1000, actors=2) == [64] * 5  # shard_rows rows each (the writer stops at the corpus's end)
    assert sizes(10, actors=2) == [2, 3, 2, 3]  # fewer than two shards per actor: nearly equal, two per actor
    assert sizes(3, actors=4) == [1, 1, 1] and not counted  # never more shards than rows; no counting pass
    assert sizes(100, shards=5) == [20] * 5  # execution.shards: the counted rows, cut into nearly equal shards
    assert sizes(100, actors=2, shard_rows=10_000) == [25] * 4  # too many rows to hold back: counted too
    assert counted == [100, 100]
    assert shard_count(1000, ExecutionSpec(actors=2)) == 16 and shard_count(100, ExecutionSpec(shards=5)) == 5


def test_a_large_shard_is_written_in_sorted_windows(tmp_path: Path) -> None:
    """The writer holds one window of rows, not the shard: a 10-row shard in windows of 3."""
    store = JobStore(str(tmp_path))
    writer = ShardWriter(store, iter([10]), window=3)
    for row in good_rows(10):
        writer.add(row)
        assert len(writer._pending) <= 3
    writer.finish()
    reader = pa.ipc.open_file(pa.py_buffer(store.read_bytes("shards/shard-00000.arrow")))
    windows = [reader.get_batch(i).to_pylist() for i in range(reader.num_record_batches)]
    assert [[r["row"] for r in w] for w in windows] == [[0, 2, 1], [5, 4, 3], [8, 7, 6], [9]]
    assert all([len(r["source"]) for r in w] == sorted(len(r["source"]) for r in w) for w in windows)
    assert writer.entries[0]["checksum"] == checksum(store.read_bytes("shards/shard-00000.arrow"))


def job(corpus: Path, target: Path, out: Path, **execution: object) -> JobSpec:
    return JobSpec.from_dict({"corpus": {"path": str(corpus)}, "models": {"target": str(target), "drafter": "ngram"},
                              "execution": {"actors": 1, "shard_rows": 4, **execution},
                              "output": {"dir": str(out), "job_id": "j"}})


@pytest.mark.parametrize("execution", [{}, {"shards": 3}])
def test_the_same_corpus_and_spec_give_the_same_shards_byte_for_byte(execution: dict, tmp_path: Path,
                                                                     tiny_target: Path) -> None:
    rows = articles(30)
    rows[7] = {"id": "bad", "source": ""}
    corpus = write_jsonl(tmp_path / "docs.jsonl", rows)
    folders = []
    for name in ("a", "b"):
        store, _, manifest = create_job(prepare(job(corpus, tiny_target, tmp_path / name, **execution)))
        folders.append(Path(store.uri))
        assert sum(e.rows for e in manifest.shards) == 29 and manifest.corpus["bad"] == 1
    files = sorted(p.relative_to(folders[0]) for p in folders[0].glob("*/*"))  # shards/ and errors/
    assert len([f for f in files if f.parts[0] == "shards"]) == (3 if execution else 8)
    assert [str(f) for f in files if f.parts[0] == "errors"] == ["errors/shard-00000.jsonl" if execution else
                                                                 "errors/shard-00001.jsonl"]
    for rel in files:
        assert (folders[0] / rel).read_bytes() == (folders[1] / rel).read_bytes(), rel


def test_a_bad_input_found_part_way_leaves_no_job_directory(tmp_path: Path, tiny_target: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Aligned text files of different lengths, found after the first shards were written: the directory goes."""
    (tmp_path / "src.txt").write_text("".join(f"source line {i}\n" for i in range(30)))
    (tmp_path / "ref.txt").write_text("".join(f"reference line {i}\n" for i in range(29)))
    monkeypatch.setattr("jobs.batch.corpus.BATCH_ROWS", 4)
    spec = job(tmp_path / "src.txt", tiny_target, tmp_path / "runs")
    spec = spec.with_("corpus", reference_path=str(tmp_path / "ref.txt"))
    prepared = prepare(spec)  # the first batch reads fine
    written: list[str] = []
    open_output = JobStore.open_output
    monkeypatch.setattr(JobStore, "open_output", lambda store, rel: written.append(rel) or open_output(store, rel))
    with pytest.raises(BadInput, match="src.txt has a line 30 but .*ref.txt has 29 lines"):
        create_job(prepared)
    assert "shards/shard-00000.arrow" in written and not (tmp_path / "runs" / "j").exists()
