"""Distilled drafters (`cmsd-jobs distill`): build a drafter for a target that has no small sibling sharing its tokenizer.

    cmsd-jobs distill --target smollm2 --corpus xsum.jsonl --corpus wmt21_en_de.jsonl --out drafters/smollm2-2l

Per corpus, the first --holdout rows are held out (the evaluation suites decode the first rows, so a drafter
measured there has not seen them); the next --docs rows are decoded by the target (greedy) and the next
--text-docs rows are used as text (prompt + reference). The target's top-k next-token probabilities over those
sequences are computed once; the drafter (cmsd.train.distill) trains on them with a progress bar, checkpointing to
OUT/work so an interrupted run resumes where it stopped. At the end, a held-out check on --eval-docs rows of each
corpus: top-1 agreement with the target on its own continuations and the tokens per target call at k = 4.

OUT is an ordinary Hugging Face model directory (plus draft_vocab.json and a README.md card), usable as
`--drafter OUT` anywhere.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jobs.errors import BadInput


@dataclass
class Sequences:
    ids: list[list[int]]
    answer_starts: list[int]


@dataclass(frozen=True)
class DistillJob:
    """What `cmsd-jobs distill` was asked: its options, whose defaults and help are in jobs/cli/train.py (one place)."""

    target: str
    kind: str  # model: a small model that drafts alone; head: a feature head on the target's features
    corpora: tuple[str, ...]
    out: Path  # the drafter directory; OUT/work keeps the stages and the checkpoint
    layers: int | None  # model: the target's first layers-1 and its last (default 2); head: its layers (default 1)
    steps: int
    minutes: float | None  # stop training after this long, whatever `steps` says
    draft_vocab: int  # 0 = the full vocabulary
    task: str
    holdout: int  # first rows of each corpus kept out of training
    docs: int  # rows per corpus the target decodes (its own outputs)
    text_docs: int  # further rows per corpus used as prompt + reference
    eval_docs: int  # held-out rows per corpus scored at the end
    new_tokens: int
    seq_len: int
    batch_tokens: int
    lr: float
    top_k: int
    device: str
    seed: int
    command: str = "cmsd-jobs distill"  # the command line that reproduces the run (for the card)


def run_distill(job: DistillJob) -> str:
    """Distill a small drafter sharing the target's tokenizer from the target's own predictions into `job.out`;
    returns its model card. Progress and stages go to stderr."""
    import torch

    from cmsd import ModelError, load_pair
    from cmsd.decode import eos_ids
    from cmsd.train.data import TeacherData, draft_vocabulary, teacher_targets
    from cmsd.train.distill import evaluate, init_drafter, save_drafter, train
    from cmsd.train.loop import DistillSettings

    head_kind = job.kind == "head"
    target, corpora, out, steps = job.target, job.corpora, job.out, job.steps
    layers = job.layers or (1 if head_kind else 2)
    task, holdout, docs, text_docs, eval_docs = job.task, job.holdout, job.docs, job.text_docs, job.eval_docs
    new_tokens, seq_len, top_k, draft_vocab = job.new_tokens, job.seq_len, job.top_k, job.draft_vocab
    try:
        settings = DistillSettings(layers=layers, draft_vocab=draft_vocab, steps=steps, batch_tokens=job.batch_tokens,
                                   lr=job.lr, top_k=top_k, seed=job.seed, minutes=job.minutes)
    except ValueError as err:
        raise BadInput(str(err)) from err
    if new_tokens >= seq_len - 32:
        raise BadInput(f"--new-tokens {new_tokens} leaves no room for a prompt in --seq-len {seq_len}")
    started = time.perf_counter()
    torch.manual_seed(job.seed)
    try:
        pair = load_pair(target, "ngram", device=job.device, dtype="float32")
    except ModelError as err:
        raise BadInput(str(err)) from err
    tok = pair.tokenizer
    total = pair.target.model.config.num_hidden_layers
    if not 1 <= layers < total:
        raise BadInput(f"--layers must be between 1 and {total - 1}")
    if head_kind:
        from cmsd.drafters.head import check_head_target

        try:
            check_head_target(pair.target.model)
        except ModelError as err:
            raise BadInput(str(err)) from err
    rows = {path: _rows(path, task, tok, holdout + docs + text_docs, seq_len - new_tokens) for path in corpora}
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    say = _say(started)
    stage_seconds: dict[str, float] = {}  # each stage's time, whichever run of this command spent it
    reused: set[str] = set()  # the stages an earlier run did

    def stage(name: str, build) -> TeacherData:  # each stage's data is kept in OUT/work: a rerun resumes
        path, timing = work / f"{name}.pt", work / f"{name}.seconds"
        if path.is_file():
            say(f"{name}: reusing {path}")
            stage_seconds[name] = float(timing.read_text()) if timing.is_file() else 0.0
            reused.add(name)
            return TeacherData.load(path)
        began = time.perf_counter()
        seqs = build()
        with _bar(sum(len(s) for s in seqs.ids), f"{name}: target distributions", "tok") as bar:
            data = teacher_targets(pair.target.model, seqs.ids, seqs.answer_starts, top_k,
                                   progress=bar.update, features=head_kind)
        data.save(path)
        stage_seconds[name] = time.perf_counter() - began
        timing.write_text(str(stage_seconds[name]))
        return data

    def generated(part: slice) -> Sequences:
        prompts = [p for r in rows.values() for p, _ in r[part]]
        return _generate(pair, prompts, new_tokens, say)

    def texts(part: slice) -> Sequences:
        pairs = [(p, tok(ref, add_special_tokens=False)["input_ids"][:new_tokens]) for r in rows.values()
                 for p, ref in r[part] if ref]
        return Sequences([p + r for p, r in pairs], [len(p) for p, _ in pairs])

    held_rows = slice(0, min(eval_docs, holdout))
    held = stage("heldout", lambda: generated(held_rows))
    gen = stage("generated", lambda: generated(slice(holdout, holdout + docs)))
    text = stage("text", lambda: texts(slice(holdout + docs, holdout + docs + text_docs)))
    data = gen + text
    started -= sum(stage_seconds[name] for name in reused)  # a resumed run's total includes its earlier runs'
    if not data.seqs:
        raise BadInput("no training rows: the corpora have no rows after the held-out ones")
    vocab = draft_vocabulary(data, draft_vocab, pair.target.model.config.vocab_size, eos_ids(pair.target))
    say(f"training on {data.tokens} tokens ({len(data.seqs)} sequences), draft vocabulary {len(vocab)} ids")
    if head_kind:
        return _train_head(job, pair, data, held, vocab, settings, layers, rows, held_rows, work, started,
                           stage_seconds, say)
    student = init_drafter(pair.target.model, layers)
    before = evaluate(student, vocab, held)
    say(f"before training: held-out agreement {before.agreement:.3f}, tokens/call at k=4 "
        f"{before.tokens_per_call:.2f}, KL {before.kl:.3f}")
    state, earlier = _train(steps, lambda progress: train(student, data, vocab, settings, progress,
                                                 checkpoint=work / "checkpoint.pt"))
    after = evaluate(student, vocab, held)
    say(f"after {state.step} steps: held-out agreement {after.agreement:.3f}, tokens/call at k=4 "
        f"{after.tokens_per_call:.2f}, KL {after.kl:.3f}, draft-vocabulary coverage {after.coverage:.3f}")
    per_corpus = _per_corpus(rows, held_rows, held, lambda part: asdict(evaluate(student, vocab, part)))
    meta = {**_meta(job, layers, state, data, settings, started - earlier, stage_seconds),
            "heldout_before": asdict(before),
            "heldout": asdict(after), "heldout_per_corpus": per_corpus}
    card = _card(meta, len(vocab))
    save_drafter(student, tok, vocab, out, card, meta)
    (out / "distill.json").write_text(json.dumps(meta, indent=2))
    return card


def _train(steps: int, run):
    """Run `run(progress)` under a training progress bar; returns its TrainState and the seconds of training that
    earlier (interrupted) runs did before it resumed."""
    began = time.perf_counter()
    with _bar(steps, "training", "step") as bar:
        def step(n: int, shown: dict[str, float]) -> None:
            bar.set_postfix(shown, refresh=False)
            bar.update(n)

        state = run(step)
    return state, max(0.0, state.seconds - (time.perf_counter() - began))


def _per_corpus(rows: dict, held_rows: slice, held, score) -> dict:
    """score(part) of each corpus's held-out sequences (they are in corpus order)."""
    out, start = {}, 0
    for path, corpus_rows in rows.items():
        count = len(corpus_rows[held_rows])
        out[path] = score(held.part(start, start + count))
        start += count
    return out


