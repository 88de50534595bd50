"""Dummy weights (load_format "dummy"): a real shape with seeded random weights, built on its device in its dtype
from a config alone; its tokenizer the model's own where one is at hand, else SmolLM2's.

The shapes' numbers are checked on the meta device (no memory); weights are built for tiny configs and, once, for
the smollm2-135m shape, which also decodes end to end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from cmsd import DecodeSettings, Decoder, ModelError, ModelPair, PromptTemplate, load_model, load_pair
from cmsd.drafters.head import FeatureHead
from cmsd.models import SHAPES, dummy_config, dummy_tokenizer, load_drafter, random_weights

# (hidden, layers, heads, kv heads, intermediate, vocab, tied, parameters in billions)
SHAPE_NUMBERS = {"smollm2-135m": (576, 30, 9, 3, 1536, 49152, True, 0.135),
                 "smollm2-1.7b": (2048, 24, 32, 32, 8192, 49152, True, 1.71),
                 "llama-3.1-8b": (4096, 32, 32, 8, 14336, 128256, False, 8.03)}


def tiny_config(folder: Path, vocab: int = 49152, layers: int = 2) -> Path:
    """A tiny Llama config.json alone in `folder` (no tokenizer, no weights); SmolLM2's tokenizer fits its vocab."""
    config = json.loads(SHAPES["smollm2-135m"].read_text())
    config.update(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=vocab, max_position_embeddings=512)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", sorted(SHAPE_NUMBERS))
def test_shipped_shapes_have_the_real_models_numbers(name: str) -> None:
    hidden, layers, heads, kv, inter, vocab, tied, billions = SHAPE_NUMBERS[name]
    config = dummy_config(name)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size, config.tie_word_embeddings) == (
        hidden, layers, heads, kv, inter, vocab, tied)
    assert "quantization_config" not in config.to_dict()  # the GGUF conversion's entry is not shipped
    model = random_weights(config, torch.device("meta"), torch.bfloat16, seed=0)  # the shape, without memory
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.02)
    assert SHAPES[name].is_file() and set(SHAPES) == set(SHAPE_NUMBERS)


def test_llama_shape_has_llama3_rope_and_ids_past_the_tokenizer_decode() -> None:
    """llama-3.1-8b has no tokenizer here: SmolLM2's (49152 ids) stands in, and ids it lacks decode to nothing."""
    config = dummy_config("llama-3.1-8b")
    rope = config.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0 and rope["rope_theta"] == 500000.0
    assert (config.bos_token_id, config.eos_token_id, config.max_position_embeddings) == (128000, 128009, 131072)
    tokenizer = dummy_tokenizer("llama-3.1-8b", config)
    assert len(tokenizer) == 49152 < config.vocab_size
    hello = tokenizer.encode("hello", add_special_tokens=False)
    assert tokenizer.decode(hello + [128000, 100000, 49152], skip_special_tokens=True) == "hello"


def test_smollm2_shape_builds_decodes_and_drafts_with_a_head_of_its_shape() -> None:
    """The one end-to-end run: the 135M shape on the CPU in float32, strict CM-ASD equal to AR token for token, and
    text out; the shipped head's shape (its trained weights belong to the real model) drafts for it."""
    pair = load_pair("smollm2-135m", "ngram", device="cpu", dtype="float32", load_format="dummy")
    model = pair.target.model
    assert pair.target.dummy and pair.target.path is None and pair.target.home.name == "dummy-smollm2-135m"
    assert {p.device.type for p in model.parameters()} == {"cpu"} and model.dtype == torch.float32
    assert model.config.hidden_size == 576 and len(model.model.layers) == 30
    weight = model.model.layers[0].mlp.up_proj.weight.detach()
    assert 0.015 < float(weight.std()) < 0.025  # transformers' own initialisation, not zeros
    prompt = PromptTemplate("summarization").render(pair.tokenizer, "The cat sat on the mat. The cat sat down.")
    settings = DecodeSettings(method="cmasd", verify="strict", max_new_tokens=8)
    spec = Decoder(pair, settings).generate([prompt])[0]
    ar = Decoder(pair, settings.with_(method="ar")).generate([prompt])[0]
    assert spec.token_ids == ar.token_ids and 1 <= len(spec.token_ids) <= 8  # a random model rarely ends early
    assert isinstance(spec.text, str) and spec.stats.new_tokens == len(spec.token_ids)
    head = load_drafter(pair.target, "head")
    assert isinstance(head, FeatureHead) and len(head.body.layers) == 1
    with_head = Decoder(ModelPair(pair.target, head), settings).generate([prompt])[0]
    assert with_head.token_ids == ar.token_ids


