"""The job spec: sections, defaults written out, overrides, and clear errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.errors import BadInput
from jobs.batch.spec import JobSpec, apply_overrides, load_spec_file, parse_assignment


def test_resolved_spec_writes_every_default_and_reads_back() -> None:
    spec = JobSpec.from_dict({"corpus": {"path": "docs.jsonl"}, "decode": {"method": "specdec"}})
    data = yaml.safe_load(spec.to_yaml())
    assert list(data) == ["corpus", "task", "prompt", "models", "decode", "execution", "output"]
    assert data["models"] == {"target": "smollm2", "drafter": "ngram", "device": "auto", "dtype": "auto",
                              "load_format": "auto"}
    assert data["decode"]["control"]["k_max"] == 8 and data["execution"]["retries"] == 2
    assert JobSpec.from_dict(data) == spec


@pytest.mark.parametrize("data, words", [
    ({}, "corpus.path is required"),
    ({"corpus": {"path": "x", "colour": 1}}, "corpus.colour"),
    ({"corpus": {"path": "x"}, "decoding": {}}, "unknown spec section"),
    ({"corpus": {"path": "x"}, "decode": {"method": "fast"}}, "method must be one of"),
    ({"corpus": {"path": "x"}, "decode": {"control": {"k_max": 0}}}, "k_max"),
    ({"corpus": {"path": "x"}, "execution": {"actors": 0}}, "execution.actors"),
    ({"corpus": {"path": "x"}, "execution": {"baseline": -1}}, "execution.baseline"),
    ({"corpus": {"path": "x"}, "task": {"name": "poetry"}}, "task.name"),
    ({"corpus": {"path": "x"}, "models": {"load_format": "random"}}, "models.load_format must be one of auto, dummy"),
    ({"corpus": "x"}, "must be a mapping"),
])
def test_bad_specs_name_the_field(data: dict, words: str) -> None:
    with pytest.raises(BadInput, match=words):
        JobSpec.from_dict(data)


def test_overrides_set_dotted_fields_without_touching_the_original() -> None:
    data = {"corpus": {"path": "a.jsonl"}, "decode": {"control": {"k_max": 4}}}
    out = apply_overrides(data, {"decode.control.k_max": 12, "execution.actors": 3, "corpus.path": "b.csv"})
    assert out["decode"]["control"]["k_max"] == 12 and out["execution"]["actors"] == 3
    assert data["decode"]["control"]["k_max"] == 4
    assert JobSpec.from_dict(out).corpus.path == "b.csv"


def test_assignments_take_yaml_values() -> None:
    assert parse_assignment("decode.control.k_max=12") == ("decode.control.k_max", 12)
    assert parse_assignment("models.drafter=null") == ("models.drafter", None)
    assert parse_assignment("decode.confidence.weights=[0.5, 0.25, 0.25]")[1] == [0.5, 0.25, 0.25]
    with pytest.raises(BadInput, match="section.field=value"):
        parse_assignment("k_max")


def test_corpus_paths_in_a_spec_file_are_relative_to_it(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text("{}\n")
    (tmp_path / "job.yaml").write_text("corpus:\n  path: docs.jsonl\n")
    assert load_spec_file(tmp_path / "job.yaml")["corpus"]["path"] == str(tmp_path / "docs.jsonl")
    (tmp_path / "hub.yaml").write_text("corpus:\n  path: EdinburghNLP/xsum\n")
    assert load_spec_file(tmp_path / "hub.yaml")["corpus"]["path"] == "EdinburghNLP/xsum"


def test_an_unreadable_spec_file_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("corpus: [unclosed\n")
    with pytest.raises(BadInput, match="cannot read spec"):
        load_spec_file(tmp_path / "bad.yaml")
    with pytest.raises(BadInput, match="cannot read spec"):
        load_spec_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize("method, batch, baseline, rows, expected, tune", [
    ("cmasd", 8, 8, [64] * 4, {0: 8}, False),  # one group at the job's batch size
    ("cmasd", 1, 8, [64] * 4, {0: 2, 1: 2, 2: 2, 3: 2}, False),  # groups of 1 spread over the shards
    ("cmasd", 4, 12, [64] * 6, {0: 4, 2: 4, 4: 4}, False),
    ("cmasd", 8, 8, [3, 3], {0: 3}, False),  # never more than a shard has
    ("cmasd", 8, 0, [64] * 4, {}, False),  # --baseline 0
    ("ar", 8, 8, [64] * 4, {}, False),  # AR has nothing to compare with
    ("cmasd", 8, 8, [64] * 4, {}, True),  # a tuned job's comparison is its tuning's: nothing decoded twice
])
def test_baseline_documents_are_planned_per_shard(method: str, batch: int, baseline: int, rows: list[int],
                                                  expected: dict[int, int], tune: bool) -> None:
    from types import SimpleNamespace

    from jobs.batch.lifecycle import baseline_plan

    spec = JobSpec.from_dict({"corpus": {"path": "docs.jsonl"}, "decode": {"method": method, "batch_size": batch},
                              "execution": {"baseline": baseline, "tune": tune}})
    manifest = SimpleNamespace(shards=[SimpleNamespace(index=i, rows=n) for i, n in enumerate(rows)])
    assert baseline_plan(spec, manifest) == expected
