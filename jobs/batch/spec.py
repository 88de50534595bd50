"""The job spec: corpus, task, prompt, models, decoding settings, execution and output.

A YAML file with these sections; every field can be overridden from the command line (`--set
section.field=value`, or the named flags of `cmsd-jobs submit`). The resolved spec, every default written
out, goes into the job directory as spec.yaml.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from cmsd.models import LOAD_FORMATS
from cmsd.prompts import PromptTemplate
from cmsd.settings import OBJECTIVES, DecodeSettings
from jobs.errors import BadInput

TASKS = ("summarization", "translation", "plain")
FORMATS = ("auto", "jsonl", "csv", "tsv", "parquet", "arrow", "datasets", "text", "hub")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class CorpusSpec:
    """Where the documents are and which fields hold what."""

    path: str = ""  # a file, a `datasets` directory, a URI, or a hub dataset name
    format: str = "auto"  # auto (from the suffix) | jsonl | csv | tsv | parquet | arrow | datasets | text | hub
    reference_path: str | None = None  # format text: the aligned reference file, one line per source line
    source_field: str = "source"
    reference_field: str | None = None  # None: "reference" when the corpus has it, else no references
    id_field: str | None = None  # None: "id" when the corpus has it, else row-<n>
    split: str = "test"  # the split of a hub dataset or a saved DatasetDict
    limit: int | None = None  # decode only the first N rows

    def __post_init__(self) -> None:
        _check(bool(self.path), "corpus.path is required (a file, a directory or a hub dataset name)")
        _check(self.format in FORMATS, f"corpus.format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        _check(self.limit is None or self.limit >= 1, f"corpus.limit must be >= 1, got {self.limit}")


@dataclass(frozen=True)
class TaskSpec:
    name: str = "summarization"  # summarization | translation | plain
    src_lang: str | None = None  # translation: None = the corpus's src_lang field, row by row
    tgt_lang: str | None = None

    def __post_init__(self) -> None:
        _check(self.name in TASKS, f"task.name must be one of {', '.join(TASKS)}; got {self.name!r}")


@dataclass(frozen=True)
class PromptSpec:
    template: str | None = None  # str.format over {source}, {src_lang}, {tgt_lang}; None = the task's default
    chat: bool | None = None  # wrap in the tokenizer's chat template; None = when it has one
    system: str | None = None  # a system message for chat templates


@dataclass(frozen=True)
class ModelSpec:
    target: str = "smollm2"  # "smollm2" (offline SmolLM2-135M-Instruct), a directory or a hub name
    drafter: str | None = "ngram"  # "ngram", "self" (SpecBound), a directory or hub name; None = AR only
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    load_format: str = "auto"  # auto: the models' weights; dummy: random weights of their shapes (speed only: no
    #                            quality scores); target/drafter may then be a shipped shape (cmsd.models.SHAPES)

    def __post_init__(self) -> None:
        _check(self.load_format in LOAD_FORMATS,
               f"models.load_format must be one of {', '.join(LOAD_FORMATS)}; got {self.load_format!r}")

    @property
    def dummy(self) -> bool:
        return self.load_format == "dummy"


@dataclass(frozen=True)
class ExecutionSpec:
    """How the job runs on Ray."""

    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:10001": join a cluster
    actors: int = 2  # worker actors, each holding one drafter/target pair
    shards: int | None = None  # None: one per `shard_rows` rows, at least two per actor
    shard_rows: int = 64
    cpus_per_actor: float | None = None  # None: the CPUs divided among the actors (each at least 1, at most a
    #                                      node's); an actor's torch threads are its whole CPUs
    gpus_per_actor: float | None = None  # None: 1 when the cluster has a GPU, else 0
    retries: int = 2  # attempts after the first, per shard, when an actor dies or a shard fails
    num_cpus: int | None = None  # local Ray only: CPUs it may use (None: all)
    baseline: int = 8  # documents also decoded with AR, on the same actors, for the job's own speedup_vs_ar and
    #                    agreement_with_ar (spread over the shards in groups of batch_size); 0: none. Untuned jobs
    #                    only: a tuned job's comparison is its tuning's (no document decoded twice)
    tune: bool = True  # each actor picks its method, drafter, batch size and verify budget by measurement first
    #                    (cmsd.tuning; a plan kept per machine is reused); false: decode exactly as the decode
    #                    section says
    objective: str = "throughput"  # what tuning picks for: throughput (tokens a second) | latency (one document's
    #                                time, batch 1)

    def __post_init__(self) -> None:
        _check(self.actors >= 1, f"execution.actors must be >= 1, got {self.actors}")
        _check(self.shards is None or self.shards >= 1, f"execution.shards must be >= 1, got {self.shards}")
        _check(self.shard_rows >= 1, f"execution.shard_rows must be >= 1, got {self.shard_rows}")
        _check(self.cpus_per_actor is None or self.cpus_per_actor > 0,
               f"execution.cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        _check(self.gpus_per_actor is None or self.gpus_per_actor >= 0,
               f"execution.gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        _check(self.retries >= 0, f"execution.retries must be >= 0, got {self.retries}")
        _check(self.num_cpus is None or self.num_cpus >= 1, f"execution.num_cpus must be >= 1, got {self.num_cpus}")
        _check(self.baseline >= 0, f"execution.baseline must be >= 0, got {self.baseline}")
        _check(isinstance(self.tune, bool), f"execution.tune must be true or false, got {self.tune!r}")
        _check(self.objective in OBJECTIVES,
               f"execution.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")


@dataclass(frozen=True)
class OutputSpec:
    dir: str = "runs"  # where job directories go: a local path or a pyarrow filesystem URI
    job_id: str | None = None  # None: <date>-<time>-<corpus>-<method>-<4 hex>


# a field name that holds a credential (matched against the last part of a dotted key)
CREDENTIAL = re.compile(r"(secret|passw(or)?d|credential|(^|_)(access_key(_id)?|api_key|session_token|token)$)",
                        re.IGNORECASE)
CREDENTIALS_HELP = ("credentials are never taken from a spec or --set (they would be written to spec.yaml): set them "
                    "in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; on Kubernetes the Secret that "
                    "`cmsd-jobs k8s render` wires) or pyarrow's usual sources")


def is_credential(key: str) -> bool:
    """Whether a (dotted) spec key names a credential, by its last part."""
    return bool(CREDENTIAL.search(key.strip().rsplit(".", 1)[-1]))


SECTIONS: dict[str, type] = {"corpus": CorpusSpec, "task": TaskSpec, "prompt": PromptSpec, "models": ModelSpec,
                             "execution": ExecutionSpec, "output": OutputSpec}


@dataclass(frozen=True)
class JobSpec:
    corpus: CorpusSpec
    task: TaskSpec = field(default_factory=TaskSpec)
    prompt: PromptSpec = field(default_factory=PromptSpec)
    models: ModelSpec = field(default_factory=ModelSpec)
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)
    output: OutputSpec = field(default_factory=OutputSpec)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """Build and validate; any problem is a BadInput naming the section and field."""
        if not isinstance(data, dict):
            raise BadInput(f"a job spec must be a mapping of sections, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SECTIONS) - {"decode"})
        if unknown:
            raise BadInput(f"unknown spec section(s) {unknown} (known: {', '.join([*SECTIONS, 'decode'])})")
        parts = {name: section(name, kind, data.get(name) or {}) for name, kind in SECTIONS.items()}
        corpus, output = parts["corpus"], parts["output"]
        for where, uri in (("corpus.path", corpus.path), ("corpus.reference_path", corpus.reference_path),
                           ("output.dir", output.dir)):
            if isinstance(uri, str) and re.match(r"^[a-z][a-z0-9+.-]*://[^/]*@", uri):
                raise BadInput(f"{where}: a URI with credentials in it (scheme://KEY:SECRET@...) is refused: "
                               + CREDENTIALS_HELP)
        try:
            decode = DecodeSettings.from_dict(data.get("decode") or {})
        except (TypeError, ValueError) as err:
            raise BadInput(f"decode: {err}") from err
        return cls(decode=decode, **parts)

    def to_dict(self) -> dict[str, Any]:
        """Every field of every section, in the spec's order (decode between models and execution)."""
        return {f.name: self.decode.to_dict() if f.name == "decode" else asdict(getattr(self, f.name))
                for f in fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def with_(self, section: str, **changes: Any) -> JobSpec:
        return replace(self, **{section: replace(getattr(self, section), **changes)})

    def template(self) -> PromptTemplate:
        """The prompt template of the task and prompt sections (the workers render each row with it)."""
        try:
            return PromptTemplate(task=self.task.name, template=self.prompt.template, chat=self.prompt.chat,
                                  system=self.prompt.system)
        except ValueError as err:
            raise BadInput(f"prompt: {err}") from err


def section(name: str, kind: type, data: Any) -> Any:
    """A spec section as `kind` (a dataclass): a mapping of its fields; anything else is a BadInput naming it."""
    if not isinstance(data, dict):
        raise BadInput(f"spec section {name!r} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(data) - known)
    if any(is_credential(str(k)) for k in unknown):
        raise BadInput(f"{name}: {CREDENTIALS_HELP}")
    if unknown:
        raise BadInput(f"unknown field(s) {', '.join(f'{name}.{k}' for k in unknown)} "
                       f"(known: {', '.join(sorted(known))})")
    try:
        return kind(**data)
    except (TypeError, ValueError) as err:
        raise BadInput(f"{name}: {err}") from err


def load_spec_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML spec file; relative corpus paths are taken relative to the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise BadInput(f"cannot read spec {path}: {err}") from err
    if not isinstance(data, dict):
        raise BadInput(f"spec {path} must be a mapping of sections, got {type(data).__name__}")
    corpus = data.get("corpus")
    if isinstance(corpus, dict):
        for key in ("path", "reference_path"):
            corpus[key] = beside(path, corpus.get(key))
    return data


def beside(spec_file: Path, value: Any) -> Any:
    """A relative local path in a spec file means: relative to that file (hub names are left alone)."""
    if not isinstance(value, str) or "://" in value or Path(value).is_absolute():
        return value
    candidate = spec_file.parent / value
    return str(candidate) if candidate.exists() else value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`decode.control.k_max`) in a copy of a raw spec mapping."""
    out = yaml.safe_load(yaml.safe_dump(data))  # a deep copy of plain data
    for dotted, value in overrides.items():
        keys = dotted.split(".")
        node = out
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise BadInput(f"cannot set {dotted}: {key} is not a section")
            node = child
        node[keys[-1]] = value
    return out


def parse_assignment(text: str) -> tuple[str, Any]:
    """`section.field=value` with a YAML value (`8`, `null`, `[0.5, 0.25, 0.25]`, `text`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise BadInput(f"--set expects section.field=value, got {text!r}")
    if is_credential(key):  # its value is never echoed
        raise BadInput(f"--set {key.strip()}: {CREDENTIALS_HELP}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise BadInput(f"--set {key}: cannot parse value {raw!r}: {err}") from err
    return key.strip(), value
