"""`cmsd-jobs eval`: suites, the side-by-side run on a tiny model, the history and its regressions, the report.

The end-to-end runs use a tiny random Llama with the real SmolLM2 tokenizer (tests/raytest.py); one test runs
the real model on two documents (marked real_model).
"""

from __future__ import annotations

import json
import shutil
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner, Result

from cmsd import DecodeSettings
from cmsd.stats import DocStats
from jobs.cli import main
from jobs.eval.calibration import binned, judged
from jobs.eval.history import regressions
from jobs.eval.measure import RoundRobin
from jobs.eval.metrics import agreement, rouge_paired, sacrebleu_paired
from jobs.eval.runners import Output
from jobs.eval.suite import MAX_GRID, load_suite, suite_from_dict
from jobs.eval.sweep import SweepPoint, choose, mark_pareto
from tests.raytest import articles, ray_local, tiny_target, write_jsonl  # noqa: F401  (fixtures)

ROOT = Path(__file__).parents[2]
SUITES = ROOT / "jobs" / "suites"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("eval-corpora")
    translations = [{"id": f"t{i}", "source": f"The house number {i} is small and the garden is green.",
                     "reference": f"Das Haus Nummer {i} ist klein und der Garten ist grün.", "src_lang": "en",
                     "tgt_lang": "de"} for i in range(6)]
    return {"news": write_jsonl(folder / "news.jsonl", articles(6)),
            "mt": write_jsonl(folder / "mt.jsonl", translations)}


def tiny_suite(paths: dict[str, Path], target: Path, **over: Any) -> dict[str, Any]:
    suite = {
        "name": "tiny",
        "corpora": [{"path": str(paths["news"]), "task": "summarization", "limit": 2, "name": "news"},
                    {"path": str(paths["mt"]), "task": "translation", "limit": 2, "name": "mt"}],
        "models": {"target": str(target), "drafter": "ngram", "device": "cpu", "dtype": "float32"},
        "decode": {"max_new_tokens": 6}, "batch_size": 2, "bootstrap_samples": 200,
        "methods": ["ar", "specdec", "cmasd", {"name": "cmasd-relaxed", "method": "cmasd", "verify": "relaxed"}],
        "peers": ["greedy", {"kind": "prompt-lookup", "prompt_lookup_num_tokens": 3}, "assisted", "vllm"],
        "floors": {"lossless_agreement": 1.0},
        "tolerances": {"speedup": 100.0},  # timings of a tiny model are noise; compare deterministic numbers only
    }
    return {**suite, **over}


def run_eval(tmp_path: Path, suite: dict[str, Any], *args: str) -> tuple[Result, Path]:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    result = CliRunner().invoke(main, ["eval", str(path), "--out", str(tmp_path / "runs"), *args])
    return result, tmp_path / "runs"


def explain(result: Result) -> str:
    """What a failed assertion on a run shows: its output, and the exception it ended with (an uncaught one ends a
    CliRunner run with exit code 1 and no output of its own)."""
    if result.exception is None or isinstance(result.exception, SystemExit):
        return result.output
    return result.output + "".join(traceback.format_exception(*result.exc_info))


def run_dir(result: Result) -> Path:
    return Path(result.output.strip().splitlines()[-1])


# -- suites ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nightly.yaml", "gpu.yaml"])
def test_shipped_suites_load(name: str) -> None:
    suite = load_suite(SUITES / name)
    methods = {m.settings.method for m in suite.methods}
    assert {"ar", "specdec", "adaptive-k", "adaptive-tau", "cmasd", "margin", "cmasd+margin", "specbound"} <= methods
    assert {p.kind for p in suite.peers} == {"greedy", "assisted", "prompt-lookup", "early-exit", "vllm"}
    assert {m.settings.verify for m in suite.methods if m.settings.method == "cmasd"} == {"strict", "relaxed"}
    assert suite.sweep is not None and 1 <= len(suite.sweep.points()) <= MAX_GRID
    assert all(Path(c.path).is_file() for c in suite.corpora) or name == "gpu.yaml"


