"""Row checks (bad rows become error records) and deterministic sharding sorted by length."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from jobs.batch.corpus import read_corpus
from jobs.batch.rows import GoodRow, check_rows
from jobs.batch.shards import plan_shards, shard_count, shard_table, write_shards
from jobs.batch.spec import CorpusSpec, ExecutionSpec
from tests.raytest import write_jsonl
from workers.store import JobStore, read_ipc


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
    assert "not valid JSON" in reasons[4] and "duplicate id 'a' (first at row 0)" == reasons[5]
    assert reasons[6].startswith("too long for the model: prompt of 31 tokens > 20")
    assert "id is not text" in reasons[8] and "'reference' is not text" in reasons[9]


def good_rows(n: int) -> list[GoodRow]:
    return [GoodRow(row=i, id=f"d{i}", source="x" * (i % 5), reference=None, prompt="p", prompt_tokens=(7 * i) % 11)
            for i in range(n)]


def test_shards_are_contiguous_balanced_and_sorted_by_length() -> None:
    rows = good_rows(10)
    plans = plan_shards(rows, [], 3)
    assert [len(p.rows) for p in plans] == [3, 3, 4]
    assert sorted(r.row for p in plans for r in p.rows) == list(range(10))
    for plan in plans:
        assert [(r.prompt_tokens, r.row) for r in plan.rows] == sorted((r.prompt_tokens, r.row) for r in plan.rows)
        assert max(r.row for r in plan.rows) - min(r.row for r in plan.rows) == len(plan.rows) - 1


def test_bad_rows_go_to_the_shard_that_covers_them() -> None:
    from jobs.batch.rows import BadRow

    good = [r for r in good_rows(12) if r.row not in (0, 5, 11)]
    bad = [BadRow(0, "d0", "x"), BadRow(5, "d5", "y"), BadRow(11, "d11", "z")]
    plans = plan_shards(good, bad, 3)
    assert [[b.row for b in p.errors] for p in plans] == [[0], [5], [11]]


def test_the_same_rows_give_the_same_shard_bytes(tmp_path: Path) -> None:
    first = write_shards(JobStore(str(tmp_path / "a")), plan_shards(good_rows(9), [], 2))
    second = write_shards(JobStore(str(tmp_path / "b")), plan_shards(good_rows(9), [], 2))
    assert [e["checksum"] for e in first] == [e["checksum"] for e in second]
    assert (tmp_path / "a" / "shards" / "shard-00001.arrow").read_bytes() == \
        (tmp_path / "b" / "shards" / "shard-00001.arrow").read_bytes()
    table = read_ipc((tmp_path / "a" / "shards" / "shard-00000.arrow").read_bytes())
    assert table.equals(shard_table(plan_shards(good_rows(9), [], 2)[0]))
    assert table.schema.field("prompt_tokens").type == pa.int32()


def test_shard_count() -> None:
    assert shard_count(1000, ExecutionSpec(actors=2)) == 16  # one per 64 rows
    assert shard_count(10, ExecutionSpec(actors=2)) == 4  # at least two per actor
    assert shard_count(3, ExecutionSpec(actors=4)) == 3  # never more than the rows
    assert shard_count(100, ExecutionSpec(shards=5)) == 5
