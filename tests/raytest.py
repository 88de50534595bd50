"""Fixtures and helpers for the tests of jobs/ and workers/: a real local Ray, a tiny target model on disk.

tests/jobs/conftest.py and tests/workers/conftest.py import the fixtures from here. Ray is started once per
session (the first fixture that asks starts it, and only that one shuts it down).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ray_local() -> Iterator[str]:
    """A real local Ray instance with 2 CPUs; yields its GCS address (for `ray start --address`)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as a Hugging Face directory, with the real SmolLM2 tokenizer (same vocab)."""
    folder = tmp_path_factory.getbasetemp() / "tiny-target"
    if not (folder / "config.json").is_file():
        build_tiny_target(folder)
    return folder


def build_tiny_target(folder: Path, max_positions: int = 512) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cmsd import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """Records as JSON lines; a str record is written as it is (a broken line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def articles(count: int, words: int = 30, start: int = 0) -> list[dict[str, str]]:
    """Short made-up articles with references; each repeats itself a little so the n-gram drafter has work."""
    out = []
    for i in range(start, start + count):
        body = " ".join(f"word{(i * 7 + j) % 50}" for j in range(words))
        out.append({"id": f"doc-{i:03d}", "source": f"Article {i}. {body}. {body[:60]}",
                    "reference": f"summary of article {i}"})
    return out


def result_ids(job_dir: str | Path) -> list[str]:
    """Every id in every committed result file of a job (duplicates kept)."""
    import pyarrow.parquet as pq

    files = sorted(Path(job_dir, "results").glob("shard-*.parquet"))
    return [doc_id for f in files for doc_id in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


def error_records(job_dir: str | Path) -> list[dict[str, Any]]:
    files = sorted(Path(job_dir, "errors").glob("shard-*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