def test_k8s_suite_follows_the_format() -> None:
    suite = load_suite(ROOT / "k8s" / "base" / "suite.yaml")
    assert suite.execution.actors == 2 and suite.execution.uses_ray
    assert suite.floors.min_speedup == 1.0 and "margin" in [m.name for m in suite.methods]


@pytest.mark.parametrize("change, message", [
    ({"methods": ["ar", "turbo"]}, "method must be one of"),
    ({"methods": ["specdec"]}, "'ar' is required"),
    ({"colour": "blue"}, "unknown section"),
    ({"floors": {"min_agreement": 2}}, "floors.min_agreement"),
    ({"peers": [{"kind": "beam"}]}, "peers[].kind"),
    ({"sweep": {"grid": {"alpha": [1], "beta": [2]}}}, "unknown knob"),
    ({"decode": {"max_new_tokens": 0}}, "max_new_tokens"),
    ({"execution": {"calibrate": "yes"}}, "execution.calibrate must be true or false"),
    ({"batch_docs": 1}, "batch_docs must be 0 or >= batch_size"),
    ({"batch_docs": 4}, "peers decode a unit as one batch"),
    ({"single": "no"}, "single must be true or false"),
    ({"models": {"target": "smollm2", "load_format": "random"}}, "models.load_format must be one of auto, dummy"),
    ({"corpora": [{"path": "/nonexistent/x.jsonl", "task": "summarization"}]}, "/nonexistent/x.jsonl"),
    ({"methods": ["ar", {"name": "mine", "method": "cmasd", "drafter": "/nonexistent/drafter"}]},
     "methods 'mine': cannot load model '/nonexistent/drafter'"),
])
def test_bad_suite_exits_2_naming_the_problem(tmp_path: Path, corpora: dict[str, Path], tiny_target: Path,
                                              change: dict[str, Any], message: str) -> None:
    result, out = run_eval(tmp_path, tiny_suite(corpora, tiny_target, **change))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists(), "bad input writes nothing"


# -- a whole run on a tiny model ---------------------------------------------------------------------------------
def test_eval_side_by_side_on_a_tiny_model(tmp_path: Path, corpora: dict[str, Path], tiny_target: Path) -> None:
    suite = tiny_suite(corpora, tiny_target, sweep={"grid": {"alpha": [0.5, 1.0], "tau_base": [0.2]},
                                                    "docs_per_corpus": 1}, execution={"batched_rounds": 2})
    result, out = run_eval(tmp_path, suite)
    assert result.exit_code == 0, result.output
    folder = run_dir(result)
    summary = json.loads((folder / "summary.json").read_text())
    rows = {(r["setting"], r["method"], r["scope"]): r for r in summary["rows"]}
    for method in ("ar", "specdec", "cmasd", "hf-greedy", "hf-prompt-lookup-3"):  # lossless: AR's output exactly
        assert rows[("batch-1", method, "all")]["agreement_with_ar"] == 1.0
    assert rows[("batch-2", "hf-greedy", "all")]["agreement_with_ar"] == 1.0  # left-padded batches too
    assert ("batch-2", "hf-prompt-lookup-3", "all") not in rows  # transformers: batch 1 only
    assert rows[("batch-1", "cmasd", "mt")]["bleu_signature"].startswith("nrefs:1")
    assert set(summary["skipped"]) == {"hf-assisted", "vllm"}
    assert (folder / "report.html").is_file() and {p.name for p in (folder / "plots").iterdir()} == {
        "calibration.png", "k_histogram.png", "pareto.png", "trend_speedup_vs_ar.png"}
    report = (folder / "report.md").read_text()
    assert "## Side by side, batch 1" in report and "## Side by side, batch 2" in report and "ECE c_ent" in report
    settings = DecodeSettings.from_dict(yaml.safe_load((folder / "chosen_settings.yaml").read_text()))
    assert settings.method == "cmasd" and settings.verify == "relaxed" and settings.control.alpha in (0.5, 1.0)
    assert len(list((out / "history").glob("*.parquet"))) == 1


