"""The evaluation suite (YAML): corpora, a model pair, methods, peers, a sweep, floors and tolerances.

One frozen dataclass per section, validated when built (a ValueError naming the field); `load_suite` turns any
problem into a BadInput (exit code 2) before anything is run or written. See jobs/suites/nightly.yaml for a
commented example of every section.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cmsd.settings import METHODS, DecodeSettings
from jobs.errors import BadInput
from jobs.batch.spec import TASKS, CorpusSpec, ModelSpec, PromptSpec, beside, section

RELAXED_BY_DEFAULT = ("adaptive-tau", "margin", "cmasd+margin")  # strict, these would be specdec / adaptive-k
PEER_KINDS = ("greedy", "assisted", "prompt-lookup", "early-exit", "vllm")
BATCHED_PEERS = ("greedy", "vllm")  # transformers' assisted / prompt-lookup / early-exit generation is batch 1 only
SWEEP_KNOBS = ("alpha", "gamma", "tau_base", "k_max")
SWEEP_AXES = {"speed": ("speedup_vs_ar", "tokens_per_s"), "quality": ("agreement_with_ar", "rougeL", "bleu", "chrf")}
MAX_GRID = 256


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class SuiteCorpus:
    """One corpus: the first `limit` good rows after `offset` are evaluated; the sweep takes the rows after."""

    path: str
    task: str = "summarization"
    name: str = ""  # default: the file name without suffixes
    limit: int = 8
    offset: int = 0
    source_field: str = "source"
    reference_field: str | None = None  # None: "reference" when present
    id_field: str | None = None  # None: "id" when present, else row-N
    src_lang: str | None = None  # translation: None = the corpus's per-row src_lang / tgt_lang
    tgt_lang: str | None = None
    prompt: PromptSpec = field(default_factory=PromptSpec)

    def __post_init__(self) -> None:
        _check(bool(self.path), "corpora[].path is required")
        _check(self.task in TASKS, f"corpora[].task must be one of {', '.join(TASKS)}; got {self.task!r}")
        _check(self.limit >= 1, f"corpora[].limit must be >= 1, got {self.limit}")
        _check(self.offset >= 0, f"corpora[].offset must be >= 0, got {self.offset}")
        if not self.name:
            object.__setattr__(self, "name", Path(self.path.rstrip("/")).name.split(".")[0])

    def corpus_spec(self, rows: int) -> CorpusSpec:
        """The job system's corpus spec, reading the first `rows` rows."""
        return CorpusSpec(path=self.path, source_field=self.source_field, reference_field=self.reference_field,
                          id_field=self.id_field, limit=rows)


@dataclass(frozen=True)
class Floors:
    """Bounds every checked method must meet; a miss is a regression (exit code 1). None = not checked."""

    min_speedup: float | None = None  # speedup_vs_ar at batch 1
    min_speedup_batched: float | None = None  # ... at the suite's batch_size (None: min_speedup)
    max_quality_loss: float | None = None  # AR's score minus the method's, in points (0-100), per corpus and metric
    min_agreement: float | None = None  # agreement_with_ar
    lossless_agreement: float | None = None  # agreement_with_ar of lossless (strict) methods: their output is AR's
    significance: bool = True  # a quality drop that is significant (paired bootstrap, p < alpha) is a regression
    alpha: float = 0.05

    def __post_init__(self) -> None:
        for name in ("min_speedup", "min_speedup_batched"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"floors.{name} must be > 0, got {value}")
        _check(self.max_quality_loss is None or self.max_quality_loss >= 0,
               f"floors.max_quality_loss must be >= 0, got {self.max_quality_loss}")
        _check(self.min_agreement is None or 0 <= self.min_agreement <= 1,
               f"floors.min_agreement must be in [0, 1], got {self.min_agreement}")
        _check(self.lossless_agreement is None or 0 <= self.lossless_agreement <= 1,
               f"floors.lossless_agreement must be in [0, 1], got {self.lossless_agreement}")
        _check(0 < self.alpha < 1, f"floors.alpha must be in (0, 1), got {self.alpha}")


