"""The Ray actor that holds one drafter/target pair and decodes whole shards.

The models are loaded once, in the constructor; torch, transformers and cmsd are imported there too, so that
importing this module (as the driver does) stays light. The driver wraps the class with `ray.remote`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

import pyarrow as pa

from workers.prompts import split_by_length
from workers.protocol import ShardOutcome, ShardTask, WorkerConfig, WorkerInfo, spread
from workers.records import result_table, trace_table
from workers.store import JobStore, checksum, read_ipc, result_path, shard_path, trace_path, worker_error_path


class ShardWorker:
    """Decodes shards of one job: read the shard, render and measure its prompts, decode the rows that fit in
    batches, then commit: the refused rows (errors/shard-NNNNN.worker.jsonl), the traces, the results last."""

    def __init__(self, config: WorkerConfig) -> None:
        start = time.perf_counter()
        import torch  # heavy imports here, in the actor process only

        from cmsd import Decoder, load_pair

        torch.set_num_threads(config.threads)
        self._pair = load_pair(target=config.target, drafter=config.drafter, device=config.device,
                               dtype=config.dtype, load_format=config.load_format)
        self._decoder = Decoder(self._pair, config.decode)
        if config.tune and self._pair.target.is_encoder_decoder:  # its pass costs are a decoder-only state's
            logging.getLogger(__name__).warning("an encoder-decoder target: no tuning, decoding as the spec says")
            config = replace(config, tune=None)
        if not config.tune:  # (a tuned actor's decoders are made, and measure what they need, once it has tuned)
            self._decoder.prepare()  # its one-time cost measurement: part of loading, never of a shard's decode time
        self._config = config
        self._ar: Decoder | None = None  # AR on the same target, for a shard's baseline documents
        self._plan = None  # the tuned plan (cmsd.tuning.Plan), once decided (config.tune)
        self._plan_report: dict | None = None  # ... sent with the next shard's outcome
        self._progress = (-1, 0)  # (shard, documents done) of the shard being decoded
        self._template = config.prompt
        self._budget = self._pair.max_context - config.decode.max_new_tokens  # prompt tokens a row may have
        self._store = JobStore(config.job_uri)
        self._info = WorkerInfo(pid=os.getpid(), node_id=_node_id(), device=str(self._pair.device),
                                load_s=time.perf_counter() - start, weights_mb=_weights_mb(self._pair))

    def info(self) -> WorkerInfo:
        return self._info

    def pid(self) -> int:
        return self._info.pid

    def progress(self) -> tuple[int, int]:
        """(shard, documents finished) of the shard being decoded; answered while run_shard runs (the actor runs
        two calls at once: max_concurrency=2)."""
        return self._progress

    def run_shard(self, task: ShardTask) -> ShardOutcome:
        from cmsd import DocStats  # already loaded by the constructor

        start = time.perf_counter()
        self._progress = (task.index, 0)  # not the counts of an earlier attempt
        shard = self._read_shard(task)
        io_s = time.perf_counter() - start
        prompts = self._decoder.encode([self._render(r) for r in
                                        shard.select(["source", "src_lang", "tgt_lang"]).to_pylist()])
        keep, refused = split_by_length(prompts, self._budget)
        t0 = time.perf_counter()
        self._write_refused(task, shard, refused)  # before the results: the commit accounts for them
        io_s += time.perf_counter() - t0
        shard = shard.take(pa.array(keep, pa.int64()))
        self._progress = (task.index, len(refused))
        t0 = time.perf_counter()
        generations, baseline = self._decode(task, [prompts[i] for i in keep], shard.column("id").to_pylist(),
                                             shard.column("reference").to_pylist())
        decode_s = time.perf_counter() - t0
        extra = {"shard": task.index, "attempt": task.attempt, "node_id": self._info.node_id}
        results = result_table(shard, generations, extra, refused=len(refused), baseline=baseline)
        traces = trace_table(generations)
        t0 = time.perf_counter()
        self._store.write_parquet(trace_path(task.index), traces)
        self._store.write_parquet(result_path(task.index), results)  # last: the commit
        io_s += time.perf_counter() - t0
        tuning, self._plan_report = self._plan_report, None  # reported with the first shard committed
        total = DocStats.total([g.stats for g in generations])
        return ShardOutcome(index=task.index, rows=results.num_rows, attempt=task.attempt,
                            node_id=self._info.node_id, pid=self._info.pid, decode_s=decode_s,
                            wall_s=time.perf_counter() - start, stats=total.to_dict(), peak_rss_mb=_peak_rss_mb(),
                            refused=len(refused), io_s=io_s, tuning=tuning)

    def _decode(self, task: ShardTask, prompts: list[list[int]], ids: list[str], references: list[str | None]
                ) -> tuple[list, dict]:
        """The shard's generations, and AR's generations of its task.baseline documents (spread over the shard,
        which is sorted by length): those are decoded as a group of their own, by the method and by AR one after
        the other, in an order that alternates from shard to shard. Before the actor's first shard it tunes
        (config.tune): the documents it decoded to tune keep those outputs, and the job's comparison with AR is the
        tuning's own (no document is decoded again for it)."""
        tuned = self._config.tune is not None
        kept = self._tune(prompts, ids, references) if tuned and self._plan is None and prompts else []
        if kept:
            done = {g.doc_id for g in kept}
            left = [i for i, doc in enumerate(ids) if doc not in done]
            prompts, ids = [prompts[i] for i in left], [ids[i] for i in left]
            self._progress = (task.index, self._progress[1] + len(kept))
        picked = spread(len(prompts), task.baseline if self._decoder.settings.drafts and not tuned else 0)
        chosen = set(picked)
        rest = [i for i in range(len(prompts)) if i not in chosen]
        generations = kept + self._generate(self._decoder, [prompts[i] for i in rest], [ids[i] for i in rest])
        if not picked:
            return generations, {}
        group = ([prompts[i] for i in picked], [ids[i] for i in picked])
        order = [self._decoder, self._ar_decoder()][::-1 if task.index % 2 else 1]
        first, second = (self._generate(decoder, *group) for decoder in order)
        own, ar = (first, second) if order[0] is self._decoder else (second, first)
        return generations + own, {g.doc_id: g for g in ar}

    def _generate(self, decoder, prompts: list[list[int]], ids: list[str]) -> list:
        if not prompts:
            return []
        shard = self._progress[0]

        def done(n: int) -> None:
            self._progress = (shard, self._progress[1] + n)

        return decoder.with_text(decoder.generate_ids(prompts, ids, progress=done if decoder is self._decoder else None))

    def _ar_decoder(self):
        if self._ar is None:
            self._ar = self._decoder_for(self._config.decode.with_(method="ar", trace=False))
        return self._ar

    def _decoder_for(self, settings, pair=None, costs=None):
        from cmsd import Decoder, ModelPair

        pair = pair or self._pair
        decoder = Decoder(pair if settings.drafts else ModelPair(pair.target, None), settings, costs)
        decoder.prepare()
        return decoder

    def _tune(self, prompts: list[list[int]], ids: list[str], references: list[str | None]) -> list:
        """Decide the plan: the one kept on this machine for this job's settings, or one measured now on a sample of
        this shard, confirmed on more of its documents (cmsd.tuning); returns the generations decoded to measure it
        (the documents' outputs)."""
        from cmsd.tuning import load_plan, pair_for, plan_key, save_plan, tune

        conf, decode = self._config.tune, self._config.decode
        key = plan_key(self._pair, decode, conf.objective, conf.max_batch, conf.task)
        plan, kept = load_plan(key), []
        if plan is None:
            sample = spread(len(prompts), conf.sample)
            rest = [i for i in range(len(prompts)) if i not in set(sample)]
            tuned = tune(self._pair, decode, [prompts[i] for i in sample], [ids[i] for i in sample], conf.objective,
                         conf.max_batch, [len(p) for p in prompts], docs=conf.docs,
                         spare=([prompts[i] for i in rest], [ids[i] for i in rest]),
                         references=[references[i] for i in sample])
            plan, kept = tuned.plan, self._decoder.with_text(tuned.kept)
            try:
                save_plan(key, plan)
            except OSError as err:
                logging.getLogger(__name__).warning("cannot keep the tuned plan: %s", err)
        self._plan, self._plan_report = plan, plan.to_dict()
        best = plan.best  # its drafter, where it drafts with another than the job's own (loaded by name)
        self._decoder = self._decoder_for(plan.settings(decode), pair_for(self._pair, best.drafter) if
                                          best.method != "ar" else None, plan.pass_costs)
        return kept

    def _render(self, row: dict[str, str | None]) -> str:
        return self._template.render(self._pair.tokenizer, row["source"] or "", row["src_lang"], row["tgt_lang"])

    def _write_refused(self, task: ShardTask, shard: pa.Table, refused: dict[int, str]) -> None:
        """The rows too long for the model, as error records (row, id, reason) like the driver's."""
        if refused:
            rows, ids = shard.column("row").to_pylist(), shard.column("id").to_pylist()
            self._store.write_jsonl(worker_error_path(task.index),
                                    [{"row": rows[i], "id": ids[i], "reason": why} for i, why in refused.items()])

    def _read_shard(self, task: ShardTask) -> pa.Table:
        data = self._store.read_bytes(shard_path(task.index))
        if checksum(data) != task.checksum:
            raise ValueError(f"{shard_path(task.index)}: checksum {checksum(data)} != manifest {task.checksum}")
        shard = read_ipc(data)
        if shard.num_rows != task.rows:
            raise ValueError(f"{shard_path(task.index)}: {shard.num_rows} rows, manifest says {task.rows}")
        return shard


def _weights_mb(pair) -> float:
    models = [pair.target.model] + ([pair.drafter.model] if hasattr(pair.drafter, "model") else [])
    tensors = [t for m in models for t in [*m.parameters(), *m.buffers()]]
    return sum({t.data_ptr(): t.nbytes for t in tensors}.values()) / 2**20  # tied weights counted once


def _peak_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
