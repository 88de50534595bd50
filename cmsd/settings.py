"""Settings: one frozen dataclass per component, validated when built.

`DecodeSettings` composes them; each component receives only its own part.
Every constant of ../DESIGN.md is a field here with its documented default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

METHODS = ("ar", "specdec", "adaptive-k", "adaptive-tau", "cmasd", "margin", "cmasd+margin", "specbound")
VERIFY_MODES = ("strict", "relaxed")
CONFIDENCE_MODES = ("ensemble", "entropy", "margin", "softmax")
OBJECTIVES = ("throughput", "latency")  # what tuning (cmsd.tuning) picks a job's configuration for


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class ConfidenceSettings:
    """How a drafted token's confidence C in [0, 1] is computed from the drafter's logits."""

    mode: str = "ensemble"  # ensemble | entropy | margin | softmax (single metrics for debugging)
    weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # l1 entropy, l2 logit margin, l3 softmax margin
    margin_scale: float = 2.0  # s in C_margin = tanh((z1 - z2) / s)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        _check(self.mode in CONFIDENCE_MODES, f"confidence.mode must be one of {CONFIDENCE_MODES}, got {self.mode!r}")
        _check(len(self.weights) == 3, f"confidence.weights needs 3 values, got {len(self.weights)}")
        _check(all(w >= 0 for w in self.weights), f"confidence.weights must be >= 0, got {self.weights}")
        _check(math.isclose(sum(self.weights), 1.0, abs_tol=1e-6), f"confidence.weights must sum to 1, got {self.weights}")
        _check(self.margin_scale > 0, f"confidence.margin_scale must be > 0, got {self.margin_scale}")

    @property
    def effective_weights(self) -> tuple[float, float, float]:
        single = {"entropy": (1.0, 0.0, 0.0), "margin": (0.0, 1.0, 0.0), "softmax": (0.0, 0.0, 1.0)}
        return single.get(self.mode, self.weights)


@dataclass(frozen=True)
class ControlSettings:
    """The controller: draft length k_j and verification threshold tau_t from confidence."""

    k: int = 4  # draft length of the fixed-k methods (specdec, adaptive-tau, margin)
    k_min: int = 1
    k_max: int = 8
    alpha: float = 1.0  # k_j = clip(k_min + round(alpha * Cbar * (k_max - k_min)), k_min, k_max)
    c_stop: float = 0.0  # drafting stops before a token whose C < c_stop (0 = never)
    chain_stop: float = 0.0  # ... or before the draft's running product of C falls below chain_stop (0 = never)
    tau_base: float = 0.3  # tau_t = tau_base * C_t ** gamma; 0 = strict
    gamma: float = 1.0
    beta: int = 5  # a drafted token must be among the target's top-beta

    def __post_init__(self) -> None:
        _check(self.k >= 1, f"control.k must be >= 1, got {self.k}")
        _check(self.k_min >= 0, f"control.k_min must be >= 0, got {self.k_min}")
        _check(self.k_max >= max(self.k_min, 1), f"control.k_max must be >= max(k_min, 1), got {self.k_max}")
        _check(self.alpha >= 0, f"control.alpha must be >= 0, got {self.alpha}")
        _check(0 <= self.c_stop <= 1, f"control.c_stop must be in [0, 1], got {self.c_stop}")
        _check(0 <= self.chain_stop <= 1, f"control.chain_stop must be in [0, 1], got {self.chain_stop}")
        _check(0 <= self.tau_base <= 1, f"control.tau_base must be in [0, 1], got {self.tau_base}")
        _check(self.gamma >= 0, f"control.gamma must be >= 0, got {self.gamma}")
        _check(self.beta >= 1, f"control.beta must be >= 1, got {self.beta}")


@dataclass(frozen=True)
class MarginSettings:
    """Margin-aware verification: accept a runner-up where the target itself is indecisive."""

    m: int = 2  # the drafted token must be in the target's top-m
    delta: float = 0.1  # ... and the target's p(1) - p(2) <= delta

    def __post_init__(self) -> None:
        _check(self.m >= 1, f"margin.m must be >= 1, got {self.m}")
        _check(0 <= self.delta <= 1, f"margin.delta must be in [0, 1], got {self.delta}")


@dataclass(frozen=True)
class NgramSettings:
    """The prompt-lookup drafter: continuation counts of the longest matching suffix."""

    max_ngram: int = 8  # longest suffix looked up
    min_ngram: int = 1  # shortest suffix looked up
    min_count: int = 1  # fewer matches than this: no draft
    kappa: float = 1.5  # continuations after an n-token match get weight n / (n + kappa) in q; the rest is uniform
    branches: int = 0  # candidate tokens per node of a tree draft; 1 = one chain (more: strict greedy only);
    #                    0 = auto: 2 for strict greedy decoding of a decoder-only target, else 1
    tree_tokens: int = 10  # the most drafted tokens (tree nodes) per row and iteration in a tree (and at most the
    #                        verify budget's share; a single row's tree is cut where a node costs more than it gives)
    tree_min_p: float = 0.1  # ... and no node whose path's product of q (its estimated acceptance) is under this

    def __post_init__(self) -> None:
        _check(self.min_ngram >= 1, f"ngram.min_ngram must be >= 1, got {self.min_ngram}")
        _check(self.max_ngram >= self.min_ngram, f"ngram.max_ngram must be >= min_ngram, got {self.max_ngram}")
        _check(self.min_count >= 1, f"ngram.min_count must be >= 1, got {self.min_count}")
        _check(self.kappa >= 0, f"ngram.kappa must be >= 0, got {self.kappa}")
        _check(self.branches >= 0, f"ngram.branches must be >= 0, got {self.branches}")
        _check(self.tree_tokens >= 1, f"ngram.tree_tokens must be >= 1, got {self.tree_tokens}")
        _check(0 <= self.tree_min_p <= 1, f"ngram.tree_min_p must be in [0, 1], got {self.tree_min_p}")


@dataclass(frozen=True)
class HeadSettings:
    """The feature-head drafter's tree (EAGLE-2): grown best first by the product of the head's q along a path."""

    branches: int = 0  # the tree's width: each depth keeps the `branches` likeliest paths and drafts `branches`
    #                    candidates after each; 1 = one chain (more: strict greedy only); 0 = auto: 2 for strict
    #                    greedy decoding, else 1
    depth: int = 4  # the deepest drafted token (head passes per iteration)
    tree_tokens: int = 10  # the most drafted tokens per row and iteration (and at most the verify budget's share; a
    #                        single row's tree is cut where a node costs more than it gives)
    tree_min_p: float = 0.1  # no node whose path's product of q (its estimated acceptance) is under this, and no
    #                          deeper head pass once no path reaches it (0: always `depth` passes, no host sync)

    def __post_init__(self) -> None:
        _check(self.branches >= 0, f"head.branches must be >= 0, got {self.branches}")
        _check(0 <= self.tree_min_p <= 1, f"head.tree_min_p must be in [0, 1], got {self.tree_min_p}")
        _check(self.depth >= 1, f"head.depth must be >= 1, got {self.depth}")
        _check(self.tree_tokens >= 1, f"head.tree_tokens must be >= 1, got {self.tree_tokens}")


@dataclass(frozen=True)
class SpecBoundSettings:
    """SpecBound's self-drafter: exit layer, its temperature, and the adaptive confidence bound."""

    exit_layer: int = 0  # 0 = the calibrated choice, else half the layers
    temperature: float = 0.0  # 0 = the calibrated temperature of the exit layer, else a default annealing
    bound: float = 0.5  # drafting stops before a token whose calibrated exit probability is below the bound
    bound_step: float = 0.05  # after a fully accepted draft the bound falls by this, after a rejection it rises
    bound_min: float = 0.05
    bound_max: float = 0.95
    fallback: bool = True  # decode as AR (with a warning) when calibration predicts a slowdown

    def __post_init__(self) -> None:
        _check(self.exit_layer >= 0, f"specbound.exit_layer must be >= 0, got {self.exit_layer}")
        _check(self.temperature >= 0, f"specbound.temperature must be >= 0, got {self.temperature}")
        _check(0 <= self.bound_min <= self.bound <= self.bound_max <= 1,
               f"specbound needs 0 <= bound_min <= bound <= bound_max <= 1, got {self.bound_min}, {self.bound}, "
               f"{self.bound_max}")
        _check(self.bound_step >= 0, f"specbound.bound_step must be >= 0, got {self.bound_step}")


