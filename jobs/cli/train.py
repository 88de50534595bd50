"""`cmsd-jobs calibrate` and `cmsd-jobs distill`: drafters fitted to a target (the work is in jobs/train/)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(context_settings={"show_default": True})
@click.option("--target", default="smollm2", help="Target model: smollm2, a directory or hub name.")
@click.option("--corpus", required=True, metavar="PATH", help="Documents to calibrate on (any corpus format).")
@click.option("--task", type=click.Choice(["summarization", "translation", "plain"]), default="summarization")
@click.option("--limit", default=16, help="Documents to use.")
@click.option("--max-tokens", default=384, help="Tokens per document (prompt + reference) to run.")
@click.option("--k-max", default=8, help="Longest draft the predicted speedup considers.")
@click.option("--report", type=click.Path(file_okay=False, path_type=Path), help="Write calibration.md and a "
              "reliability plot here.")
def calibrate(target: str, corpus: str, task: str, limit: int, max_tokens: int, k_max: int,
              report: Path | None) -> None:
    """Fit SpecBound's per-layer exit temperatures and pick its exit layer for TARGET.

    Writes <model home>/specbound.json (read by `--method specbound`), and with --report DIR a calibration.md
    table (per-layer agreement with the final layer, ECE before and after) and a reliability plot.
    """
    from jobs.train.calibrate import calibrate_target

    table, path = calibrate_target(target, corpus, task, limit, max_tokens, k_max, report)
    click.echo(table)
    click.echo(f"saved {path}")


@click.command(context_settings={"show_default": True})
@click.option("--target", default="smollm2", help="Target model: smollm2, a directory or hub name.")
@click.option("--corpus", "corpora", multiple=True, required=True, metavar="PATH",
              help="A corpus (any format a job reads); repeat for several. Translation when its rows carry "
                   "src_lang/tgt_lang, summarization otherwise (or --task).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Drafter directory.")
@click.option("--kind", type=click.Choice(["model", "head"]), default="model", help="model: a small model cut "
              "from the target that drafts alone; head: a feature head that drafts from the target's own features "
              "(EAGLE-style, cmsd.drafters.head).")
@click.option("--layers", type=int, help="Decoder layers: model, the target's first layers-1 and its last "
              "[default: 2]; head, its own layers shaped like the target's [default: 1].")
@click.option("--steps", default=400, help="Training steps.")
@click.option("--minutes", type=float, help="Stop training after this many minutes, whatever --steps says.")
@click.option("--draft-vocab", default=8192, help="Draft vocabulary: the target's most frequent predictions "
              "(0 = the full vocabulary). A smaller head makes every draft step cheaper.")
@click.option("--task", type=click.Choice(["auto", "summarization", "translation", "plain"]), default="auto")
@click.option("--holdout", default=20, help="First rows of each corpus kept out of training.")
@click.option("--docs", default=32, help="Rows per corpus the target decodes for training (its own outputs).")
@click.option("--text-docs", default=32, help="Further rows per corpus used as prompt + reference text.")
@click.option("--eval-docs", default=8, help="Held-out rows per corpus for the final check.")
@click.option("--new-tokens", default=96, help="Tokens the target generates per row.")
@click.option("--seq-len", default=448, help="Longest training sequence (long sources are cut).")
@click.option("--batch-tokens", default=2048, help="Tokens per training step.")
@click.option("--lr", default=1e-3, help="Peak learning rate.")
@click.option("--top-k", default=32, help="Target probabilities kept per position.")
@click.option("--device", default="auto", help="auto | cpu | cuda | cuda:N")
@click.option("--seed", default=0)
def distill(**options) -> None:
    """Distill a drafter for TARGET from TARGET's own predictions: a small model sharing its tokenizer, or a
    feature head (--kind head) that drafts from its features.

    \b
      cmsd-jobs distill --target smollm2 --corpus xsum.jsonl --corpus wmt21_en_de.jsonl --out drafters/smollm2-2l
      cmsd-jobs distill --kind head --corpus xsum.jsonl --corpus cnn_dailymail.jsonl --out heads/smollm2

    OUT is an ordinary directory, usable as `--drafter OUT` anywhere: a Hugging Face model (plus draft_vocab.json),
    or with --kind head head.json and head.safetensors; each with a README.md card and distill.json. An
    interrupted run resumes from OUT/work.
    """
    from jobs.train.distill import DistillJob, run_distill

    job = DistillJob(**options, command=_command_line(click.get_current_context()))
    card = run_distill(job)
    click.echo(card)
    click.echo(f"saved {job.out} (use it as --drafter {job.out})")


def _command_line(ctx: click.Context) -> str:
    """The command that reproduces this run: the options given (not their defaults), as typed."""
    import shlex

    words = ["cmsd-jobs", ctx.info_name or "distill"]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) in (click.core.ParameterSource.DEFAULT, None):
            continue
        values = ctx.params[param.name]
        for value in values if isinstance(values, tuple) else (values,):
            words += [param.opts[0], str(value)]
    return " ".join(shlex.quote(w) for w in words)
