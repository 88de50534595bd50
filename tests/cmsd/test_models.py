"""Loading models: clear errors for what cannot be used."""

from __future__ import annotations

import time

import pytest

from cmsd import ModelError, load_model, load_pair, smollm2_dir
from cmsd.models import check_same_vocab


def test_unknown_hub_model_fails_at_once_offline() -> None:
    started = time.perf_counter()
    with pytest.raises(ModelError, match="cannot load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")
    assert time.perf_counter() - started < 30


def test_paths_that_are_not_models(tmp_path) -> None:
    with pytest.raises(ModelError, match="without config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_model(str(tmp_path / "model.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="neither a directory nor a .gguf"):
        load_model(str(tmp_path / "weights.bin"))


def test_drafter_with_another_vocabulary_is_refused(tmp_path) -> None:
    from transformers import AutoTokenizer

    from tests.tiny import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    other = AutoTokenizer.from_pretrained(smollm2_dir())
    other.add_tokens(["<not-in-the-target>"])
    check_same_vocab(tokenizer, tokenizer, "same")
    with pytest.raises(ModelError, match="different vocabulary"):
        check_same_vocab(tokenizer, other, "other")
    drafter = tiny_llama(vocab=len(other))
    drafter.save_pretrained(tmp_path)
    other.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="different vocabulary"):
        load_pair("smollm2", str(tmp_path), device="cpu")
