"""The `cmsd-jobs` command line (jobs.cli:main). Commands are thin: they parse, call the packages, and print.

Here: the group and the job commands (submit, resume, status, report: jobs.batch.lifecycle). Beside it: eval.py
(jobs.eval), k8s.py (jobs.k8s), train.py (calibrate and distill: jobs.train).

Exit codes: 0 done, 1 the job failed (resume it), 2 bad input (nothing written). Heavy imports (torch, ray)
happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from jobs.cli.eval import eval_command
from jobs.cli.k8s import k8s
from jobs.cli.train import calibrate, distill
from jobs.errors import BadInput, JobFailed

DEMO_SPEC = Path(__file__).parents[1] / "data" / "demo.yaml"

# submit's named flags and the spec field each one sets
FLAG_FIELDS = {
    "corpus": "corpus.path", "task": "task.name", "target": "models.target", "drafter": "models.drafter",
    "method": "decode.method", "verify": "decode.verify", "out": "output.dir", "shards": "execution.shards",
    "actors": "execution.actors", "address": "execution.address", "batch_size": "decode.batch_size",
    "max_new_tokens": "decode.max_new_tokens", "temperature": "decode.temperature", "seed": "decode.seed",
    "limit": "corpus.limit", "source_field": "corpus.source_field", "reference_field": "corpus.reference_field",
    "id_field": "corpus.id_field", "job_id": "output.job_id", "baseline": "execution.baseline",
    "objective": "execution.objective", "load_format": "models.load_format",
}


class _ExitError(click.ClickException):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class JobsGroup(click.Group):
    """Maps BadInput to exit code 2 and JobFailed to 1, with the message on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BadInput as err:
            raise _ExitError(f"bad input: {err}", err.exit_code) from err
        except JobFailed as err:
            raise _ExitError(f"job failed: {err}", err.exit_code) from err