@dataclass(frozen=True)
class Tolerances:
    """How much worse than the previous run (same suite, same documents) a number may get before it regresses."""

    speedup: float = 0.15  # relative drop of speedup_vs_ar (timings are noisy)
    tokens_per_call: float = 0.03  # relative drop (deterministic for greedy decoding)
    agreement: float = 0.02  # absolute drop of agreement_with_ar
    quality: float = 1.0  # points (0-100) of BLEU / chrF / ROUGE

    def __post_init__(self) -> None:
        for f in fields(self):
            _check(getattr(self, f.name) >= 0, f"tolerances.{f.name} must be >= 0, got {getattr(self, f.name)}")


@dataclass(frozen=True)
class MethodEntry:
    """A cmsd method with its settings (the suite's `decode` section, then `settings`, then method/verify)."""

    name: str
    settings: DecodeSettings
    optional: bool = False  # when cmsd refuses it (e.g. SpecBound not available), skip it with a note
    limit: int | None = None  # time it on the first N documents of each corpus only
    batch: bool = True  # also measured at the suite's batch size
    checked: bool = True  # floors and the previous run apply to it
    floors: Floors | None = None  # overrides the suite's floors for this method
    drafter: str | None = None  # this method's drafter (ngram or a model directory); None: the suite's

    def __post_init__(self) -> None:
        _check(bool(self.name), "methods[].name must not be empty")
        _check(self.limit is None or self.limit >= 1, f"methods[].limit must be >= 1, got {self.limit}")

    @property
    def lossless(self) -> bool:
        return self.settings.lossless


@dataclass(frozen=True)
class PeerEntry:
    """A peer run through transformers itself (or vLLM) on the same documents and models."""

    kind: str
    name: str = ""
    prompt_lookup_num_tokens: int | None = None  # prompt-lookup
    max_matching_ngram_size: int | None = None  # prompt-lookup (None: transformers' default)
    assistant_early_exit: int | None = None  # early-exit: the layer (None: half the target's layers)
    num_assistant_tokens: int | None = None  # assisted / early-exit (None: transformers' default schedule)
    num_assistant_tokens_schedule: str | None = None
    assistant_confidence_threshold: float | None = None
    num_speculative_tokens: int = 5  # vllm
    limit: int | None = None
    batch: bool = True  # only kinds in BATCHED_PEERS are ever batched
    checked: bool = False

    def __post_init__(self) -> None:
        _check(self.kind in PEER_KINDS, f"peers[].kind must be one of {', '.join(PEER_KINDS)}; got {self.kind!r}")
        if self.kind == "prompt-lookup" and self.prompt_lookup_num_tokens is None:
            object.__setattr__(self, "prompt_lookup_num_tokens", 3)
        for name in ("prompt_lookup_num_tokens", "assistant_early_exit", "num_assistant_tokens", "limit"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"peers[].{name} must be >= 1, got {value}")
        if not self.name:
            object.__setattr__(self, "name", self._default_name())

    def _default_name(self) -> str:
        suffix = {"prompt-lookup": self.prompt_lookup_num_tokens, "early-exit": self.assistant_early_exit}
        extra = suffix.get(self.kind)
        return "vllm" if self.kind == "vllm" else f"hf-{self.kind}" + (f"-{extra}" if extra else "")

    @property
    def batched(self) -> bool:
        return self.kind in BATCHED_PEERS and self.batch