def _meta(job: DistillJob, layers: int, state, data, settings, started: float, stages: dict) -> dict:
    return {"target": job.target, "kind": job.kind, "corpora": list(job.corpora), "layers": layers,
            "steps": state.step, "train_tokens": data.tokens, "train_sequences": len(data.seqs),
            "train_minutes": state.seconds / 60, "total_minutes": (time.perf_counter() - started) / 60,
            "stage_minutes": {name: seconds / 60 for name, seconds in stages.items()},
            "settings": asdict(settings), "command": job.command,
            "loss_first": state.losses[0] if state.losses else None,
            "loss_last": sum(state.losses[-20:]) / len(state.losses[-20:]) if state.losses else None}


def _train_head(job: DistillJob, pair, data, held, vocab, settings, layers: int, rows: dict, held_rows: slice,
                work: Path, started: float, stage_seconds: dict, say) -> str:
    """The feature-head branch of run_distill: train, score held out (teacher forced, and decoding the held-out
    prompts with the head: tokens per target call), save the head directory."""
    from cmsd.drafters.head import FeatureHead
    from cmsd.train.head import evaluate_head, save_head, train_head

    head = FeatureHead(pair.target.model, layers, vocab, name=str(job.out))
    before = evaluate_head(head, held)
    say(f"before training: held-out first-token acceptance {before.acceptance:.3f}, KL {before.kl:.3f}")
    state, earlier = _train(job.steps, lambda progress: train_head(head, data, settings, progress,
                                                          checkpoint=work / "checkpoint.pt"))
    after = evaluate_head(head, held)
    say(f"after {state.step} steps: held-out first-token acceptance {after.acceptance:.3f}, KL {after.kl:.3f}, "
        f"draft-vocabulary coverage {after.coverage:.3f}")
    calls = _head_calls(pair, head, held, job.new_tokens, say)
    per_corpus = _per_corpus(rows, held_rows, held, lambda part: asdict(evaluate_head(head, part)))
    meta = {**_meta(job, layers, state, data, settings, started - earlier, stage_seconds),
            "heldout_before": asdict(before),
            "heldout": {**asdict(after), **calls}, "heldout_per_corpus": per_corpus,
            "draft_vocab": len(vocab)}
    card = _head_card(meta)
    save_head(head, job.out, job.target, meta, card)
    (job.out / "distill.json").write_text(json.dumps(meta, indent=2))
    return card


