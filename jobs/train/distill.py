"""Distilled drafters (`cmsd-jobs distill`): build a drafter for a target that has no small sibling sharing its tokenizer.

    cmsd-jobs distill --target smollm2 --corpus xsum.jsonl --corpus wmt21_en_de.jsonl --out drafters/smollm2-2l

Per corpus, the first --holdout rows are held out (the evaluation suites decode the first rows, so a drafter
measured there has not seen them); the next --docs rows are decoded by the target (greedy) and the next
--text-docs rows are used as text (prompt + reference). The target's top-k next-token probabilities over those
sequences are computed once; the drafter (cmsd.distill) trains on them with a progress bar, checkpointing to
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
    corpora: tuple[str, ...]
    out: Path  # the drafter directory; OUT/work keeps the stages and the checkpoint
    layers: int  # the target's first layers-1 and its last
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


def run_distill(job: DistillJob) -> str:
    """Distill a small drafter sharing the target's tokenizer from the target's own predictions into `job.out`;
    returns its model card. Progress and stages go to stderr."""
    import torch

    from cmsd import ModelError, load_pair
    from cmsd.decode import eos_ids
    from cmsd.distill import (DistillSettings, TeacherData, draft_vocabulary, evaluate, init_drafter,
                              save_drafter, teacher_targets, train)

    target, corpora, out, layers, steps = job.target, job.corpora, job.out, job.layers, job.steps
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
    if not 1 <= layers < pair.target.model.config.num_hidden_layers:
        raise BadInput(f"--layers must be between 1 and {pair.target.model.config.num_hidden_layers - 1}")
    rows = {path: _rows(path, task, tok, holdout + docs + text_docs, seq_len - new_tokens) for path in corpora}
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    say = _say(started)

    def stage(name: str, build) -> TeacherData:  # each stage's data is kept in OUT/work: a rerun resumes
        path = work / f"{name}.pt"
        if path.is_file():
            say(f"{name}: reusing {path}")
            return TeacherData.load(path)
        seqs = build()
        with _bar(sum(len(s) for s in seqs.ids), f"{name}: target distributions", "tok") as bar:
            data = teacher_targets(pair.target.model, seqs.ids, seqs.answer_starts, top_k,
                                   progress=bar.update)
        data.save(path)
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
    if not data.seqs:
        raise BadInput("no training rows: the corpora have no rows after the held-out ones")
    vocab = draft_vocabulary(data, draft_vocab, pair.target.model.config.vocab_size, eos_ids(pair.target))
    student = init_drafter(pair.target.model, layers)
    before = evaluate(student, vocab, held)
    say(f"before training: held-out agreement {before.agreement:.3f}, tokens/call at k=4 "
        f"{before.tokens_per_call:.2f}, KL {before.kl:.3f}")
    say(f"training on {data.tokens} tokens ({len(data.seqs)} sequences), draft vocabulary {len(vocab)} ids")
    with _bar(steps, "training", "step") as bar:
        def step(n: int, shown: dict[str, float]) -> None:
            bar.set_postfix(shown, refresh=False)
            bar.update(n)

        state = train(student, data, vocab, settings, step, checkpoint=work / "checkpoint.pt")
    after = evaluate(student, vocab, held)
    say(f"after {state.step} steps: held-out agreement {after.agreement:.3f}, tokens/call at k=4 "
        f"{after.tokens_per_call:.2f}, KL {after.kl:.3f}, draft-vocabulary coverage {after.coverage:.3f}")
    per_corpus, start = {}, 0
    for path, corpus_rows in rows.items():  # the held-out sequences are in corpus order
        count = len(corpus_rows[held_rows])
        per_corpus[path] = asdict(evaluate(student, vocab, held.part(start, start + count)))
        start += count
    meta = {"target": target, "corpora": list(corpora), "layers": layers, "steps": state.step,
            "train_tokens": data.tokens, "train_sequences": len(data.seqs), "train_minutes": state.seconds / 60,
            "total_minutes": (time.perf_counter() - started) / 60, "settings": asdict(settings),
            "heldout_before": asdict(before), "heldout": asdict(after), "heldout_per_corpus": per_corpus,
            "loss_first": state.losses[0] if state.losses else None,
            "loss_last": sum(state.losses[-20:]) / len(state.losses[-20:]) if state.losses else None}
    card = _card(meta, len(vocab))
    save_drafter(student, tok, vocab, out, card, meta)
    (out / "distill.json").write_text(json.dumps(meta, indent=2))
    return card


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
    """The target's greedy continuations (strict CM-ASD: the same tokens as greedy decoding, faster)."""
    from cmsd import DecodeSettings, Decoder

    if not prompts:
        return Sequences([], [])
    decoder = Decoder(pair, DecodeSettings(method="cmasd", verify="strict", max_new_tokens=new_tokens, batch_size=8,
                                           trace=False))
    with _bar(len(prompts), "target decoding", "doc") as bar:
        gens = decoder.generate_ids(prompts, progress=bar.update)
    say(f"target decoded {len(prompts)} rows, {sum(len(g.token_ids) for g in gens)} tokens")
    return Sequences([p + g.token_ids for p, g in zip(prompts, gens)], [len(p) for p in prompts])


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