@dataclass(frozen=True)
class SweepSpec:
    """A grid over (alpha, gamma, tau_base, k_max) on validation rows; the Pareto front of speed and quality."""

    method: str = "cmasd"
    verify: str = "relaxed"
    settings: dict[str, Any] = field(default_factory=dict)  # DecodeSettings overrides under the grid
    grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    docs_per_corpus: int = 2  # validation rows: the rows right after each corpus's evaluated rows
    speed: str = "speedup_vs_ar"
    quality: str = "agreement_with_ar"
    min_quality: float = 0.0  # the chosen point: the fastest whose quality >= this (else the best quality)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.grid) - set(SWEEP_KNOBS))
        _check(not unknown, f"sweep.grid: unknown knob(s) {unknown} (known: {', '.join(SWEEP_KNOBS)})")
        grid = {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in self.grid.items()}
        _check(all(grid.values()), "sweep.grid: every knob needs at least one value")
        object.__setattr__(self, "grid", grid)
        _check(len(self.points()) <= MAX_GRID, f"sweep.grid has {len(self.points())} points; at most {MAX_GRID}")
        _check(self.docs_per_corpus >= 1, f"sweep.docs_per_corpus must be >= 1, got {self.docs_per_corpus}")
        _check(self.speed in SWEEP_AXES["speed"], f"sweep.speed must be one of {SWEEP_AXES['speed']}")
        _check(self.quality in SWEEP_AXES["quality"], f"sweep.quality must be one of {SWEEP_AXES['quality']}")
        for point in self.points():
            self.point_settings(DecodeSettings(), point)  # every point must be valid settings

    def points(self) -> list[dict[str, float]]:
        keys = [k for k in SWEEP_KNOBS if k in self.grid]
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]

    def point_settings(self, base: DecodeSettings, point: dict[str, float]) -> DecodeSettings:
        merged = _merge(base.to_dict(), {**self.settings, "method": self.method, "verify": self.verify})
        merged["control"] = {**merged.get("control", {}), **{k: _knob(k, v) for k, v in point.items()}}
        return DecodeSettings.from_dict(merged)


