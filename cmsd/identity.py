"""What the rest of cmsd needs to know of a model without loading one: its shape and a fingerprint of its weights (a
feature head is trained for one target; cost measurements are kept per model), where cmsd keeps its files
($CMSD_CACHE), and the error for a model that cannot be used."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class ModelError(ValueError):
    """A model that cannot be used: not found, not loadable, or not compatible with the target."""


def target_shape(model) -> str:
    """A model's architecture and size (known from its config alone)."""
    config = model.config
    return f"{config.model_type}/{config.hidden_size}/{config.num_hidden_layers}/{config.vocab_size}"


def fingerprint(model) -> str:
    """What identifies a model's weights without reading them all: its shape and a digest of a sample of its
    embedding (a feature head is trained for one target; cost measurements are kept per model)."""
    embeddings = getattr(model, "get_input_embeddings", None)  # a FeatureHead: its first weight (fc)
    weight = embeddings().weight if embeddings is not None else next(model.parameters())
    sample = weight[:: max(1, weight.shape[0] // 64), :16].detach().float().cpu().numpy().round(4)
    return hashlib.sha256(f"{target_shape(model)}/{sample.tobytes().hex()}".encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("CMSD_CACHE", Path.home() / ".cache" / "cmsd"))