def _head_calls(pair, head, held, new_tokens: int, say) -> dict:
    """Decode the held-out prompts with the head (cmsd.train.head.decode_held_out) under a progress bar."""
    from cmsd.train.head import decode_held_out

    with _bar(len(held.seqs), "held-out decoding with the head", "doc") as bar:
        out = decode_held_out(pair.target, head, held, new_tokens, bar.update)
    say(f"held-out decoding: {out['tokens_per_call']:.2f} tokens per target call, {out['draft_acceptance']:.3f} of "
        f"drafted tokens accepted")
    return out


def _rows(path: str, task: str, tokenizer: Any, wanted: int, budget: int) -> list[tuple[list[int], str | None]]:
    """The corpus's first `wanted` good rows as (prompt ids, reference); long sources are cut to fit `budget`."""
    from cmsd import PromptTemplate
    from jobs.batch.corpus import read_corpus
    from cmsd.decode import encode_prompt as encode
    from jobs.batch.rows import check_rows
    from jobs.batch.spec import CorpusSpec

    corpus = read_corpus(CorpusSpec(path=path, limit=wanted + 16))
    kind = task if task != "auto" else ("translation" if corpus.langs else "summarization")
    template = PromptTemplate(kind)
    room = max(16, budget - len(encode(tokenizer, template.render(tokenizer, ""))) - 2)

    def render(source: str, src_lang: str | None, tgt_lang: str | None) -> str:
        ids = tokenizer(source, add_special_tokens=False)["input_ids"]
        cut = tokenizer.decode(ids[:room]) if len(ids) > room else source
        return template.render(tokenizer, cut, src_lang, tgt_lang)

    def count(prompts: list[str]) -> list[int]:
        return [len(encode(tokenizer, p)) for p in prompts]

    good, _ = check_rows(corpus, render, count, budget)
    if not good:
        raise BadInput(f"corpus {path}: no usable rows")
    return [(encode(tokenizer, g.prompt), g.reference) for g in good[:wanted]]