def test_eval_with_dummy_weights_says_so_and_scores_no_quality(tmp_path: Path, corpora: dict[str, Path],
                                                               tiny_target: Path) -> None:
    """--load-format dummy: random weights of the target directory's shape; the report says so in its first line,
    no quality is scored, and transformers' greedy peer runs on the same dummy model (its output is AR's)."""
    from jobs.batch.quality import DUMMY_NOTE, DUMMY_TITLE

    suite = tiny_suite(corpora, tiny_target, methods=["ar", "cmasd"], peers=["greedy"], batch_size=1)
    result, out = run_eval(tmp_path, suite, "--load-format", "dummy")
    assert result.exit_code == 0, explain(result)
    folder = run_dir(result)
    assert (folder / "report.md").read_text().splitlines()[0] == f"# Evaluation: tiny ({DUMMY_TITLE})"
    assert DUMMY_TITLE in (folder / "report.html").read_text().splitlines()[0]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["load_format"] == "dummy" and summary["notes"][0] == DUMMY_NOTE
    rows = {(r["method"], r["scope"]): r for r in summary["rows"] if r["setting"] == "batch-1"}
    assert not {"bleu", "chrf", "rouge1", "rougeL", "keeps_quality"} & {k for r in rows.values() for k in r}
    assert rows[("hf-greedy", "all")]["agreement_with_ar"] == rows[("cmasd", "all")]["agreement_with_ar"] == 1.0
    history = pq.read_table(next((out / "history").glob("*.parquet"))).to_pylist()
    assert {r["load_format"] for r in history} == {"dummy"}


def test_a_continuous_batching_suite_times_only_its_batched_units(tmp_path: Path, corpora: dict[str, Path],
                                                                    tiny_target: Path) -> None:
    """single: false skips batch 1; batch_docs: 4 at batch 2 decodes each unit of 4 documents 2 rows at a time,
    draining or continuous, with the same output."""
    methods = ["ar", {"name": "ar-draining", "method": "ar", "settings": {"continuous": False}}]
    suite = tiny_suite(corpora, tiny_target, peers=[], methods=methods, single=False, batch_docs=4)
    result, _ = run_eval(tmp_path, suite)
    assert result.exit_code == 0, result.output
    rows = json.loads((run_dir(result) / "summary.json").read_text())["rows"]
    assert {r["setting"] for r in rows} == {"batch-2"}
    assert {r["method"]: r["agreement_with_ar"] for r in rows if r["scope"] == "all"} == {"ar": 1.0, "ar-draining": 1.0}


def test_planted_regression_in_the_history_exits_1_naming_it(tmp_path: Path, corpora: dict[str, Path],
                                                             tiny_target: Path) -> None:
    suite = tiny_suite(corpora, tiny_target, batch_size=1, peers=[], methods=["ar", "specdec", "cmasd"])
    first, out = run_eval(tmp_path, suite)
    assert first.exit_code == 0, first.output
    assert (run_dir(first) / "report.md").read_text().count("## Side by side") == 1  # batch 1 only: one table
    [history] = list((out / "history").glob("*.parquet"))
    table = pq.read_table(history).to_pylist()
    for row in table:  # plant it: the previous run drafted twice as far per target call
        if (row["method"], row["setting"], row["scope"]) == ("cmasd", "batch-1", "all"):
            row["tokens_per_call"] *= 2
    planted = history.with_name("20000101-000000-planted.parquet")
    pq.write_table(pa.Table.from_pylist(
        [{**r, "run_id": "20000101-000000-planted", "started": "2099-01-01"} for r in table]), planted)
    second, _ = run_eval(tmp_path, suite)
    assert second.exit_code == 1, explain(second)
    lines = [line for line in second.output.splitlines() if line.startswith("REGRESSION")]
    assert len(lines) == 1, explain(second)
    assert "cmasd [batch-1, all]: tokens_per_call" in lines[0] and "20000101-000000-planted" in lines[0]
    assert "1 regression(s)" in (run_dir(second) / "report.md").read_text()


