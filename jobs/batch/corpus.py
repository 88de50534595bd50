"""Corpus readers: JSON Lines, CSV/TSV, Parquet, Arrow, a `datasets` directory, aligned text files, a hub name.

Every format is read as a stream of batches of at most `batch_rows` rows (pyarrow's streaming readers, JSON Lines
in byte blocks), so that what a reader holds is a few batches, whatever the corpus's size. Each batch gives, for
the fields a job needs, one value per row (whatever type the file holds; rows are checked later, one by one); a
JSON line that cannot be parsed is a broken row with its line number, not a failure of the whole read. A corpus
that cannot be opened, or that lacks a field the spec names, is a BadInput naming the file and the field; so is
one that fails part way (a CSV row pyarrow cannot parse, aligned text files of different lengths).

The field names are those of the file's schema, or, for JSON Lines and hub datasets, those of the first batch.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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
BATCH_ROWS = 4096  # the most rows one batch holds
BLOCK_BYTES = 1 << 22  # JSON Lines and text files are read this many bytes at a time


@dataclass(frozen=True)
class Rows:
    """Consecutive rows of a corpus, field by field: corpus rows start, start + 1, ..., start + size - 1."""

    start: int
    sources: list[Any]
    references: list[Any] | None  # None: the corpus has no reference field
    ids: list[Any] | None  # None: the corpus has no id field
    langs: dict[str, list[Any]]  # src_lang / tgt_lang columns when present
    broken: dict[int, str]  # corpus row -> why it could not be parsed

    @property
    def size(self) -> int:
        return len(self.sources)


@dataclass(frozen=True)
class Corpus(Rows):
    """A whole corpus in memory (a small one: evaluations, calibration, distillation)."""

    origin: str
    spec: CorpusSpec  # with reference_field and id_field resolved


@dataclass(frozen=True)
class CorpusStream:
    """An open corpus: its fields, resolved, and its rows batch by batch (read once, in corpus order)."""

    spec: CorpusSpec  # with reference_field and id_field resolved (None: the corpus has none)
    format: str
    fields: tuple[str, ...]
    batches: Iterator[Rows]


@dataclass(frozen=True)
class _Batch:
    """What a format's reader yields: field names, the wanted fields' values, rows that could not be parsed."""

    fields: tuple[str, ...]
    values: dict[str, list[Any]]
    size: int
    broken: dict[int, str] = field(default_factory=dict)  # row within the batch -> reason


def open_corpus(spec: CorpusSpec, batch_rows: int | None = None) -> CorpusStream:
    """Open the corpus and read its first batch (a corpus that cannot be read fails here, as a BadInput).

    batch_rows: the most rows a batch holds (BATCH_ROWS by default)."""
    fmt = detect_format(spec)
    wanted = {spec.source_field, spec.reference_field or "reference", spec.id_field or "id", *LANG_FIELDS}
    raw = READERS[fmt](spec, wanted, batch_rows or BATCH_ROWS)
    first = next(raw, None)
    fields = first.fields if first else ()
    resolved = _resolve(spec, fields)
    batches = itertools.chain([first], raw) if first else iter(())
    return CorpusStream(spec=resolved, format=fmt, fields=fields, batches=_rows(resolved, fields, batches))


def read_corpus(spec: CorpusSpec) -> Corpus:
    """The whole corpus (up to spec.limit rows) in memory, as one Rows."""
    stream = open_corpus(spec)
    parts = list(stream.batches)

    def joined(name: str, present: bool = True) -> list[Any] | None:
        return [v for p in parts for v in getattr(p, name)] if present else None

    resolved = stream.spec
    return Corpus(start=0, sources=joined("sources") or [],
                  references=joined("references", resolved.reference_field is not None),
                  ids=joined("ids", resolved.id_field is not None),
                  langs={k: [v for p in parts for v in p.langs[k]] for k in LANG_FIELDS if k in stream.fields},
                  broken={row: why for p in parts for row, why in p.broken.items()}, origin=spec.path, spec=resolved)


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


def _resolve(spec: CorpusSpec, fields: tuple[str, ...]) -> CorpusSpec:
    def pick(explicit: str | None, default: str, flag: str) -> str | None:
        if explicit is not None and explicit not in fields:
            raise BadInput(f"corpus {spec.path}: no field {explicit!r} (fields: {', '.join(fields)}); set {flag}")
        return explicit or (default if default in fields else None)

    pick(spec.source_field, spec.source_field, "--source-field")
    return replace(spec, reference_field=pick(spec.reference_field, "reference", "--reference-field"),
                   id_field=pick(spec.id_field, "id", "--id-field"))


def _rows(spec: CorpusSpec, fields: tuple[str, ...], batches: Iterator[_Batch]) -> Iterator[Rows]:
    """Rows numbered from 0 across batches, cut at spec.limit; per-row languages where `fields` has them."""
    start = 0
    for batch in batches:
        size = batch.size if spec.limit is None else min(batch.size, spec.limit - start)

        def column(name: str | None) -> list[Any] | None:
            return None if name is None else batch.values.get(name, [None] * batch.size)[:size]

        yield Rows(start=start, sources=column(spec.source_field) or [], references=column(spec.reference_field),
                   ids=column(spec.id_field), langs={k: column(k) or [] for k in LANG_FIELDS if k in fields},
                   broken={start + i: why for i, why in batch.broken.items() if i < size})
        start += size
        if spec.limit is not None and start >= spec.limit:
            return


@contextmanager
def _input(path: str, random_access: bool = False) -> Iterator[Any]:
    """A pyarrow input stream (or file) over a local path or URI; OSError becomes BadInput."""
    try:
        fs, inner = pafs.FileSystem.from_uri(normalize_uri(path))
        handle = fs.open_input_file(inner) if random_access else fs.open_input_stream(inner)
    except (OSError, pa.ArrowInvalid) as err:
        raise BadInput(f"cannot read corpus file {path}: {err}") from err
    with handle:
        yield handle


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for every line of a file, read in blocks of BLOCK_BYTES."""
    number, rest = 0, b""
    with _input(path) as stream:
        while block := stream.read(BLOCK_BYTES):
            *complete, rest = (rest + block).split(b"\n")
            for line in complete:
                number += 1
                yield number, line.decode("utf-8", errors="replace").rstrip("\r")
    if rest:
        yield number + 1, rest.decode("utf-8", errors="replace").rstrip("\r")


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def read_jsonl(spec: CorpusSpec, wanted: set[str], batch_rows: int) -> Iterator[_Batch]:
    """One JSON object a line (blank lines skipped); a bad line is a broken row naming its line number."""
    lines = ((n, text) for n, text in _lines(spec.path) if text.strip())
    for index, chunk in enumerate(_chunks(lines, batch_rows)):
        seen: dict[str, None] = {}
        values: dict[str, list[Any]] = {name: [] for name in wanted}
        broken: dict[int, str] = {}
        for row, (number, text) in enumerate(chunk):
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                record, broken[row] = {}, f"line {number} is not valid JSON: {err.msg}"
            if not isinstance(record, dict):
                record, broken[row] = {}, broken.get(row, f"line {number} is not a JSON object")
            seen.update(dict.fromkeys(record))
            for name in wanted:
                values[name].append(record.get(name))
        if index == 0 and len(broken) == len(chunk):
            raise BadInput(f"corpus {spec.path}: no line is a JSON object ({len(chunk)} read; first: {broken[0]})")
        yield _Batch(fields=tuple(seen), values=values, size=len(chunk), broken=broken)