def _generate(pair: Any, prompts: list[list[int]], new_tokens: int, say) -> Sequences:
    """The target's greedy continuations (cmsd.train.data.greedy_continuations) under a progress bar."""
    from cmsd.train.data import greedy_continuations

    with _bar(len(prompts), "target decoding", "doc") as bar:
        seqs, starts = greedy_continuations(pair, prompts, new_tokens, bar.update)
    say(f"target decoded {len(prompts)} rows, {sum(len(s) - n for s, n in zip(seqs, starts))} tokens")
    return Sequences(seqs, starts)


def _bar(total: int, desc: str, unit: str):
    """A tqdm bar on a terminal; otherwise tqdm writes a line about every 30 seconds."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=tty,
                mininterval=0.1 if tty else 30, ascii=not tty)


def _say(started: float):
    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {text}", file=sys.stderr, flush=True)
    return say


def _card(meta: dict, vocab: int) -> str:
    h, b = meta["heldout"], meta["heldout_before"]
    per_corpus = "\n".join(f"| {name} | {c['agreement']:.3f} | {c['tokens_per_call']:.2f} | {c['positions']} |"
                           for name, c in meta["heldout_per_corpus"].items())
    return f"""---
base_model: {meta['target']}
tags: [speculative-decoding, drafter, distillation, cmsd]
---
# Drafter distilled from {meta['target']}

A {meta['layers']}-layer drafter for speculative decoding with `{meta['target']}`, built by `cmsd-jobs distill`:
the target's embedding (frozen, tied to the LM head), its first {meta['layers'] - 1} layer(s) and its last layer, and
its final norm, trained on the target's own next-token distributions (top-{meta['settings']['top_k']}).
It drafts over a vocabulary of {vocab} ids (draft_vocab.json; cmsd uses it, other tools see an ordinary model).

| | |
| --- | --- |
| corpora | {', '.join(meta['corpora'])} |
| training | {meta['steps']} steps, {meta['train_tokens']} tokens in {meta['train_sequences']} sequences, {meta['train_minutes']:.1f} min (whole run {meta['total_minutes']:.1f} min) |
| loss | {meta['loss_first'] or 0:.3f} first step, {meta['loss_last'] or 0:.3f} last 20 steps |
| held-out top-1 agreement with the target (its own continuations) | {h['agreement']:.3f} (before training {b['agreement']:.3f}; all positions {h['agreement_all']:.3f}) |
| held-out tokens per target call, strict, k = {h['k']} | {h['tokens_per_call']:.2f} (before {b['tokens_per_call']:.2f}) |
| held-out KL(target \\|\\| drafter) | {h['kl']:.3f} (before {b['kl']:.3f}) |
| held-out agreement where the drafter's top-1 probability is >= 0.5 | {h['confident_agreement']:.3f} (on {h['confident_share']:.1%} of positions) |
| target's continuation tokens inside the draft vocabulary | {h['coverage']:.3f} |
| held-out positions scored | {h['positions']} |