def test_timing_checks_only_warn_on_a_busy_machine(tmp_path: Path, corpora: dict[str, Path],
                                                   tiny_target: Path) -> None:
    suite = tiny_suite(corpora, tiny_target, batch_size=1, peers=[], methods=["ar", "cmasd"],
                       floors={"min_speedup": 100.0}, execution={"busy_load": 1e-9})
    result, _ = run_eval(tmp_path, suite)
    assert result.exit_code == 0, result.output
    assert "WARNING (busy machine) cmasd [batch-1, all]: speedup_vs_ar" in result.output
    assert "REGRESSION" not in result.output


def test_a_fresh_machine_calibrates_specbound_once_and_keeps_it(tmp_path: Path, corpora: dict[str, Path],
                                                              tiny_target: Path) -> None:
    """A target without a SpecBound calibration (a fresh machine): the first run fits one before timing, stores it
    beside the model and says so in the report; the next run reuses it; execution.calibrate: false leaves it."""
    target = tmp_path / "target"
    shutil.copytree(tiny_target, target)  # its own home: the calibration lands beside this copy
    methods = ["ar", {"name": "specbound", "limit": 1, "batch": False}]
    off = tiny_suite(corpora, target, batch_size=1, peers=[], methods=methods, execution={"calibrate": False})
    for name in ("off", "first", "second"):
        (tmp_path / name).mkdir()
    result, _ = run_eval(tmp_path / "off", off)
    assert result.exit_code == 0, result.output
    assert not (target / "specbound.json").exists()
    runs = [run_eval(tmp_path / name, tiny_suite(corpora, target, batch_size=1, peers=[], methods=methods))[0]
            for name in ("first", "second")]
    assert [r.exit_code for r in runs] == [0, 0], [r.output for r in runs]
    assert json.loads((target / "specbound.json").read_text())["layers"]  # stored where --method specbound reads
    first, second = (json.loads((run_dir(r) / "summary.json").read_text())["notes"] for r in runs)
    assert [n for n in first if "SpecBound was not calibrated" in n] and str(target) in " ".join(first)
    assert not [n for n in second if "SpecBound" in n]  # reused, not fitted again
    assert "SpecBound was not calibrated" in (run_dir(runs[0]) / "report.md").read_text()


@pytest.fixture(scope="module")
def tiny_drafter(tiny_target: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A drafter model sharing the tiny target's tokenizer: the target with noise on every weight."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny import perturbed

    folder = tmp_path_factory.mktemp("tiny-drafter")
    perturbed(AutoModelForCausalLM.from_pretrained(tiny_target), 0.02, seed=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_target).save_pretrained(folder)
    return folder


def test_eval_with_a_drafter_model_runs_assisted_generation(tmp_path: Path, corpora: dict[str, Path],
                                                            tiny_target: Path, tiny_drafter: Path) -> None:
    suite = tiny_suite(corpora, tiny_target, batch_size=1,
                       methods=["ar", "cmasd", {"name": "cmasd-ngram", "method": "cmasd", "drafter": "ngram"}],
                       models={"target": str(tiny_target), "drafter": str(tiny_drafter), "device": "cpu"},
                       peers=["assisted", {"kind": "assisted", "name": "hf-assisted-ct0.2",
                                           "assistant_confidence_threshold": 0.2, "num_assistant_tokens": 4}])
    result, _ = run_eval(tmp_path, suite)
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir(result) / "summary.json").read_text())
    overall = {r["method"]: r for r in summary["rows"] if r["scope"] == "all"}
    for name in ("cmasd", "cmasd-ngram", "hf-assisted", "hf-assisted-ct0.2"):  # all lossless: the greedy output
        assert overall[name]["agreement_with_ar"] == 1.0 and overall[name]["acceptance_rate"] is not None
    assert set(summary["skipped"]) == set()
    history = pq.read_table(next((tmp_path / "runs" / "history").glob("*.parquet"))).to_pylist()
    drafters = {row["method"]: row["method_drafter"] for row in history if row["setting"] == "batch-1"}
    assert drafters["cmasd"] == str(tiny_drafter) and drafters["cmasd-ngram"] == "ngram"  # a method's own drafter


