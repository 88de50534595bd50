"""Creating a job: check everything first (spec, corpus, models, rows), then write the job directory.

`prepare` reads and checks but writes nothing; any problem is a BadInput (exit code 2). `create_job` writes
spec.yaml, the shards and errors files, and manifest.json last.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.batch.corpus import Corpus, detect_format, read_corpus
from jobs.errors import BadInput
from jobs.batch.manifest import MANIFEST, SPEC, Manifest, ShardEntry, code_versions
from jobs.batch.models import check_models
from jobs.batch.rows import check_rows
from jobs.batch.shards import ShardPlan, plan_shards, shard_count, write_shards
from jobs.batch.spec import JobSpec
from workers.store import JobStore, normalize_uri


@dataclass(frozen=True)
class PreparedJob:
    spec: JobSpec  # resolved: corpus fields, drafter (None for AR), shard count, job id
    plans: list[ShardPlan]
    corpus: dict[str, Any]  # path, format, rows, good, bad (for the manifest)
    models: dict[str, Any]  # model versions (for the manifest)

    @property
    def job_uri(self) -> str:
        return f"{normalize_uri(self.spec.output.dir)}/{self.spec.output.job_id}"


def prepare(spec: JobSpec) -> PreparedJob:
    """Read the corpus, check the models and every row, plan the shards. Writes nothing."""
    from cmsd import PromptTemplate

    if spec.decode.method == "ar":
        spec = spec.with_("models", drafter=None)  # AR decodes with the target alone
    try:
        template = PromptTemplate(task=spec.task.name, template=spec.prompt.template, chat=spec.prompt.chat,
                                  system=spec.prompt.system)
    except ValueError as err:
        raise BadInput(f"prompt: {err}") from err
    corpus = read_corpus(spec.corpus)
    checked = check_models(spec.models, spec.decode)
    tokenizer = checked.tokenizer

    def render(source: str, src_lang: str | None, tgt_lang: str | None) -> str:
        return template.render(tokenizer, source, src_lang, tgt_lang)

    def count(prompts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]

    budget = checked.max_context - spec.decode.max_new_tokens
    good, bad = check_rows(corpus, render, count, budget, (spec.task.src_lang, spec.task.tgt_lang))
    if not good:
        first = f"; first: row {bad[0].row}: {bad[0].reason}" if bad else ""
        raise BadInput(f"corpus {spec.corpus.path}: no row can be decoded ({len(bad)} refused{first})")
    n_shards = shard_count(len(good), spec.execution)
    spec = spec.with_("execution", shards=n_shards).with_("output", job_id=spec.output.job_id or _job_id(spec))
    spec = _with_corpus_fields(spec, corpus)
    info = {"path": spec.corpus.path, "format": detect_format(spec.corpus), "rows": corpus.size,
            "good": len(good), "bad": len(bad)}
    return PreparedJob(spec=spec, plans=plan_shards(good, bad, n_shards), corpus=info, models=checked.versions)


def create_job(prepared: PreparedJob) -> tuple[JobStore, Manifest]:
    """Write the job directory: spec.yaml, shards/, errors/, and manifest.json last."""
    store = JobStore(prepared.job_uri)
    if store.exists(MANIFEST):
        raise BadInput(f"job directory {store.uri} already holds a job: use `cmsd-jobs resume {store.uri}`")
    store.write_bytes(SPEC, prepared.spec.to_yaml().encode())
    entries = write_shards(store, prepared.plans)
    manifest = Manifest(job_id=prepared.spec.output.job_id or "", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        corpus=prepared.corpus, shards=tuple(ShardEntry(**e) for e in entries),
                        models=prepared.models, code=code_versions())
    store.write_json(MANIFEST, manifest.to_dict())
    return store, manifest


def _with_corpus_fields(spec: JobSpec, corpus: Corpus) -> JobSpec:
    return spec.with_("corpus", reference_field=corpus.spec.reference_field, id_field=corpus.spec.id_field)


def _job_id(spec: JobSpec) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "-", Path(spec.corpus.path.rstrip("/")).name.split(".")[0]).strip("-")
    method = spec.decode.method.replace("+", "-")
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{stem or 'corpus'}-{method}-{secrets.token_hex(2)}"
