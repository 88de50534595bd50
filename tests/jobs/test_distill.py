"""`cmsd-jobs distill` end to end on a tiny target (with the real tokenizer), its bad input, and the eval's
per-method drafter that compares a distilled drafter with the n-gram drafter in one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobs.cli import main
from tests.raytest import articles, write_jsonl


def distill_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--target", "", "--corpus", str(corpus), "--out", str(out), "--holdout", "2", "--docs", "3",
            "--text-docs", "3", "--eval-docs", "2", "--steps", "6", "--new-tokens", "16", "--seq-len", "128",
            "--draft-vocab", "512", "--layers", "1", *extra]


def test_distill_builds_a_drafter_directory(tmp_path: Path, tiny_target: Path) -> None:
    corpus = write_jsonl(tmp_path / "news.jsonl", articles(8))
    out = tmp_path / "drafter"
    args = distill_args(corpus, out)
    args[2] = str(tiny_target)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "distill.json").read_text())
    assert meta["steps"] == 6 and meta["train_sequences"] == 6  # 3 decoded by the target + 3 as text
    held = meta["heldout"]
    assert held["positions"] > 0 and 1.0 <= held["tokens_per_call"] <= 5.0 and 0 <= held["agreement"] <= 1
    assert held["kl"] < meta["heldout_before"]["kl"]
    assert meta["heldout_per_corpus"][str(corpus)]["positions"] == held["positions"]  # one corpus: all of it
    assert len(json.loads((out / "draft_vocab.json").read_text())["ids"]) == 512
    card = (out / "README.md").read_text()
    assert "held-out top-1 agreement" in card and str(corpus) in card
    assert {p.name for p in (out / "work").iterdir()} >= {"heldout.pt", "generated.pt", "text.pt", "checkpoint.pt"}
    rerun = CliRunner().invoke(main, args[:-2] + ["--layers", "1", "--steps", "8"])  # resumes from OUT/work
    assert rerun.exit_code == 0, rerun.output
    assert "reusing" in rerun.output and json.loads((out / "distill.json").read_text())["steps"] == 8


def test_distill_kind_head_builds_a_head_directory(tmp_path: Path, tiny_target: Path) -> None:
    corpus = write_jsonl(tmp_path / "news.jsonl", articles(8))
    out = tmp_path / "head"
    args = distill_args(corpus, out, "--kind", "head")
    args[2] = str(tiny_target)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "distill.json").read_text())
    assert meta["kind"] == "head" and meta["steps"] == 6 and "--kind head" in meta["command"]
    held = meta["heldout"]
    assert held["positions"] > 0 and 0 <= held["acceptance"] <= 1 and held["tokens_per_call"] >= 1.0
    assert held["kl"] < meta["heldout_before"]["kl"]
    assert set(meta["stage_minutes"]) == {"heldout", "generated", "text"}
    assert {p.name for p in out.iterdir()} >= {"head.json", "head.safetensors", "README.md", "work"}
    card = (out / "README.md").read_text()
    assert "first-token acceptance" in card and "news.jsonl" in card and meta["command"] in card
    from cmsd import load_pair

    pair = load_pair(str(tiny_target), str(out))  # a head directory is a --drafter
    assert type(pair.drafter).__name__ == "FeatureHead"


@pytest.mark.parametrize("change, message", [
    (["--layers", "2"], "--layers must be between 1 and 1"),
    (["--new-tokens", "120"], "--new-tokens 120 leaves no room"),
    (["--corpus", "/nonexistent/x.jsonl"], "/nonexistent/x.jsonl"),
    (["--steps", "0"], "steps must be >= 1"),
])
def test_distill_bad_input_exits_2(tmp_path: Path, tiny_target: Path, change: list[str], message: str) -> None:
    corpus = write_jsonl(tmp_path / "news.jsonl", articles(8))
    args = distill_args(corpus, tmp_path / "drafter")
    args[2] = str(tiny_target)
    if change[0] == "--corpus":
        args[4] = change[1]
    else:
        args += change
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
