"""`cmsd-jobs project JOB_DIR --curve FILE`: a finished job's speed projected onto another device (cmsd.projection):
its results and traces (what its drafts gained, with its real model) and that device's cost curve (a cmsd.costs
curve, or the GPU check's gpu_check.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jobs.batch.manifest import load_manifest
from jobs.errors import BadInput
from workers.store import JobStore, result_path, trace_path

RESULT_COLUMNS = ["prompt_tokens", "new_tokens", "iterations", "drafted"]
TRACE_COLUMNS = ["doc_id", "iteration", "accepted"]


def job_arm(store: JobStore) -> Any:
    """A finished job's cmsd.projection.Traced. The arm is the job's method and drafter, or the one its tuned actors
    all chose; a job whose actors decoded with different arms cannot be projected as one."""
    from cmsd.projection import traced

    if not store.exists("summary.json"):
        raise BadInput(f"{store.uri}: no summary.json: the job has not finished (`cmsd-jobs resume` it)")
    summary, manifest = store.read_json("summary.json"), load_manifest(store)
    method, drafter = summary["method"], summary["drafter"]
    if summary.get("tuning"):
        ran = set(summary["tuning"]["actors"].values())
        arms = {(c["method"], c["drafter"]) for c in summary["tuning"]["candidates"] if c["label"] in ran}
        if len(arms) != 1:
            raise BadInput(f"{store.uri}: its actors decoded with different configurations ({', '.join(sorted(ran))})"
                           ": project a job that ran one (--no-tune)")
        method, drafter = arms.pop()
    docs: list[dict[str, int]] = []
    trace: tuple[list, list, list] = ([], [], [])
    for entry in manifest.shards:
        docs += store.read_parquet(result_path(entry.index), RESULT_COLUMNS).to_pylist()
        if store.exists(trace_path(entry.index)):
            table = store.read_parquet(trace_path(entry.index), TRACE_COLUMNS)
            for column, values in zip(TRACE_COLUMNS, trace):
                values += table.column(column).to_pylist()
    return traced(method, drafter, docs, trace)


def read_curve(path: str, shape: str | None) -> Any:
    """A cmsd.costs.Curve from a curve file, or from the GPU check's gpu_check.json (the shape named, or its first)."""
    from cmsd.costs import Curve

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise BadInput(f"--curve {path}: cannot read it ({err})") from err
    if "shapes" in data:  # gpu_check.json
        curves = {s["shape"]: s["curve"] for s in data["shapes"]}
        if shape is not None and shape not in curves:
            raise BadInput(f"--curve {path} has no curve of shape {shape!r} (it has {', '.join(curves)})")
        data = curves[shape or next(iter(curves))]
    try:
        return Curve.from_dict(data)
    except (KeyError, TypeError) as err:
        raise BadInput(f"--curve {path}: not a cost curve (missing {err})") from err


def projection_table(job_dir: str, curve_path: str, shape: str | None, batches: list[int], verify_tokens: int,
                     k_max: int) -> str:
    """The job's arm and AR on the same documents, projected at each batch size, as a markdown table."""
    from cmsd.projection import as_ar, project

    store = JobStore(job_dir)
    arm, curve = job_arm(store), read_curve(curve_path, shape)
    rows = project(curve, as_ar(arm), batches) if arm.method == "ar" else \
        project(curve, as_ar(arm), batches) + project(curve, arm, batches, verify_tokens, k_max)
    ar = {c.batch_size: c.tokens_per_s for c in rows if c.method == "ar"}
    dummy = " (its loops on dummy weights: their host times hold, not their acceptance)" if curve.dummy else ""
    lines = [f"Projection (not a measurement) of {store.uri} ({arm.docs} documents, {arm.label}) onto "
             f"{curve.device}, {curve.model} {curve.dtype}{dummy}", "",
             "| configuration | projected tokens/s | tokens/call | vs AR at its batch |", "|---|---|---|---|"]
    lines += [f"| {c.label} | {c.tokens_per_s:.1f} | {c.tokens_per_call:.2f} | "
              f"{c.tokens_per_s / ar[c.batch_size]:.2f}x |" for c in rows]
    return "\n".join(lines)
