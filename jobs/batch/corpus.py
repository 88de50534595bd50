"""Corpus readers: JSON Lines, CSV/TSV, Parquet, Arrow, a `datasets` directory, aligned text files, a hub name.

Each reader gives the same thing: the corpus's field names and, for the fields a job needs, one value per row
(whatever type the file holds; rows are checked later, one by one). A corpus that cannot be read at all, or
that lacks a field the spec names, is a BadInput naming the file and the field.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.errors import BadInput
from jobs.batch.spec import CorpusSpec
from workers.store import normalize_uri

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow", ".txt": "text"}
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
LANG_FIELDS = ("src_lang", "tgt_lang")  # per-row languages for translation, when the corpus has them


@dataclass(frozen=True)
class RawColumns:
    """What a reader found: every field name, and the values of the wanted fields."""

    fields: tuple[str, ...]
    values: dict[str, list[Any]]
    size: int
    broken: dict[int, str] = field(default_factory=dict)  # row -> why it could not be parsed


@dataclass(frozen=True)
class Corpus:
    """The rows of a corpus, field by field, with the field names resolved."""

    origin: str
    spec: CorpusSpec  # with reference_field and id_field resolved (None: the corpus has none)
    sources: list[Any]
    references: list[Any] | None
    ids: list[Any] | None
    langs: dict[str, list[Any]]  # src_lang / tgt_lang columns when present
    broken: dict[int, str]

    @property
    def size(self) -> int:
        return len(self.sources)


def read_corpus(spec: CorpusSpec) -> Corpus:
    fmt = detect_format(spec)
    wanted = {spec.source_field, spec.reference_field or "reference", spec.id_field or "id", *LANG_FIELDS}
    raw = READERS[fmt](spec, wanted)
    return _resolve(spec, raw)


def detect_format(spec: CorpusSpec) -> str:
    if spec.format != "auto":
        return spec.format
    if spec.reference_path:
        return "text"
    suffix = Path(spec.path.split("?")[0]).suffix.lower()
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    if "://" not in spec.path and Path(spec.path).expanduser().is_dir():
        return "datasets"
    if "://" not in spec.path and not Path(spec.path).expanduser().exists() and HUB_NAME.match(spec.path):
        return "hub"
    raise BadInput(f"corpus {spec.path}: cannot tell its format from the name; set corpus.format "
                   f"(one of {', '.join(sorted(set(SUFFIXES.values()) | {'datasets', 'hub'}))})")


def _resolve(spec: CorpusSpec, raw: RawColumns) -> Corpus:
    def pick(explicit: str | None, default: str, flag: str) -> str | None:
        if explicit is not None and explicit not in raw.fields:
            raise BadInput(f"corpus {spec.path}: no field {explicit!r} (fields: {', '.join(raw.fields)}); "
                           f"set {flag}")
        return explicit or (default if default in raw.fields else None)

    source = pick(spec.source_field, spec.source_field, "--source-field")
    reference = pick(spec.reference_field, "reference", "--reference-field")
    id_field = pick(spec.id_field, "id", "--id-field")
    resolved = replace(spec, reference_field=reference, id_field=id_field)
    assert source is not None
    return Corpus(origin=spec.path, spec=resolved, sources=raw.values[source],
                  references=raw.values[reference] if reference else None,
                  ids=raw.values[id_field] if id_field else None,
                  langs={k: raw.values[k] for k in LANG_FIELDS if k in raw.values}, broken=raw.broken)


def _read_bytes(path: str) -> bytes:
    try:
        fs, inner = pafs.FileSystem.from_uri(normalize_uri(path))
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except (OSError, pa.ArrowInvalid) as err:
        raise BadInput(f"cannot read corpus file {path}: {err}") from err


def _from_table(spec: CorpusSpec, table: pa.Table, wanted: set[str]) -> RawColumns:
    if spec.limit is not None:
        table = table.slice(0, spec.limit)
    names = tuple(table.column_names)
    values = {name: table.column(name).to_pylist() for name in wanted if name in names}
    return RawColumns(fields=names, values=values, size=table.num_rows)


def read_jsonl(spec: CorpusSpec, wanted: set[str]) -> RawColumns:
    lines = _read_bytes(spec.path).decode("utf-8", errors="replace").splitlines()
    lines = [line for line in lines if line.strip()][: spec.limit]
    seen: dict[str, None] = {}
    values: dict[str, list[Any]] = {name: [] for name in wanted}
    broken: dict[int, str] = {}
    for row, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            record, broken[row] = {}, f"line {row + 1} is not valid JSON: {err.msg}"
        if not isinstance(record, dict):
            record, broken[row] = {}, broken.get(row, f"line {row + 1} is not a JSON object")
        seen.update(dict.fromkeys(record))
        for name in wanted:
            values[name].append(record.get(name))
    if lines and len(broken) == len(lines):
        raise BadInput(f"corpus {spec.path}: no line is a JSON object (first: {broken[0]})")
    return RawColumns(fields=tuple(seen), values=values, size=len(lines), broken=broken)


def _read_delimited(spec: CorpusSpec, wanted: set[str], delimiter: str) -> RawColumns:
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if delimiter == "," else False)
    convert = pacsv.ConvertOptions(strings_can_be_null=False, quoted_strings_can_be_null=False)
    try:
        table = pacsv.read_csv(io.BytesIO(_read_bytes(spec.path)), parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as err:
        raise BadInput(f"cannot parse corpus {spec.path}: {err}") from err
    return _from_table(spec, table, wanted)


def read_csv(spec: CorpusSpec, wanted: set[str]) -> RawColumns:
    return _read_delimited(spec, wanted, ",")


def read_tsv(spec: CorpusSpec, wanted: set[str]) -> RawColumns:
    return _read_delimited(spec, wanted, "\t")


def read_parquet(spec: CorpusSpec, wanted: set[str]) -> RawColumns:
    try:
        table = pq.read_table(pa.py_buffer(_read_bytes(spec.path)))
    except pa.ArrowInvalid as err:
        raise BadInput(f"cannot read Parquet corpus {spec.path}: {err}") from err
    return _from_table(spec, table, wanted)


def read_arrow(spec: CorpusSpec, wanted: set[str]) -> RawColumns:
    """An Arrow IPC file, or an IPC stream (what `datasets` writes)."""
    buffer = pa.py_buffer(_read_bytes(spec.path))
    try:
        table = pa.ipc.open_file(buffer).read_all()
    except pa.ArrowInvalid:
        try:
            table = pa.ipc.open_stream(buffer).read_all()
        except pa.ArrowInvalid as err:
            raise BadInput(f"corpus {spec.path} is neither an Arrow IPC file nor stream: {err}") from err
    return _from_table(spec, table, wanted)


def read_text(spec: CorpusSpec, wanted: set[str]) -> RawColumns:
    """Aligned plain text: line i of the source file and line i of the reference file are one row."""
    sources = _read_bytes(spec.path).decode("utf-8", errors="replace").splitlines()[: spec.limit]
    values: dict[str, list[Any]] = {spec.source_field: sources}
    if spec.reference_path:
        references = _read_bytes(spec.reference_path).decode("utf-8", errors="replace").splitlines()
        if spec.limit is None and len(references) != len(sources):
            raise BadInput(f"aligned text corpus: {spec.path} has {len(sources)} lines but "
                           f"{spec.reference_path} has {len(references)}")
        values[spec.reference_field or "reference"] = references[: len(sources)]
    return RawColumns(fields=tuple(values), values=values, size=len(sources))


def read_datasets_dir(spec: CorpusSpec, wanted: set[str]) -> RawColumns:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(Path(spec.path).expanduser()))
    except (OSError, ValueError) as err:
        raise BadInput(f"cannot load `datasets` directory {spec.path}: {err}") from err
    return _from_table(spec, _pick_split(spec, loaded).data.table, wanted)


def read_hub(spec: CorpusSpec, wanted: set[str]) -> RawColumns:
    import datasets

    try:
        loaded = datasets.load_dataset(spec.path, split=spec.split)
    except (OSError, ValueError) as err:  # ConnectionError (offline) is an OSError
        raise BadInput(f"cannot load hub dataset {spec.path!r} (split {spec.split!r}): {err}. "
                       "Offline (HF_DATASETS_OFFLINE=1), only datasets in the local cache can be used; "
                       "a local file or directory works everywhere.") from err
    return _from_table(spec, loaded.data.table, wanted)


def _pick_split(spec: CorpusSpec, loaded: Any) -> Any:
    if not hasattr(loaded, "keys"):  # a Dataset, not a DatasetDict
        return loaded
    if spec.split not in loaded:
        raise BadInput(f"{spec.path}: no split {spec.split!r} (splits: {', '.join(loaded.keys())}); "
                       "set corpus.split")
    return loaded[spec.split]


READERS: dict[str, Callable[[CorpusSpec, set[str]], RawColumns]] = {
    "jsonl": read_jsonl, "csv": read_csv, "tsv": read_tsv, "parquet": read_parquet, "arrow": read_arrow,
    "text": read_text, "datasets": read_datasets_dir, "hub": read_hub,
}
