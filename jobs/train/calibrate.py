"""SpecBound's calibration (`cmsd-jobs calibrate`): fit its exit temperatures on a small corpus, store them beside
the model (the fit is cmsd.train.calibrate's).

Writes <model home>/specbound.json (read by `--method specbound`), and with --report DIR a calibration.md table
(per-layer agreement with the final layer, ECE before and after) and a reliability plot.
"""

from __future__ import annotations

from pathlib import Path

from jobs.errors import BadInput


def calibrate_target(target: str, corpus: str, task: str, limit: int, max_tokens: int, k_max: int,
                     report: Path | None) -> tuple[str, Path]:
    """Fit SpecBound's per-layer exit temperatures and pick its exit layer for `target` on the first `limit` rows of
    `corpus`; store them beside the model. Returns the calibration table (markdown) and where it was saved."""
    from cmsd import ModelError, PromptTemplate, load_pair
    from cmsd.train.calibrate import fit_and_store
    from jobs.batch.corpus import read_corpus
    from jobs.batch.spec import CorpusSpec

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
    cal, path = fit_and_store(pair.target, ids, target, k_max, max_tokens)
    table = calibration_table(cal)
    if report:
        report.mkdir(parents=True, exist_ok=True)
        (report / "calibration.md").write_text(table + "\n![reliability](reliability.png)\n")
        reliability_plot(cal, report / "reliability.png")
    return table, path


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