@pytest.mark.ray
def test_eval_on_ray_actors_shares_the_documents(tmp_path: Path, corpora: dict[str, Path], tiny_target: Path,
                                                ray_local: str) -> None:
    suite = tiny_suite(corpora, tiny_target, batch_size=1, peers=["greedy"], methods=["ar", "cmasd"],
                       execution={"actors": 2, "cpus_per_actor": 0.5})
    result, _ = run_eval(tmp_path, suite, "--address", ray_local)
    assert result.exit_code == 0, result.output
    rows = json.loads((run_dir(result) / "summary.json").read_text())["rows"]
    overall = {r["method"]: r for r in rows if r["scope"] == "all"}
    assert overall["cmasd"]["docs"] == 4 and overall["cmasd"]["agreement_with_ar"] == 1.0


# -- the parts -----------------------------------------------------------------------------------------------
def _row(method: str, scope: str = "all", **numbers: Any) -> dict[str, Any]:
    return {"setting": "batch-1", "method": method, "scope": scope, "run_id": "before", **numbers}


def test_floors_and_previous_run_name_each_regression(tmp_path: Path, corpora: dict[str, Path]) -> None:
    suite = suite_from_dict({"corpora": [{"path": str(corpora["mt"]), "task": "translation"}],
                             "methods": ["ar", "specdec", "cmasd",
                                         {"name": "peek", "method": "cmasd", "checked": False}],
                             "floors": {"min_speedup": 1.0, "min_speedup_batched": 0.5, "max_quality_loss": 1.0,
                                        "lossless_agreement": 1.0}})
    rows = [_row("ar", "all", speedup_vs_ar=1.0), _row("ar", "mt", bleu=30.0),
            {**_row("specdec", "all", speedup_vs_ar=0.7), "setting": "batch-8"},  # min_speedup_batched 0.5
            _row("specdec", "all", speedup_vs_ar=0.9, agreement_with_ar=1.0, lossless=True, tokens_per_call=2.0),
            _row("cmasd", "all", speedup_vs_ar=1.2, agreement_with_ar=0.97, lossless=True, tokens_per_call=2.0),
            _row("cmasd", "mt", bleu=28.0), _row("peek", "all", speedup_vs_ar=0.1)]
    previous = [_row("specdec", "all", tokens_per_call=2.5)]
    found = sorted(r.message() for r in regressions(rows, previous, suite))
    assert len(found) == 4, found
    assert found[0].startswith("cmasd [batch-1, all]: agreement_with_ar 0.97 < floor lossless_agreement 1")
    assert found[1].startswith("cmasd [batch-1, mt]: bleu 28 is 2.00 points below AR's")
    assert found[2].startswith("specdec [batch-1, all]: speedup_vs_ar 0.9 < floor min_speedup 1")
    assert found[3].startswith("specdec [batch-1, all]: tokens_per_call 2 < 2.425: was 2.5 in run before")


def test_a_unit_disturbed_by_other_work_is_timed_again() -> None:
    timer = RoundRobin([], "batch-1", None, lambda text: None, "ar", retime_factor=2.0)
    walls = {"ar": [1.0, 2.0, 1.0, 1.5, 1.0], "fast": [0.5, 1.0, 2.5, 0.75, 0.5], "slow": [2.0, 4.0, 2.0, 3.0, 2.1]}
    results = [{name: ([], values[u]) for name, values in walls.items()} for u in range(5)]
    assert [(u, round(f, 1)) for u, f in timer._disturbed(results)] == [(2, 5.0)]  # "fast" was 5x off there
    assert RoundRobin([], "b", None, print, "ar", retime_factor=0)._disturbed(results) == []


def test_pareto_front_and_choice() -> None:
    def point(speed: float, quality: float) -> SweepPoint:
        return SweepPoint(f"p{speed}-{quality}", {"alpha": speed}, speed, quality, 2, {})

    points = mark_pareto([point(1.0, 1.0), point(1.5, 0.9), point(1.2, 0.8), point(2.0, 0.5)])
    assert [p.pareto for p in points] == [True, True, False, True]
    assert choose(points, 0.85).speed == 1.5
    assert choose(points, 1.1).quality == 1.0  # none good enough: the best quality


