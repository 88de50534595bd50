"""`cmsd-jobs eval SUITE.yaml`: the nightly evaluation and benchmark (the work is in jobs/eval/run.py).

Kept light: importing this module (as jobs/cli/__init__.py does) loads neither torch nor ray nor cmsd.
"""

from __future__ import annotations

import sys

import click


@click.command("eval", context_settings={"show_default": True})
@click.argument("suite_file", type=click.Path(dir_okay=False))
@click.option("--history", "history_dir", metavar="DIR",
              help="The history (one Parquet file per run) to compare with and append to [default: OUT/history].")
@click.option("--out", "out_dir", metavar="DIR",
              help="Each run writes OUT/<run id>/: report.md, report.html, plots/, summary.json, results "
                   "[default: beside the history, HISTORY/../eval, else ./eval-runs].")
@click.option("--address", metavar="ADDR", help="Time on a Ray cluster (auto or ray://host:10001) instead of "
              "in this process; the suite's execution.actors share the documents.")
@click.option("--load-format", type=click.Choice(["auto", "dummy"]), help="dummy: random weights of the suite's "
              "model shapes, for speed only (no quality scores; the report says so) [default: the suite's "
              "models.load_format, auto].")
def eval_command(suite_file: str, history_dir: str | None, out_dir: str | None, address: str | None,
                 load_format: str | None) -> None:
    """Time every method of SUITE_FILE and its peers side by side on the same documents, sweep the settings,
    check calibration and quality, compare with the history, and write the report.

    \b
    Suites shipped: jobs/suites/nightly.yaml (2-core CPU, 9-16 min), jobs/suites/gpu.yaml (a GPU cluster).
    Exit codes: 0 no regression, 1 regression(s) (listed, and in the report), 2 bad suite / corpus / model.
    On a busy machine (execution.busy_load) failed timing checks are printed as warnings and do not fail.
    The last line printed is the run's directory.
    """
    from jobs.eval.run import run_eval

    record, out = run_eval(suite_file, out_dir, history_dir, address, load_format)
    if record.suite.models.dummy:
        click.echo("dummy weights: speed numbers only (no quality scores; acceptance is a random model's)")
    for regression in record.regressions:
        click.echo(f"REGRESSION {regression.message()}")
    for warning in record.warnings:
        click.echo(f"WARNING (busy machine) {warning.message()}")
    verdict = f"{len(record.regressions)} regression(s)" if record.regressions else "no regression"
    click.echo(f"{record.suite.name}: {len(record.docs.test)} documents, {len(record.meas.info)} runners, "
               f"{len(record.meas.skipped)} skipped, {verdict}, {record.wall_s:.0f} s")
    click.echo(f"report: {out / 'report.md'}")
    click.echo(str(out))
    sys.stdout.flush()
    if record.regressions:
        click.get_current_context().exit(1)
