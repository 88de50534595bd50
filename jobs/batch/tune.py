"""`cmsd-jobs tune`: measure and print the plan a job's actors would run (cmsd.tuning), without running a job.

It tunes in this process as one of the job's actors would (the same torch threads: the machine's CPUs shared by
execution.actors), on documents from the start of the corpus, for the largest batch the job's shards allow, and
keeps the plan on disk, where the job's actors on this machine find it and start at once.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.batch.rows import GoodRow, checked_rows
from jobs.batch.shards import shard_count
from jobs.batch.spec import JobSpec
from jobs.errors import BadInput


@dataclass(frozen=True)
class TunedCorpus:
    plan: dict[str, Any]  # cmsd.tuning.Plan.to_dict()
    path: Path  # where it is kept
    docs: int  # documents decoded to measure (0: a kept plan was reused)


def tune_corpus(spec: JobSpec, docs: int) -> TunedCorpus:
    import torch

    from cmsd import load_pair
    from cmsd.decode import encode_prompt
    from cmsd.tuning import load_plan, plan_key, plan_path, save_plan, tune
    from workers.prompts import split_by_length
    from workers.protocol import spread

    execution = spec.execution
    ahead = 2 * execution.actors * execution.shard_rows  # as the driver's shard_sizes looks ahead
    rows = [r for r in itertools.islice(checked_rows(spec.corpus, (spec.task.src_lang, spec.task.tgt_lang)), ahead)
            if isinstance(r, GoodRow)]
    if not rows:
        raise BadInput(f"{spec.corpus.path}: no row to tune on (every row read was refused; `cmsd-jobs submit` "
                       "records why in errors/)")
    max_batch = math.ceil(len(rows) / shard_count(len(rows), execution)) if len(rows) < ahead else \
        execution.shard_rows
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // execution.actors))  # an actor's share of this machine
    pair = load_pair(spec.models.target, spec.models.drafter, device=spec.models.device, dtype=spec.models.dtype,
                     load_format=spec.models.load_format)
    key = plan_key(pair, spec.decode, execution.objective, max_batch, spec.task.name)
    kept = load_plan(key)
    if kept is not None:
        return TunedCorpus(kept.to_dict(), plan_path(key), 0)
    template = spec.template()
    prompts = [encode_prompt(pair.tokenizer, template.render(pair.tokenizer, r.source, r.src_lang, r.tgt_lang))
               for r in rows]
    keep, _ = split_by_length(prompts, pair.max_context - spec.decode.max_new_tokens)  # the workers' rule
    fits = [(prompts[i], rows[i].id, rows[i].reference) for i in keep]
    if not fits:
        raise BadInput(f"{spec.corpus.path}: the first {len(rows)} documents are too long for the model with "
                       f"decode.max_new_tokens {spec.decode.max_new_tokens} added")
    picked = spread(len(fits), docs)  # as an actor spreads its sample over its shard, and confirms on the rest
    sample, rest = [fits[i] for i in picked], [f for i, f in enumerate(fits) if i not in set(picked)]
    tuned = tune(pair, spec.decode, [p for p, _, _ in sample], [i for _, i, _ in sample], execution.objective,
                 max_batch, [len(p) for p, _, _ in fits], spare=([p for p, _, _ in rest], [i for _, i, _ in rest]),
                 references=[r for _, _, r in sample])
    return TunedCorpus(tuned.plan.to_dict(), save_plan(key, tuned.plan),
                      len({i for _, i, _ in sample} | {g.doc_id for g in tuned.kept}))