@dataclass(frozen=True)
class ExecutionSpec:
    """Where the measurement runs: in this process (default), or in Ray actors (address, or actors > 1)."""

    address: str | None = None  # "auto", "ray://host:10001"; None and actors == 1: in this process
    actors: int = 1  # documents are split across actors; each times every method on its share
    gpus_per_actor: float | None = None  # None: 1 when the cluster has a GPU, else 0
    cpus_per_actor: float = 1.0
    threads: int | None = None  # torch threads (None: torch's default)
    retime_factor: float = 2.0  # time a unit again when a runner's time on it is off by more (0: never)
    busy_load: float = 1.5  # mean load average per CPU above which speed regressions are only warnings (0: never)
    batched_rounds: int = 1  # times the batched setting is timed, each runner keeping its fastest per batch
    calibrate: bool = True  # SpecBound methods: calibrate the target first where it has no stored calibration

    def __post_init__(self) -> None:
        _check(self.actors >= 1, f"execution.actors must be >= 1, got {self.actors}")
        _check(self.retime_factor == 0 or self.retime_factor > 1,
               f"execution.retime_factor must be 0 (never) or > 1, got {self.retime_factor}")
        _check(self.busy_load >= 0, f"execution.busy_load must be >= 0, got {self.busy_load}")
        _check(self.batched_rounds >= 1, f"execution.batched_rounds must be >= 1, got {self.batched_rounds}")
        _check(isinstance(self.calibrate, bool), f"execution.calibrate must be true or false, got {self.calibrate!r}")
        _check(self.gpus_per_actor is None or self.gpus_per_actor >= 0,
               f"execution.gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        _check(self.threads is None or self.threads >= 1, f"execution.threads must be >= 1, got {self.threads}")

    @property
    def uses_ray(self) -> bool:
        return self.address is not None or self.actors > 1


@dataclass(frozen=True)
class Suite:
    name: str
    corpora: tuple[SuiteCorpus, ...]
    models: ModelSpec
    methods: tuple[MethodEntry, ...]
    peers: tuple[PeerEntry, ...] = ()
    batch_size: int = 8  # the batched setting (besides batch 1); 1 = no batched setting
    batch_docs: int = 0  # documents per batched unit, decoded batch_size rows at a time (0: batch_size; more:
    #                      rows that finish are refilled from the unit, continuous batching's setting)
    single: bool = True  # the batch-1 setting is measured (false: only the batched one)
    sweep: SweepSpec | None = None
    calibration_bins: int = 10
    bootstrap_samples: int = 1000
    floors: Floors = field(default_factory=Floors)
    tolerances: Tolerances = field(default_factory=Tolerances)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)
    base: DecodeSettings = field(default_factory=DecodeSettings)  # the `decode` section

    def __post_init__(self) -> None:
        _check(bool(self.corpora), "corpora: at least one corpus is required")
        names = [c.name for c in self.corpora]
        _check(len(set(names)) == len(names), f"corpora: names must be unique, got {names}")
        labels = [m.name for m in self.methods] + [p.name for p in self.peers]
        _check(len(set(labels)) == len(labels), f"methods/peers: names must be unique, got {labels}")
        _check(any(m.settings.method == "ar" for m in self.methods), "methods: 'ar' is required (the baseline)")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.batch_docs == 0 or self.batch_docs >= self.batch_size,
               f"batch_docs must be 0 or >= batch_size ({self.batch_size}), got {self.batch_docs}")
        _check(self.batch_docs <= self.batch_size or not any(p.batched for p in self.peers),
               "batch_docs > batch_size: peers decode a unit as one batch; list them with batch: false")
        _check(isinstance(self.single, bool), f"single must be true or false, got {self.single!r}")
        _check(self.single or self.batch_size > 1, "single: false needs a batched setting (batch_size > 1)")
        _check(2 <= self.calibration_bins <= 100, f"calibration_bins must be in [2, 100], got {self.calibration_bins}")
        _check(self.bootstrap_samples >= 100, f"bootstrap_samples must be >= 100, got {self.bootstrap_samples}")

    @property
    def ar(self) -> MethodEntry:
        return next(m for m in self.methods if m.settings.method == "ar")

    def floors_for(self, name: str) -> Floors | None:
        """The floors of a method or peer (None when it is not checked)."""
        entry = next((e for e in (*self.methods, *self.peers) if e.name == name), None)
        if entry is None or not entry.checked:
            return None
        return getattr(entry, "floors", None) or self.floors


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `over` applied, nested mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _knob(name: str, value: Any) -> Any:
    return int(value) if name == "k_max" else float(value)


# -- reading a suite file ------------------------------------------------------------------------------------
TOP_LEVEL = ("name", "corpora", "models", "decode", "batch_size", "batch_docs", "single", "methods", "peers", "sweep", "calibration_bins",
             "bootstrap_samples", "floors", "tolerances", "execution")
METHOD_KEYS = ("name", "method", "verify", "settings", "optional", "limit", "batch", "checked", "floors", "drafter")


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file; relative corpus paths are relative to the file. Any problem: BadInput."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise BadInput(f"cannot read suite {path}: {err}") from err
    if not isinstance(data, dict):
        raise BadInput(f"suite {path} must be a mapping, got {type(data).__name__}")
    try:
        return suite_from_dict(data, path)
    except (TypeError, ValueError) as err:  # BadInput is a ValueError too
        raise BadInput(f"suite {path}: {err}") from err


