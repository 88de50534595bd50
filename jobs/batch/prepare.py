"""Creating a job: check what can be checked up front (spec, prompt, models, that the corpus opens and has its
fields), then stream the corpus into the job directory.

`prepare` reads the corpus's first batch only and writes nothing; any problem is a BadInput (exit code 2).
`create_job` reads the corpus once (twice when execution.shards is set: a first pass counts the good rows),
checking every row and writing each shard and its errors file as it fills, then spec.yaml and manifest.json
last. A BadInput found part way (a corpus with no decodable row, a CSV row pyarrow cannot parse) removes the
job directory it had begun, so that bad input still leaves nothing behind.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.batch.corpus import open_corpus
from jobs.errors import BadInput
from jobs.batch.manifest import MANIFEST, SPEC, Manifest, ShardEntry, code_versions
from jobs.batch.models import check_models
from jobs.batch.rows import GoodRow, checked_rows
from jobs.batch.shards import ShardWriter, shard_sizes
from jobs.batch.spec import JobSpec
from workers.store import JobStore, StoreError, check_store, normalize_uri


@dataclass(frozen=True)
class PreparedJob:
    spec: JobSpec  # resolved: corpus fields, drafter (None for AR), job id
    format: str  # the corpus's format
    models: dict[str, Any]  # model versions (for the manifest)

    @property
    def job_uri(self) -> str:
        return f"{normalize_uri(self.spec.output.dir)}/{self.spec.output.job_id}"


def prepare(spec: JobSpec) -> PreparedJob:
    """Check the output location, the prompt, the models and the corpus's first batch and fields. Writes nothing."""
    try:  # an object store that cannot be reached or written fails here, before the corpus is read
        check_store(spec.output.dir)
    except StoreError as err:
        raise BadInput(f"--out {err}") from None
    if spec.decode.method == "ar":
        spec = spec.with_("models", drafter=None)  # AR decodes with the target alone
    template = spec.template()
    stream = open_corpus(spec.corpus)
    checked = check_models(spec.models, spec.decode)
    try:  # a template naming a field it does not have fails here, not in every worker
        template.render(checked.tokenizer, "text", spec.task.src_lang, spec.task.tgt_lang)
    except (KeyError, IndexError, ValueError) as err:
        raise BadInput(f"prompt: template {spec.prompt.template!r} cannot be rendered: {err!r}") from err
    spec = spec.with_("corpus", reference_field=stream.spec.reference_field, id_field=stream.spec.id_field)
    spec = spec.with_("output", job_id=spec.output.job_id or _job_id(spec))
    return PreparedJob(spec=spec, format=stream.format, models=checked.versions)


def create_job(prepared: PreparedJob) -> tuple[JobStore, JobSpec, Manifest]:
    """Write the job directory: shards/ and errors/ as the corpus streams by, spec.yaml, manifest.json last."""
    store = JobStore(prepared.job_uri)
    if store.exists(MANIFEST):
        raise BadInput(f"job directory {store.uri} already holds a job: use `cmsd-jobs resume {store.uri}`")
    fresh = not store.exists()
    try:
        writer = _write_shards(store, prepared.spec)
    except BadInput:
        if fresh and store.exists():
            store.delete()
        raise
    spec = prepared.spec.with_("execution", shards=len(writer.entries))
    store.write_bytes(SPEC, spec.to_yaml().encode())
    corpus = {"path": spec.corpus.path, "format": prepared.format, "rows": writer.rows_read, "good": writer.good,
              "bad": writer.bad}
    manifest = Manifest(job_id=spec.output.job_id or "", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        corpus=corpus, shards=tuple(ShardEntry(**e) for e in writer.entries),
                        models=prepared.models, code=code_versions())
    store.write_json(MANIFEST, manifest.to_dict())
    return store, spec, manifest


def _write_shards(store: JobStore, spec: JobSpec) -> ShardWriter:
    langs = (spec.task.src_lang, spec.task.tgt_lang)

    def count() -> int:  # the counting pass, when execution.shards asks for nearly equal shards
        return sum(isinstance(row, GoodRow) for row in checked_rows(spec.corpus, langs))

    sizes, rows = shard_sizes(spec.execution, checked_rows(spec.corpus, langs), count)
    writer = ShardWriter(store, sizes)
    writer.add_all(rows)
    writer.finish()
    if not writer.entries:
        first = f"; first: row {writer.first_bad.row}: {writer.first_bad.reason}" if writer.first_bad else ""
        raise BadInput(f"corpus {spec.corpus.path}: no row can be decoded ({writer.bad} refused{first})")
    return writer


def _job_id(spec: JobSpec) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "-", Path(spec.corpus.path.rstrip("/")).name.split(".")[0]).strip("-")
    method = spec.decode.method.replace("+", "-")
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{stem or 'corpus'}-{method}-{secrets.token_hex(2)}"