def _arrow_batches(spec: CorpusSpec, parts: Iterable[pa.RecordBatch | pa.Table], wanted: set[str],
                   batch_rows: int) -> Iterator[_Batch]:
    """Record batches (or tables) of any size, cut into batches of at most batch_rows rows."""
    try:
        for part in parts:
            for offset in range(0, part.num_rows, batch_rows):
                piece = part.slice(offset, batch_rows)
                names = tuple(piece.schema.names)
                values = {name: piece.column(name).to_pylist() for name in wanted if name in names}
                yield _Batch(fields=names, values=values, size=piece.num_rows)
    except (OSError, pa.ArrowInvalid) as err:
        raise BadInput(f"cannot read corpus {spec.path}: {err}") from err


def _read_delimited(spec: CorpusSpec, wanted: set[str], batch_rows: int, delimiter: str) -> Iterator[_Batch]:
    """Every column read as text (a CSV has no types); only the wanted columns are parsed."""
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if delimiter == "," else False)

    def reader(stream: Any, columns: list[str] | None) -> pacsv.CSVStreamingReader:
        convert = pacsv.ConvertOptions(strings_can_be_null=False, quoted_strings_can_be_null=False,
                                       include_columns=columns, column_types=dict.fromkeys(columns or [], pa.string()))
        try:
            return pacsv.open_csv(stream, parse_options=parse, convert_options=convert)
        except pa.ArrowInvalid as err:
            raise BadInput(f"cannot parse corpus {spec.path}: {err}") from err

    with _input(spec.path) as stream:
        names = reader(stream, None).schema.names  # the header
    with _input(spec.path) as stream:
        batches = reader(stream, [n for n in names if n in wanted])
        for batch in _arrow_batches(spec, batches, wanted, batch_rows):
            yield replace(batch, fields=tuple(names))


def read_csv(spec: CorpusSpec, wanted: set[str], batch_rows: int) -> Iterator[_Batch]:
    return _read_delimited(spec, wanted, batch_rows, ",")