def suite_from_dict(data: dict[str, Any], origin: Path | None = None) -> Suite:
    unknown = sorted(set(data) - set(TOP_LEVEL))
    _check(not unknown, f"unknown section(s) {unknown} (known: {', '.join(TOP_LEVEL)})")
    base = _decode(data.get("decode") or {})
    floors = section("floors", Floors, data.get("floors") or {})
    corpora = tuple(_corpus(i, c, origin) for i, c in enumerate(_list(data, "corpora")))
    return Suite(
        name=str(data.get("name") or (origin.stem if origin else "suite")), corpora=corpora,
        models=section("models", ModelSpec, _models(data.get("models") or {}, origin)),
        methods=tuple(_method(i, m, base, floors, origin) for i, m in enumerate(_list(data, "methods"))),
        peers=tuple(_peer(i, p) for i, p in enumerate(_list(data, "peers"))),
        batch_size=int(data.get("batch_size", 8)), batch_docs=int(data.get("batch_docs", 0)),
        single=data.get("single", True), base=base, floors=floors,
        sweep=section("sweep", SweepSpec, data["sweep"]) if data.get("sweep") else None,
        calibration_bins=int(data.get("calibration_bins", 10)),
        bootstrap_samples=int(data.get("bootstrap_samples", 1000)),
        tolerances=section("tolerances", Tolerances, data.get("tolerances") or {}),
        execution=section("execution", ExecutionSpec, data.get("execution") or {}))


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key) or []
    _check(isinstance(value, list), f"{key} must be a list, got {type(value).__name__}")
    return value


def _decode(data: Any) -> DecodeSettings:
    _check(isinstance(data, dict), "decode must be a mapping of DecodeSettings fields")
    try:
        return DecodeSettings.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"decode: {err}") from err


def _corpus(index: int, data: Any, origin: Path | None) -> SuiteCorpus:
    where = f"corpora[{index}]"
    _check(isinstance(data, dict), f"{where} must be a mapping with at least `path`")
    data = dict(data)
    if origin is not None:
        data["path"] = beside(origin, data.get("path"))
    data["prompt"] = section(f"{where}.prompt", PromptSpec, data.get("prompt") or {})
    return section(where, SuiteCorpus, data)


def _models(data: Any, origin: Path | None) -> Any:
    """Model directories given relative to the suite file (hub names and kinds are left alone)."""
    if not isinstance(data, dict) or origin is None:
        return data
    return {**data, **{k: beside(origin, data[k]) for k in ("target", "drafter") if k in data}}


def _method(index: int, data: Any, base: DecodeSettings, floors: Floors, origin: Path | None) -> MethodEntry:
    where = f"methods[{index}]"
    if isinstance(data, str):
        data = {"name": data}
    _check(isinstance(data, dict), f"{where} must be a method name or a mapping")
    unknown = sorted(set(data) - set(METHOD_KEYS))
    _check(not unknown, f"{where}: unknown field(s) {unknown} (known: {', '.join(METHOD_KEYS)})")
    name = str(data.get("name") or data.get("method") or "")
    method = str(data.get("method") or name)
    _check(method in METHODS, f"{where} ({name!r}): method must be one of {', '.join(METHODS)}; got {method!r}")
    verify = data.get("verify") or ("relaxed" if method in RELAXED_BY_DEFAULT else "strict")
    over = {**(data.get("settings") or {}), "method": method, "verify": verify}
    try:
        settings = DecodeSettings.from_dict(_merge(base.to_dict(), over))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where} ({name!r}): {err}") from err
    own = section(f"{where}.floors", Floors, {**floors.__dict__, **data["floors"]}) if data.get("floors") else None
    return MethodEntry(name=name, settings=settings, optional=bool(data.get("optional", method == "specbound")),
                       limit=data.get("limit"), batch=bool(data.get("batch", True)),
                       checked=bool(data.get("checked", method != "ar")), floors=own,
                       drafter=beside(origin, data.get("drafter")) if origin else data.get("drafter"))


def _peer(index: int, data: Any) -> PeerEntry:
    if isinstance(data, str):
        kind = data.removeprefix("hf-")
        _check(kind in PEER_KINDS, f"peers[{index}]: {data!r} is not a peer kind ({', '.join(PEER_KINDS)})")
        data = {"kind": kind}
    return section(f"peers[{index}]", PeerEntry, data)