def test_bfloat16_is_built_in_bfloat16(tmp_path: Path) -> None:
    loaded = load_model(str(tiny_config(tmp_path)), "cpu", "bfloat16", load_format="dummy")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_weights_are_seeded_by_name_and_role(tmp_path: Path) -> None:
    config = str(tiny_config(tmp_path / "shape"))
    state = torch.get_rng_state()
    first, again = (load_model(config, "cpu", "float32", load_format="dummy") for _ in range(2))
    assert same_weights(first.model, again.model), "the same name gives the same weights"
    assert torch.equal(torch.get_rng_state(), state), "the caller's random state is left alone"
    other = load_model(config, "cpu", "float32", load_format="dummy", seed=1)
    assert not same_weights(first.model, other.model)
    pair = load_pair(config, config, device="cpu", dtype="float32", load_format="dummy")
    assert pair.drafter.dummy and same_weights(pair.target.model, first.model)
    assert not same_weights(pair.target.model, pair.drafter.model), "a drafter is not its target"


def test_a_model_directory_gives_its_config_and_tokenizer_not_its_weights(tiny_target: Path,
                                                                          tmp_path: Path) -> None:
    real = load_model(str(tiny_target), "cpu", "float32")
    dummy = load_model(str(tiny_target), "cpu", "float32", load_format="dummy")
    shape = ("hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings")
    assert [getattr(dummy.model.config, k) for k in shape] == [getattr(real.model.config, k) for k in shape]
    assert not same_weights(real.model, dummy.model), "random weights, not the directory's"
    assert Path(dummy.tokenizer.name_or_path) == tiny_target  # its own tokenizer
    alone = load_model(str(tiny_config(tmp_path / "config-only")), "cpu", "float32", load_format="dummy")
    assert Path(alone.tokenizer.name_or_path).name == "SmolLM2-135M-Instruct"  # none beside it: SmolLM2's


def test_a_hub_name_with_a_cached_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, a hub name whose config is in the local cache builds (its tokenizer not cached: SmolLM2's)."""
    from huggingface_hub import constants

    commit = "0" * 40
    snapshot = tmp_path / "models--some-org--some-model" / "snapshots" / commit
    tiny_config(snapshot)
    (tmp_path / "models--some-org--some-model" / "refs").mkdir()
    (tmp_path / "models--some-org--some-model" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    loaded = load_model("some-org/some-model", "cpu", "float32", load_format="dummy")
    assert loaded.dummy and loaded.model.config.hidden_size == 32 and len(loaded.tokenizer) == 49152


def test_what_cannot_be_built_is_a_clear_model_error(tmp_path: Path) -> None:
    started = time.perf_counter()
    with pytest.raises(ModelError, match="cannot load the config of 'no-such-org/no-such-model' for dummy weights.*"
                                         "smollm2-135m"):
        load_model("no-such-org/no-such-model", "cpu", load_format="dummy")
    assert time.perf_counter() - started < 30  # offline: at once, no waiting on a hub
    with pytest.raises(ModelError, match="config file not found"):
        load_model(str(tmp_path / "missing" / "config.json"), "cpu", load_format="dummy")
    with pytest.raises(ModelError, match="unknown load_format 'random'"):
        load_model("smollm2-135m", "cpu", load_format="random")
    with pytest.raises(ModelError, match="more than its vocab_size 64"):  # SmolLM2's ids would index past it
        load_model(str(tiny_config(tmp_path / "small", vocab=64)), "cpu", load_format="dummy")
    wider = tiny_config(tmp_path / "wider", vocab=50000)
    with pytest.raises(ModelError, match="a vocabulary of 50000 ids, the target 49152"):
        load_pair(str(tiny_config(tmp_path / "target")), str(wider), device="cpu", load_format="dummy")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_weights_are_made_there() -> None:
    """smollm2-1.7b in bfloat16 straight on the GPU: nothing of its 3.4 GB passes through the CPU's memory."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loaded = load_model("smollm2-1.7b", "cuda", "bfloat16", load_format="dummy")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert {p.device.type for p in loaded.model.parameters()} == {"cuda"}
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert grown_mb < 1000, f"the CPU's peak memory grew by {grown_mb:.0f} MB"