@click.group(cls=JobsGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Run confidence-modulated speculative decoding (CM-ASD) over a whole corpus, as a Ray batch job.

    \b
    Start here:
      cmsd-jobs submit --demo                  a small job on the bundled sample corpus (a few minutes)
      cmsd-jobs submit job.yaml                a job from a YAML spec (see jobs/data/demo.yaml)
      cmsd-jobs submit --corpus docs.jsonl --task summarization --method cmasd --out runs
      cmsd-jobs tune --corpus docs.jsonl       the method and batch size a job would pick here, and why
      cmsd-jobs status runs/<job_id>           how far a job got
      cmsd-jobs resume runs/<job_id>           finish an interrupted or failed job
      cmsd-jobs report runs/<job_id>           rewrite report.md / report.html

    Exit codes: 0 done, 1 the job failed (resume it), 2 bad input (nothing was written).
    """


@main.command(context_settings={"show_default": True})
@click.argument("spec_file", required=False, type=click.Path(dir_okay=False))
@click.option("--demo", is_flag=True, help="Use the bundled demo spec (jobs/data/demo.yaml); flags still override it.")
@click.option("--corpus", metavar="PATH", help="Corpus: .jsonl, .csv, .tsv, .parquet, .arrow, a `datasets` "
              "directory, a source .txt (with --set corpus.reference_path=REF.txt), or a hub dataset name.")
@click.option("--task", type=click.Choice(["summarization", "translation", "plain"]), help="Picks the prompt.")
@click.option("--target", metavar="MODEL", help="Target model: smollm2 (offline default), a directory or hub name.")
@click.option("--drafter", metavar="DRAFTER", help="ngram, self (SpecBound), a model directory or hub name, "
              "or none (AR).")
@click.option("--method", metavar="METHOD", help="ar, specdec, adaptive-k, adaptive-tau, cmasd, margin, "
              "cmasd+margin or specbound.")
@click.option("--verify", type=click.Choice(["strict", "relaxed"]),
              help="strict: output equals the target's (lossless); relaxed: the method's own acceptance rule.")
@click.option("--out", metavar="DIR", help="Where job directories go: a path or a pyarrow filesystem URI "
              "(s3://, gs://); on a cluster, one every node can reach.")
@click.option("--job-id", metavar="ID", help="Name of the job directory (default: date-time-corpus-method).")
@click.option("--shards", type=int, help="Number of shards (default: one per 64 rows, at least two per actor).")
@click.option("--actors", type=int, help="Worker actors, each holding one drafter/target pair.")
@click.option("--address", metavar="ADDR", help="Join a Ray cluster: auto or ray://host:10001 "
              "(default: start a local Ray).")
@click.option("--batch-size", type=int, help="Documents decoded together by one actor.")
@click.option("--baseline", type=int, metavar="N", help="Also decode N documents with AR on the same actors, for "
              "the job's own speedup_vs_ar and agreement_with_ar; 0: none [default: 8]. Only with --no-tune: a "
              "tuned job's comparison is its tuning's, decoding no document twice.")
@click.option("--max-new-tokens", type=int, help="Tokens generated per document, at most.")
@click.option("--temperature", type=float, help="0 = greedy.")
@click.option("--seed", type=int, help="Sampling seed.")
@click.option("--limit", type=int, help="Decode only the first N rows.")
@click.option("--source-field", metavar="NAME", help="Corpus field with the text to decode [default: source].")
@click.option("--reference-field", metavar="NAME", help="Field with the reference [default: reference, if any].")
@click.option("--id-field", metavar="NAME", help="Field with the document id [default: id, if any, else row-N].")
@click.option("--load-format", type=click.Choice(["auto", "dummy"]), help="dummy: random weights of the models' "
              "shapes, for speed only (--target may be a shipped shape: smollm2-135m, smollm2-1.7b, llama-3.1-8b); "
              "the report says so and carries no quality scores [default: auto].")
@click.option("--set", "assignments", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Set any spec field, e.g. --set decode.control.k_max=12 (repeatable; values are YAML).")
@click.option("--objective", type=click.Choice(["throughput", "latency"]), help="What tuning picks the method and "
              "batch size for: the job's tokens a second, or one document's time (batch 1) [default: throughput].")
@click.option("--no-tune", is_flag=True, help="Decode exactly as the spec and flags say: no measuring first "
              "(execution.tune false).")
@click.option("--prepare-only", is_flag=True, help="Write the job directory (spec, manifest, shards, errors) and "
              "stop; `cmsd-jobs resume JOB_DIR` runs it.")
def submit(spec_file: str | None, demo: bool, assignments: tuple[str, ...], prepare_only: bool, no_tune: bool,
           **flags: Any) -> None:
    """Check a job, write its directory, run it on Ray, and write summary.json and the report.

    The job is SPEC_FILE (YAML: corpus, task, prompt, models, decode, execution, output) with the flags
    applied on top. The spec, the models and the corpus's fields are checked before anything is written; the
    corpus is then read once, as a stream, and its shards written as they fill (a bad row is recorded in
    errors/ and the job goes on). The last line printed is the job directory.
    """
    from jobs.batch.lifecycle import create, submit as submit_job

    spec = job_spec(spec_file, demo, assignments, flags, no_tune)
    if prepare_only:
        store, _, _ = create(spec)
        click.echo(f"prepared; run it with: cmsd-jobs resume {store.uri}")
        click.echo(store.uri)
        return
    _finish(submit_job(spec))


@main.command(context_settings={"show_default": True})
@click.option("--docs", type=int, default=1, help="Documents to measure on (from the corpus's start), each decoded "
              "at batch 1 by the method with each drafter at hand (and by AR too under relaxed verification); the top "
              "candidates are then confirmed by real decodes of the next documents read.")
def tune(spec_file: str | None, demo: bool, assignments: tuple[str, ...], docs: int, **flags: Any) -> None:
    """Measure and print the plan a job's actors would run on this machine (method and batch size, and why), and
    keep it on disk where the job's actors find it and start at once. Takes submit's spec and flags."""
    from jobs.batch.quality import DUMMY_NOTE
    from jobs.batch.report import tuning_lines
    from jobs.batch.tune import tune_corpus

    if docs < 1:
        raise BadInput(f"--docs must be >= 1, got {docs}")
    spec = job_spec(spec_file, demo, assignments, flags)
    result = tune_corpus(spec, docs)
    click.echo("\n".join(([DUMMY_NOTE] if spec.models.dummy else []) + tuning_lines(result.plan)))
    click.echo(f"plan kept in {result.path}" + ("" if result.docs else " (reused: measured before)"))


TUNE_FLAGS = ("spec_file", "demo", "corpus", "task", "target", "drafter", "method", "verify", "max_new_tokens",
              "temperature", "limit", "source_field", "reference_field", "id_field", "actors", "assignments",
              "objective", "load_format")
tune.params.extend(p for p in submit.params if p.name in TUNE_FLAGS)  # the same options as submit's


def job_spec(spec_file: str | None, demo: bool, assignments: tuple[str, ...], flags: dict[str, Any],
             no_tune: bool = False) -> Any:
    """The JobSpec of SPEC_FILE (or the demo's) with the named flags and --set assignments applied."""
    from jobs.batch.spec import JobSpec, apply_overrides, load_spec_file, parse_assignment

    if demo and spec_file:
        raise click.UsageError("give either SPEC_FILE or --demo, not both")
    source = str(DEMO_SPEC) if demo else spec_file
    data = load_spec_file(source) if source else {}
    overrides = {FLAG_FIELDS[name]: value for name, value in flags.items() if value is not None}
    if str(overrides.get("models.drafter", "")).lower() == "none":
        overrides["models.drafter"] = None  # AR: the target alone
    if no_tune:
        overrides["execution.tune"] = False
    overrides.update(parse_assignment(text) for text in assignments)
    return JobSpec.from_dict(apply_overrides(data, overrides))


@main.command()
@click.argument("job_dir")
@click.option("--address", metavar="ADDR", help="Join this Ray cluster instead of the spec's.")
@click.option("--actors", type=int, help="Worker actors for this run.")
def resume(job_dir: str, address: str | None, actors: int | None) -> None:
    """Run the shards of JOB_DIR that are not done (only those), then write the summary and report."""
    from jobs.batch.lifecycle import resume as resume_job

    overrides = {k: v for k, v in {"execution.address": address, "execution.actors": actors}.items() if v}
    _finish(resume_job(job_dir, overrides))


@main.command()
@click.argument("job_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(job_dir: str, as_json: bool) -> None:
    """How far the job in JOB_DIR got: shards and rows done, rows refused, what is left."""
    from jobs.batch.lifecycle import status as job_status

    info = job_status(job_dir)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['job_id']}: {info['state']}, {info['shards_done']}/{info['shards']} shards, "
               f"{info['rows_done']}/{info['rows']} documents, {info['rows_refused']} rows refused, "
               f"summary {'written' if info['summary'] else 'not written'}")
    if info["unfinished"]:
        click.echo(f"unfinished shards: {info['unfinished']}; run `cmsd-jobs resume {info['job']}`")


@main.command()
@click.argument("job_dir")
def report(job_dir: str) -> None:
    """Write report.md, report.html and plots/*.png of the finished job in JOB_DIR."""
    from jobs.batch.lifecycle import report_only

    _finish(report_only(job_dir))


def _finish(result: Any) -> None:
    """The closing lines: key numbers, the report, and the job directory last."""
    overall = result.summary["overall"]
    if result.summary.get("load_format") == "dummy":
        click.echo("dummy weights: speed numbers only (no quality scores; acceptance is a random model's)")
    click.echo(f"{result.summary['docs']} documents, {overall['new_tokens']} tokens, "
               f"{overall['tokens_per_s']:.1f} tokens/s per actor, {overall['tokens_per_call']:.2f} tokens/call, "
               f"acceptance {overall['acceptance_rate']:.2f}, {result.summary['errors']} rows refused")
    click.echo(f"report: {result.report}")
    click.echo(result.uri)
    sys.stdout.flush()


main.add_command(k8s)  # cmsd-jobs k8s render (jobs/k8s/render.py)
main.add_command(calibrate)  # cmsd-jobs calibrate (jobs/train/calibrate.py): SpecBound's exit temperatures
main.add_command(eval_command)  # cmsd-jobs eval (jobs/eval/run.py): the nightly evaluation and benchmark
main.add_command(distill)  # cmsd-jobs distill (jobs/train/distill.py): a drafter built from the target


@main.command()
@click.argument("job_dir")
@click.option("--curve", "curve_path", required=True, metavar="FILE",
              help="A cost curve (cmsd.costs) or the GPU check's gpu_check.json.")
@click.option("--shape", help="Of a gpu_check.json's shapes, this one's curve (default: its first).")
@click.option("--batches", default="1,2,4,8,16,32", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--verify-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="The verify budget on that device (tokens a pass; 0: none, as on a GPU).")
@click.option("--k-max", type=click.IntRange(min=1), default=8, show_default=True)
def project(job_dir: str, curve_path: str, shape: str | None, batches: str, verify_tokens: int, k_max: int) -> None:
    """Project the finished job in JOB_DIR onto another device: tokens/s of its configuration and of AR at each batch
    size there, from its traces (what its drafts gained) and that device's cost curve (scripts/gpu_check.sh)."""
    from jobs.batch.projection import projection_table

    try:
        sizes = [int(b) for b in batches.split(",")]
    except ValueError:
        raise BadInput(f"--batches must be comma-separated integers, got {batches!r}") from None
    if not sizes or min(sizes) < 1:
        raise BadInput(f"--batches must be >= 1, got {batches!r}")
    click.echo(projection_table(job_dir, curve_path, shape, sorted(set(sizes)), verify_tokens, k_max))
