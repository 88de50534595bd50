"""Tuned jobs against every fixed configuration, side by side in one run: the wall time of whole `cmsd-jobs submit`s.

    python scripts/tune_bench.py --corpus ../shared/data/xsum.test.jsonl --docs 48 --new-tokens 64 [--rounds 3]
    python scripts/tune_bench.py --corpus ../shared/data/cnn_dailymail.test.jsonl --docs 16 --latency-only

Throughput: `--no-tune` jobs of {ar, cmasd} x batch {1, 8, 16, 32}, then the default (tuned) job twice: first with
no plan kept (its plans and cost measurements removed from $CMSD_CACHE: a fresh machine, less the model's one-time
conversion), then reusing the plan; with --rounds N the fastest `--no-tune` job, the tuned job's first run and
its second again, in turn, until each ran N times (their medians: one run's wall time varies by 5-15% here).
Latency: `--no-tune --method ar --batch-size 1` against `--objective latency` (both with their cost measurements
kept; --rounds N: in turn, N times each), per-document time from the results. Every job's output is compared with
AR's. Prints a Markdown table of ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def run_job(name: str, corpus: str, out: Path, args: argparse.Namespace, *flags: str) -> dict:
    command = [sys.executable, "-m", "jobs", "submit", "--corpus", corpus, "--limit", str(args.docs),
               "--max-new-tokens", str(args.new_tokens), "--out", str(out), "--job-id", name, *flags]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    job = out / name
    rows = [r for p in sorted((job / "results").glob("*.parquet")) for r in
            pq.read_table(p, columns=["id", "hypothesis", "latency_s"]).to_pylist()]
    summary = json.loads((job / "summary.json").read_text())
    print(f"{name}: {wall:.1f} s", file=sys.stderr, flush=True)
    return {"name": name, "flags": flags, "wall": wall, "out": {r["id"]: r["hypothesis"] for r in rows},
            "latency": sum(r["latency_s"] for r in rows) / len(rows), "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--docs", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--methods", default="ar,cmasd", help="the --no-tune jobs' methods")
    parser.add_argument("--batches", default="1,8,16,32", help="the --no-tune jobs' batch sizes")
    parser.add_argument("--latency-only", action="store_true")
    parser.add_argument("--rounds", type=int, default=1, help="then the fastest --no-tune job and the tuned job "
                        "(first run, plan reused) again, in turn, until each ran this many times: medians compared")
    parser.add_argument("--out", type=Path, default=Path("/tmp/tune-bench"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    cache = Path(os.environ.get("CMSD_CACHE", Path.home() / ".cache" / "cmsd"))
    corpus = str(Path(args.corpus).resolve())
    jobs = []
    if args.latency_only:
        for r in range(1, args.rounds + 1):
            tail = f"-r{r}" if r > 1 else ""
            jobs.append(run_job("ar-b1" + tail, corpus, args.out, args, "--no-tune", "--method", "ar",
                                "--batch-size", "1"))
            shutil.rmtree(cache / "plans", ignore_errors=True)
            jobs.append(run_job("latency" + tail, corpus, args.out, args, "--objective", "latency"))
        base = jobs[0]
        if args.rounds > 1:
            a, b = (statistics.median(j["latency"] for j in jobs[i::2]) for i in (0, 1))
            print(f"medians over {args.rounds} rounds, per document: ar-b1 {a:.2f} s, latency {b:.2f} s: "
                  f"{b / a:.3f}\n")
        print("| job | wall s | per-document s | vs AR b1 (per document) | tuning chose | output = AR |")
        print("| --- | --- | --- | --- | --- | --- |")
        for j in jobs:
            chosen = (j["summary"].get("tuning") or {}).get("chosen", {}).get("label", "-")
            print(f"| {j['name']} | {j['wall']:.1f} | {j['latency']:.2f} | {j['latency'] / base['latency']:.3f} | "
                  f"{chosen} | {j['out'] == base['out']} |")
        return
    for method in args.methods.split(","):
        for batch in args.batches.split(","):
            jobs.append(run_job(f"{method}-b{batch}", corpus, args.out, args, "--no-tune", "--method", method,
                                "--batch-size", batch))
    fastest = min(jobs, key=lambda j: j["wall"])
    fixed, first, again = [fastest], [], []
    for r in range(1, args.rounds + 1):
        if r > 1:
            fixed.append(run_job(f"{fastest['name']}-r{r}", corpus, args.out, args, *fastest["flags"]))
            jobs.append(fixed[-1])
        for folder in ("plans", "kernels"):  # a fresh machine: nothing measured before (the model stays converted)
            shutil.rmtree(cache / folder, ignore_errors=True)
        first.append(run_job("tuned-first" + (f"-r{r}" if r > 1 else ""), corpus, args.out, args))
        again.append(run_job("tuned-again" + (f"-r{r}" if r > 1 else ""), corpus, args.out, args))
        jobs += [first[-1], again[-1]]
    ar = jobs[0]
    print(f"fastest --no-tune job: {fastest['name']} ({fastest['wall']:.1f} s)\n")
    if args.rounds > 1:
        a, b, c = (statistics.median(j["wall"] for j in group) for group in (fixed, first, again))
        print(f"medians over {args.rounds} rounds: {fastest['name']} {a:.1f} s; tuned, first run {b:.1f} s: "
              f"{b / a:.3f}; tuned, plan reused {c:.1f} s: {c / a:.3f}\n")
    print("| job | wall s | vs fastest --no-tune | tuning chose | tuning s | speedup_vs_ar | output = AR b1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for j in jobs:
        tuning = j["summary"].get("tuning") or {}
        speedup = j["summary"]["overall"].get("speedup_vs_ar")
        print(f"| {j['name']} | {j['wall']:.1f} | {j['wall'] / fastest['wall']:.3f} | "
              f"{tuning.get('chosen', {}).get('label', '-')} ({tuning.get('source', '-')}) | "
              f"{tuning.get('seconds', 0):.1f} | {speedup if speedup is None else round(speedup, 3)} | "
              f"{j['out'] == ar['out']} |")


if __name__ == "__main__":
    main()
