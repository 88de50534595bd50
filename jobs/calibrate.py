"""`cmsd-jobs calibrate`: fit SpecBound's exit temperatures on a small corpus and store them beside the model.

Writes <model home>/specbound.json (read by `--method specbound`), and with --report DIR a calibration.md table
(per-layer agreement with the final layer, ECE before and after) and a reliability plot.
"""

from __future__ import annotations

from pathlib import Path

import click

from jobs.errors import BadInput


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
    """Fit SpecBound's per-layer exit temperatures and pick its exit layer for TARGET."""
    from cmsd import ModelError, PromptTemplate, load_pair
    from cmsd.selfspec import calibrate as fit, calibration_path
    from jobs.corpus import read_corpus
    from jobs.spec import CorpusSpec

    try:
        pair = load_pair(target, None)
    except ModelError as err:
        raise BadInput(str(err)) from err
    docs = read_corpus(CorpusSpec(path=corpus, limit=limit))
    template, tokenizer = PromptTemplate(task), pair.tokenizer
    refs = docs.references or [""] * docs.size
    texts = [template.render(tokenizer, str(s)) + str(r) for s, r in zip(docs.sources, refs) if isinstance(s, str)]
    if not texts:
        raise BadInput(f"{corpus}: no text rows to calibrate on")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    cal = fit(pair.target.model, ids, target, k_max=k_max, max_tokens=max_tokens)
    path = calibration_path(pair.target.home)
    path.parent.mkdir(parents=True, exist_ok=True)
    cal.save(path)
    table = calibration_table(cal)
    click.echo(table)
    if report:
        report.mkdir(parents=True, exist_ok=True)
        (report / "calibration.md").write_text(table + f"\n![reliability](reliability.png)\n")
        reliability_plot(cal, report / "reliability.png")
    click.echo(f"saved {path}")


def calibration_table(cal) -> str:
    lines = [f"# SpecBound calibration: {cal.model} ({cal.tokens} tokens)", "",
             "| exit layer | agreement with final layer | temperature | ECE before | ECE after |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {c.layer} | {c.agreement:.3f} | {c.temperature:.2f} | {c.ece_before:.3f} | {c.ece_after:.3f} |"
              for c in cal.layers]
    verdict = "a speedup" if cal.predicted_speedup >= 1 else "a slowdown: specbound falls back to AR"
    lines += ["", f"Chosen exit layer {cal.exit_layer}, k = {cal.k}: predicted {cal.predicted_speedup:.2f}x over AR "
              f"({verdict})."]
    return "\n".join(lines)


def reliability_plot(cal, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    shown = {c.layer for c in cal.layers[:: max(1, len(cal.layers) // 6)]} | {cal.exit_layer}
    for c in (c for c in cal.layers if c.layer in shown):
        xs, ys = [b[0] for b in c.reliability], [b[1] for b in c.reliability]
        ax.plot(xs, ys, marker="o", label=f"layer {c.layer} (T={c.temperature:g})")
    ax.set_xlabel("calibrated exit confidence")
    ax.set_ylabel("agreement with the final layer")
    ax.set_title(f"SpecBound exits: {cal.model}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