Held out, per corpus:

| corpus | top-1 agreement on the target's continuations | tokens per target call, k = {h['k']} | positions |
| --- | --- | --- | --- |
{per_corpus}

Use: `cmsd-jobs submit --drafter DIR ...` or `cmsd.load_pair(target, drafter="DIR")`.
"""


DATA_LICENCES = {  # ../shared/data/README.md: where each set comes from and its licence
    "cnn_dailymail": "CNN/DailyMail test documents via artidoro/frank (MIT repository)",
    "xsum": "XSum test documents via artidoro/frank (MIT repository)",
    "wmt16_en_ro": "WMT16 en-ro sample from huggingface/transformers (Apache-2.0)",
    "wmt21_en_de": "WMT21 news test set, newstest2021 (licence not stated)",
    "multi30k_en_de": "Multi30k Task 1 test 2016 (licence not stated; images for non-commercial research use)",
    "dialogsum": "DialogSum test set (CC BY-NC-SA 4.0)",
}


def _head_card(meta: dict) -> str:
    h, b = meta["heldout"], meta["heldout_before"]
    names = [Path(c).name.split(".")[0] for c in meta["corpora"]]
    data = "\n".join(f"- `{Path(c).name}`: {DATA_LICENCES.get(n, 'see the corpus for its licence')}"
                     for c, n in zip(meta["corpora"], names))
    per_corpus = "\n".join(f"| {Path(name).name} | {c['acceptance']:.3f} | {c['kl']:.3f} | {c['positions']} |"
                           for name, c in meta["heldout_per_corpus"].items())
    return f"""---
base_model: {meta['target']}
tags: [speculative-decoding, drafter, eagle, feature-head, cmsd]
---
# Feature head for {meta['target']}

A feature head (cmsd.drafters.head) for speculative decoding with `{meta['target']}`: it drafts token t+2 from the target's
feature at t and the embedding of token t+1 through a fusing linear layer, {meta['layers']} decoder layer(s) shaped like
the target's (started from its last), its final norm and its frozen LM head over {meta['draft_vocab']} draft ids, and keeps
drafting from its own output features. Trained on the target's features and top-{meta['settings']['top_k']}
next-token distributions (teacher forced, with feature noise), by

    {meta['command']}

Use: `cmsd-jobs submit --drafter DIR ...` (`--drafter head` for the head shipped with cmsd). It is refused for any
other target than the one it was trained for.

| | |
| --- | --- |
| training | {meta['steps']} steps, {meta['train_tokens']} positions in {meta['train_sequences']} sequences, {meta['train_minutes']:.1f} min (whole run {meta['total_minutes']:.1f} min) |
| loss | {meta['loss_first'] or 0:.3f} first step, {meta['loss_last'] or 0:.3f} last 20 steps |
| held-out first-token acceptance (top-1 of q at t+2 == the target's, on its own continuations) | {h['acceptance']:.3f} (before training {b['acceptance']:.3f}; all positions {h['acceptance_all']:.3f}) |
| held-out KL(target \\|\\| head) | {h['kl']:.3f} (before {b['kl']:.3f}) |
| held-out acceptance where the head's top-1 probability is >= 0.5 | {h['confident_acceptance']:.3f} (on {h['confident_share']:.1%} of positions) |
| held-out decoding, strict cmasd, batch 1: tokens per target call | {h['tokens_per_call']:.2f} ({h['drafted_per_call']:.2f} drafted per call, {h['draft_acceptance']:.3f} of them accepted; {h['decoded_docs']} documents) |
| target's continuation tokens inside the draft vocabulary | {h['coverage']:.3f} |
| held-out positions scored | {h['positions']} |

Held out, per corpus (the first rows of each, never trained on):

| corpus | first-token acceptance | KL | positions |
| --- | --- | --- | --- |
{per_corpus}

## Training data

Only the data below (from the project's evaluation sets; their licences as stated by their origins):

{data}
"""