def read_tsv(spec: CorpusSpec, wanted: set[str], batch_rows: int) -> Iterator[_Batch]:
    return _read_delimited(spec, wanted, batch_rows, "\t")


def read_parquet(spec: CorpusSpec, wanted: set[str], batch_rows: int) -> Iterator[_Batch]:
    with _input(spec.path, random_access=True) as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except pa.ArrowInvalid as err:
            raise BadInput(f"cannot read Parquet corpus {spec.path}: {err}") from err
        columns = [n for n in parquet.schema_arrow.names if n in wanted]
        yield from _arrow_batches(spec, parquet.iter_batches(batch_size=batch_rows, columns=columns), wanted,
                                  batch_rows)


def read_arrow(spec: CorpusSpec, wanted: set[str], batch_rows: int) -> Iterator[_Batch]:
    """An Arrow IPC file, or an IPC stream (what `datasets` writes)."""
    with _input(spec.path, random_access=True) as handle:
        try:
            reader = pa.ipc.open_file(handle)
            parts: Iterable[pa.RecordBatch] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            handle.seek(0)
            try:
                parts = pa.ipc.open_stream(handle)
            except pa.ArrowInvalid as err:
                raise BadInput(f"corpus {spec.path} is neither an Arrow IPC file nor stream: {err}") from err
        yield from _arrow_batches(spec, parts, wanted, batch_rows)


def read_text(spec: CorpusSpec, wanted: set[str], batch_rows: int) -> Iterator[_Batch]:
    """Aligned plain text: line i of the source file and line i of the reference file are one row."""
    ref_name = spec.reference_field or "reference"
    fields = (spec.source_field, ref_name) if spec.reference_path else (spec.source_field,)
    sources = (text for _, text in _lines(spec.path))
    pairs: Iterable[tuple[str | None, ...]] = (
        itertools.zip_longest(sources, (text for _, text in _lines(spec.reference_path)))
        if spec.reference_path else ((s,) for s in sources))
    for index, chunk in enumerate(_chunks(pairs, batch_rows)):
        uneven = next((i for i, pair in enumerate(chunk) if None in pair), None)
        if uneven is not None:
            paths = (spec.path, spec.reference_path)
            longer, shorter = paths if chunk[uneven][1] is None else paths[::-1]
            raise BadInput(f"aligned text corpus: {longer} has a line {index * batch_rows + uneven + 1} but "
                           f"{shorter} has {index * batch_rows + uneven} lines")
        yield _Batch(fields=fields, values={name: [p[i] for p in chunk] for i, name in enumerate(fields)},
                     size=len(chunk))


def read_datasets_dir(spec: CorpusSpec, wanted: set[str], batch_rows: int) -> Iterator[_Batch]:
    """A directory written by `datasets` (save_to_disk): its Arrow files, memory-mapped, batch by batch."""
    import datasets

    try:
        loaded = _pick_split(spec, datasets.load_from_disk(str(Path(spec.path).expanduser())))
    except (OSError, ValueError) as err:
        raise BadInput(f"cannot load `datasets` directory {spec.path}: {err}") from err
    loaded = loaded.select_columns([n for n in loaded.column_names if n in wanted])
    yield from _arrow_batches(spec, loaded.with_format("arrow").iter(batch_size=batch_rows), wanted, batch_rows)


def read_hub(spec: CorpusSpec, wanted: set[str], batch_rows: int) -> Iterator[_Batch]:
    """A hub dataset, streamed (`datasets` streaming: nothing downloaded up front)."""
    import datasets

    try:
        loaded = datasets.load_dataset(spec.path, split=spec.split, streaming=True)
        for part in loaded.iter(batch_size=batch_rows):
            values = {name: part[name] for name in wanted if name in part}
            yield _Batch(fields=tuple(part), values=values, size=len(next(iter(part.values()), [])))
    except (OSError, ValueError) as err:  # ConnectionError (offline) is an OSError
        raise BadInput(f"cannot load hub dataset {spec.path!r} (split {spec.split!r}): {err}. "
                       "Offline (HF_DATASETS_OFFLINE=1), only datasets in the local cache can be used; "
                       "a local file or directory works everywhere.") from err


def _pick_split(spec: CorpusSpec, loaded: Any) -> Any:
    if not hasattr(loaded, "keys"):  # a Dataset, not a DatasetDict
        return loaded
    if spec.split not in loaded:
        raise BadInput(f"{spec.path}: no split {spec.split!r} (splits: {', '.join(loaded.keys())}); "
                       "set corpus.split")
    return loaded[spec.split]


READERS: dict[str, Callable[[CorpusSpec, set[str], int], Iterator[_Batch]]] = {
    "jsonl": read_jsonl, "csv": read_csv, "tsv": read_tsv, "parquet": read_parquet, "arrow": read_arrow,
    "text": read_text, "datasets": read_datasets_dir, "hub": read_hub,
}