def test_calibration_counts_only_judged_tokens() -> None:
    trace = {"doc_id": ["d"] * 5, "iteration": [0, 0, 0, 1, 1], "accepted": [True, False, False, False, False]}
    assert judged(trace).tolist() == [True, True, False, True, False]
    cal = binned("m", "c", np.array([0.95, 0.95, 0.15, 0.15]), np.array([1.0, 1.0, 0.0, 1.0]), 10)
    assert [b.tokens for b in cal.bins] == [2, 2]
    assert cal.ece == pytest.approx(0.5 * 0.05 + 0.5 * 0.35)


def test_agreement_counts_positions_and_length_differences() -> None:
    def out(doc: str, tokens: list[int]) -> Output:
        return Output("m", "batch-1", doc, "c", tokens, "", DocStats(docs=1))

    ref = {"a": out("a", [1, 2, 3, 4]), "b": out("b", [5, 6])}
    assert agreement([out("a", [1, 2, 9, 4]), out("b", [5, 6, 7])], ref) == (5, 7, 0)
    assert agreement([out("a", [1, 2, 3, 4])], ref) == (4, 4, 1)


def test_paired_tests_see_a_real_loss_and_no_change() -> None:
    refs = [f"the cat number {i} sat on the red mat near the door" for i in range(30)]
    good = list(refs)
    bad = [f"a dog {i} ran" for i in range(30)]
    same_bleu, signatures = sacrebleu_paired(good, good, refs, 200)
    assert all(d.delta == 0 and d.p == 1.0 for d in same_bleu) and "bs:200" in signatures["bleu"]
    worse, _ = sacrebleu_paired(good, bad, refs, 200)
    assert all(d.significant_loss(0.05) for d in worse)
    rouge = rouge_paired(good, bad, refs, 200)
    assert all(d.significant_loss(0.05) and d.ci_high < 0 for d in rouge)


# -- the real model -----------------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_eval_on_the_real_model(tmp_path: Path) -> None:
    suite = {"name": "real-mini", "models": {"target": "smollm2", "drafter": "ngram", "device": "cpu"},
             "corpora": [{"path": str(ROOT / "jobs" / "data" / "demo.jsonl"), "task": "summarization", "limit": 1},
                         {"path": str(SUITES / "wmt16_en_ro.sample.jsonl"), "task": "translation", "limit": 1}],
             "decode": {"max_new_tokens": 8}, "batch_size": 2, "bootstrap_samples": 200,
             "methods": ["ar", "cmasd", {"name": "cmasd-relaxed", "method": "cmasd", "verify": "relaxed"}],
             "peers": ["greedy", {"kind": "prompt-lookup", "prompt_lookup_num_tokens": 5}],
             "floors": {"lossless_agreement": 1.0}}
    result, _ = run_eval(tmp_path, suite)
    assert result.exit_code == 0, result.output
    rows = json.loads((run_dir(result) / "summary.json").read_text())["rows"]
    overall = {(r["setting"], r["method"]): r for r in rows if r["scope"] == "all"}
    for method in ("cmasd", "hf-greedy", "hf-prompt-lookup-5"):
        assert overall[("batch-1", method)]["agreement_with_ar"] == 1.0
    assert overall[("batch-2", "hf-greedy")]["agreement_with_ar"] == 1.0
    assert overall[("batch-1", "cmasd-relaxed")]["tokens_per_call"] >= overall[("batch-1", "cmasd")]["tokens_per_call"]


def test_distill_suite_compares_drafters() -> None:
    suite = load_suite(SUITES / "distill.yaml")
    drafters = {m.name: m.drafter for m in suite.methods}
    assert drafters["cmasd-ngram"] == "ngram" and drafters["cmasd-distilled"] is None  # None: the suite's drafter
    assert suite.models.drafter.endswith("drafters/smollm2-distilled")
    assert {p.kind for p in suite.peers} >= {"assisted", "prompt-lookup"}
