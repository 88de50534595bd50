"""The command line: fast help, and bad input reported with exit code 2 before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cmsd.drafters.head import SHIPPED
from jobs.cli import main
from tests.raytest import articles, write_jsonl

ROOT = Path(__file__).parents[2]


def test_help_is_instant_and_loads_no_torch_or_ray() -> None:
    code = "import sys, jobs.cli; print(sorted(m for m in ('torch', 'ray', 'cmsd', 'pyarrow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    help_text = CliRunner().invoke(main, ["--help"]).output
    for command in ("submit", "status", "resume", "report", "Exit codes"):
        assert command in help_text
    submit_help = CliRunner().invoke(main, ["submit", "--help"]).output
    for flag in ("--corpus", "--method", "--verify", "--drafter", "--max-new-tokens", "--limit", "--set", "--demo"):
        assert flag in submit_help


def test_click_lives_in_jobs_cli_only() -> None:
    """The packages under the CLI (job system, evaluation, training, k8s) import no Click: the CLI is a layer."""
    modules = "jobs.batch.lifecycle, jobs.eval.run, jobs.train.distill, jobs.train.calibrate, jobs.k8s.render"
    code = f"import sys, {modules}; print('click' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
    assert {"submit", "tune", "resume", "status", "report", "project", "eval", "k8s", "calibrate", "distill"} == \
        set(main.commands)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", articles(4))


def submit(tmp_path: Path, *args: str) -> tuple[int, str]:
    out = tmp_path / "runs"
    result = CliRunner().invoke(main, ["submit", "--out", str(out), *args])
    assert not out.exists(), "bad input must write nothing"
    return result.exit_code, result.output


@pytest.mark.parametrize("args, words", [
    (["--corpus", "missing.jsonl"], "cannot read corpus file"),
    (["--source-field", "body"], "no field 'body'"),
    (["--reference-field", "gold"], "no field 'gold'"),
    (["--target", "nobody/no-such-model"], "cannot load model 'nobody/no-such-model'"),
    (["--drafter", "/no/such/drafter"], "cannot load model '/no/such/drafter'"),
    (["--drafter", "head"], "the shipped heads were trained for: 'smollm2'"),
    (["--drafter", str(SHIPPED / "smollm2")], "was trained for target 'smollm2' (llama/576/30/49152)"),
    (["--method", "fast"], "method must be one of"),
    (["--set", "decode.control.k_max=0"], "k_max"),
    (["--set", "execution.colour=red"], "execution.colour"),
    (["--method", "specbound"], "use drafter 'self'"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--set", "prompt.template='{source} in {nope}'"], "cannot be rendered: KeyError('nope')"),
    (["--set", "prompt.template=no source"], "prompt template must contain {source}"),
    (["--load-format", "random"], "'random' is not one of 'auto', 'dummy'"),
    (["--set", "models.load_format=random"], "models.load_format must be one of auto, dummy; got 'random'"),
    (["--load-format", "dummy", "--target", "llama-3.1-8B"], "cannot load the config of 'llama-3.1-8B' for dummy"),
    (["--load-format", "dummy", "--target", "smollm2-135m", "--drafter", "llama-3.1-8b"],
     "a vocabulary of 128256 ids, the target 49152"),
])
def test_bad_input_exits_2_and_writes_nothing(args: list[str], words: str, corpus: Path, tiny_target: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = submit(tmp_path, "--corpus", str(corpus), "--target", str(tiny_target), *args)
    assert code == 2, output
    assert words in output


def test_a_head_tree_where_it_is_not_exact_is_bad_input(corpus: Path, tmp_path: Path) -> None:
    """The head's tree settings are checked at submit, against the shipped head's own target."""
    code, output = submit(tmp_path, "--corpus", str(corpus), "--target", "smollm2", "--drafter", "head",
                          "--verify", "relaxed", "--set", "decode.head.branches=3")
    assert code == 2 and "head.branches > 1 (tree drafts) needs strict greedy decoding" in output, output


def test_a_corpus_with_no_decodable_row_is_bad_input(tmp_path: Path, tiny_target: Path) -> None:
    path = write_jsonl(tmp_path / "empty.jsonl", [{"source": ""}, {"source": 3}])
    code, output = submit(tmp_path, "--corpus", str(path), "--target", str(tiny_target))
    assert code == 2 and "no row can be decoded (2 refused; first: row 0: empty 'source')" in output


def test_spec_file_and_demo_together_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("corpus: {path: x.jsonl}\n")
    code, output = submit(tmp_path, str(tmp_path / "job.yaml"), "--demo")
    assert code == 2 and "not both" in output


def test_status_of_a_directory_that_is_no_job(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert result.exit_code == 2 and "is not a job directory" in result.output


def test_prepare_only_writes_the_job_directory_and_stops(tmp_path: Path, tiny_target: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", articles(5) + [{"id": "doc-001", "source": "again"}])
    out = tmp_path / "runs"
    result = CliRunner().invoke(main, ["submit", "--corpus", str(path), "--target", str(tiny_target), "--out",
                                       str(out), "--job-id", "prep", "--shards", "2", "--prepare-only"])
    assert result.exit_code == 0, result.output
    job = out / "prep"
    lines = result.output.strip().splitlines()
    assert lines[-1] == str(job) and lines[-2] == f"prepared; run it with: cmsd-jobs resume {job}"
    assert sorted(p.name for p in job.iterdir()) == ["errors", "manifest.json", "shards", "spec.yaml"]
    assert sorted(p.name for p in (job / "shards").iterdir()) == ["shard-00000.arrow", "shard-00001.arrow"]
    status = CliRunner().invoke(main, ["status", str(job), "--json"])
    info = json.loads(status.output)
    assert (info["state"], info["rows"], info["rows_refused"], info["unfinished"]) == ("unfinished", 5, 1, [0, 1])


def test_tune_with_dummy_weights_says_so_first(tmp_path: Path, corpus: Path, tiny_target: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`cmsd-jobs tune --load-format dummy` tunes on random weights of the target's shape and says so first."""
    import torch

    from jobs.batch.quality import DUMMY_NOTE

    monkeypatch.setenv("CMSD_CACHE", str(tmp_path / "cache"))  # the plan is kept there
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(main, ["tune", "--corpus", str(corpus), "--target", str(tiny_target),
                                           "--load-format", "dummy", "--max-new-tokens", "8"])
    finally:
        torch.set_num_threads(threads)  # tune takes an actor's share of the CPUs for this process
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == DUMMY_NOTE and lines[1].startswith("Tuned for throughput (measured now")