@dataclass(frozen=True)
class DecodeSettings:
    """Everything one decode needs besides the models. `method` picks the ablation (DESIGN.md)."""

    method: str = "cmasd"
    verify: str = "strict"  # strict: lossless; relaxed: the method's own acceptance rule
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0
    batch_size: int = 8
    continuous: bool = True  # continuous batching: when a row finishes, the next document takes its place at once
    #                          (false: each batch drains before the next starts; encoder-decoders without a
    #                          position table, e.g. T5, always drain)
    stop: tuple[str, ...] = ()  # stop strings (text level); EOS always stops
    trace: bool = True  # keep the per-drafted-token trace
    small_rows: int = 8  # on CPU, a linear layer fed n <= this many tokens computes (W @ x.T).T where that was timed
    #                      faster than torch's x @ W.T for n (cmsd.kernels.small_row_counts); 0 = never
    verify_tokens: int = 0  # the most tokens one verify pass carries (rows x (1 + drafts)): a row drafts at most
    #                         verify_tokens // rows - 1; 0 = auto: on CPU the widest pass that costs at most 1.3
    #                         single steps by the forward costs measured at the first decode (4 for an
    #                         encoder-decoder; a single row's tree is cut by those costs instead), no limit on a GPU
    confidence: ConfidenceSettings = field(default_factory=ConfidenceSettings)
    control: ControlSettings = field(default_factory=ControlSettings)
    margin: MarginSettings = field(default_factory=MarginSettings)
    ngram: NgramSettings = field(default_factory=NgramSettings)
    head: HeadSettings = field(default_factory=HeadSettings)
    specbound: SpecBoundSettings = field(default_factory=SpecBoundSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        _check(self.method in METHODS, f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        _check(self.verify in VERIFY_MODES, f"verify must be 'strict' or 'relaxed', got {self.verify!r}")
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(isinstance(self.continuous, bool), f"continuous must be true or false, got {self.continuous!r}")
        _check(self.small_rows >= 0, f"small_rows must be >= 0, got {self.small_rows}")
        _check(self.verify_tokens >= 0, f"verify_tokens must be >= 0, got {self.verify_tokens}")

    # What the method does, decided once here (no string checks in the decode loop).
    @property
    def drafts(self) -> bool:
        return self.method != "ar"

    @property
    def adaptive_k(self) -> bool:
        return self.method in ("adaptive-k", "cmasd", "cmasd+margin")

    @property
    def bounded(self) -> bool:
        """SpecBound: draft up to k_max, stopping at the adaptive confidence bound."""
        return self.method == "specbound"

    @property
    def threshold_rule(self) -> bool:
        """CM-ASD's confidence-modulated threshold tau_t (only when verify is relaxed)."""
        return self.verify == "relaxed" and self.method in ("adaptive-tau", "cmasd", "cmasd+margin")

    @property
    def margin_rule(self) -> bool:
        """Margin-aware acceptance (only when verify is relaxed)."""
        return self.verify == "relaxed" and self.method in ("margin", "cmasd+margin")

    @property
    def lossless(self) -> bool:
        return not (self.threshold_rule or self.margin_rule)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecodeSettings:
        """Build from a plain mapping (a YAML spec); unknown keys are an error naming the key."""
        nested = {"confidence": ConfidenceSettings, "control": ControlSettings, "margin": MarginSettings,
                  "ngram": NgramSettings, "head": HeadSettings,
                  "specbound": SpecBoundSettings}
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            _check(key in known, f"unknown decode setting {key!r} (known: {', '.join(sorted(known))})")
            if key in nested:
                sub = nested[key]
                sub_known = {f.name for f in fields(sub)}
                _check(isinstance(value, dict), f"decode setting {key!r} must be a mapping")
                for sub_key in value:
                    _check(sub_key in sub_known, f"unknown setting {key}.{sub_key} (known: {', '.join(sorted(sub_known))})")
                value = sub(**value)
            elif key == "stop" and isinstance(value, str):
                value = (value,)
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "__dataclass_fields__"):
                value = {g.name: _plain(getattr(value, g.name)) for g in fields(value)}
            out[f.name] = _plain(value)
        return out

    def with_(self, **changes: Any) -> DecodeSettings:
        return replace(self, **changes)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
