"""The GPU check (scripts/gpu_check.sh): cost curves and decode speed of real model shapes with dummy weights, on
the device at hand, and the projection of the real SmolLM2-135M's measured acceptance onto it.

For each shape (cmsd.models.SHAPES) in the dtype asked for: the pass grid (rows x tokens x cache length), the
prefill of one row, and real decodes of the shipped prompts by AR, CM-ASD with the n-gram drafter and CM-ASD with
the shipped feature head (where the shape is the one it was trained for) at each batch size: tokens a second,
seconds of an iteration and its host share, device-to-host transfers per iteration, peak device memory. Then the
projection (cmsd.projection) of the real model's traces (scripts/data/smollm2-135m.traces.json, decoded on a CPU
with its real weights) onto the first shape's curve. Writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md.

Dummy weights: the speed is the shape's, the acceptance in the decode rows is not a real model's (a random model
drafts and accepts what it happens to); only the projection uses real acceptance. Needs torch, transformers and
this checkout only (no Ray, no model hub, no tokenizer: the prompts ship as token ids).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from cmsd.costs import Curve, device_name, measure_curve  # noqa: E402
from cmsd.models import load_model  # noqa: E402
from cmsd.projection import Traced, as_ar, project  # noqa: E402

DATA = ROOT / "scripts" / "data"
PROMPTS = DATA / "demo-prompts.json"  # jobs/data/demo.jsonl rendered and tokenized for SmolLM2 (make_gpu_data.py)
TRACES = DATA / "smollm2-135m.traces.json"  # the real model's decodes on CPU (scripts/projection_check.py)
GPU = {"shapes": ["smollm2-135m", "smollm2-1.7b", "llama-3.1-8b"], "dtype": "bfloat16", "batches": [1, 8, 32],
       "tokens": [1, 2, 4, 8, 16], "contexts": [256, 1024], "prefill": [128, 512, 2048], "new_tokens": 64,
       "prompt_tokens": 0}
CPU = {"shapes": ["smollm2-135m"], "dtype": "float32", "batches": [1, 4], "tokens": [1, 2, 4], "contexts": [128],
       "prefill": [32, 64], "new_tokens": 8, "prompt_tokens": 48}
ARMS = [("ar", None), ("cmasd", "ngram"), ("cmasd", "head")]
log = logging.getLogger("gpu_check")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (small settings: the suite's run)")
    for name, kind in (("shapes", str), ("batches", int), ("tokens", int), ("contexts", int), ("prefill", int)):
        parser.add_argument(f"--{name}", type=kind, nargs="+")
    parser.add_argument("--dtype")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--prompt-tokens", type=int, help="cut each prompt to this many tokens (0: whole)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: pass --device cpu")
    conf = {**(GPU if device.type == "cuda" else CPU),
            **{k: v for k, v in vars(args).items() if v is not None and k not in ("outdir", "device")}}
    args.outdir.mkdir(parents=True, exist_ok=True)
    prompts = [p[:conf["prompt_tokens"]] if conf["prompt_tokens"] else p for p in json.loads(PROMPTS.read_text())]
    started, shapes = time.perf_counter(), []
    for shape in conf["shapes"]:
        shapes.append(check_shape(shape, device, conf, prompts))
    report = {"device": device_name(device), "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "settings": conf, "shapes": shapes,
              "projection": projection(Curve.from_dict(shapes[0]["curve"]), conf["batches"]),
              "seconds": round(time.perf_counter() - started, 1)}
    (args.outdir / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (args.outdir / "gpu_check.md").write_text(markdown(report))
    print((args.outdir / "gpu_check.md").read_text())


def check_shape(shape: str, device: torch.device, conf: dict, prompts: list[list[int]]) -> dict:
    log.info("%s: building dummy weights (%s, %s)", shape, conf["dtype"], device)
    target = load_model(shape, device, conf["dtype"], load_format="dummy")
    params = sum(p.numel() for p in target.model.parameters())
    curve, notes = measure_curve(target, conf["batches"], conf["tokens"], conf["contexts"], conf["prefill"],
                                 [(method, name, rows) for method, name in ARMS for rows in conf["batches"]], prompts,
                                 conf["new_tokens"])
    out = {"shape": shape, "parameters": params, "curve": curve.to_dict(), "notes": notes}
    del target
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def projection(curve: Curve, batches: list[int]) -> dict:
    """The real SmolLM2-135M's measured acceptance (its CPU decodes' traces) on `curve`'s device, per arm and batch,
    against AR on the same documents."""
    saved = json.loads(TRACES.read_text())
    arms = [Traced.from_dict(t) for t in saved["arms"]]
    rows = []
    for arm in arms:
        ar = {c.batch_size: c for c in project(curve, as_ar(arm), batches)}
        for c in project(curve, arm, batches):
            rows.append({"label": c.label, "batch_size": c.batch_size, "tokens_per_s": c.tokens_per_s,
                         "tokens_per_call": c.tokens_per_call, "vs_ar": c.tokens_per_s / ar[c.batch_size].tokens_per_s})
    return {"curve": curve.model, "traces": saved["source"], "rows": rows}


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']} (dummy weights: speed only; acceptance is projected from real traces)",
             "", f"torch {report['torch']}, transformers {report['transformers']}, {report['seconds']} s", ""]
    for shape in report["shapes"]:
        curve = Curve.from_dict(shape["curve"])
        context = max(c for _, _, c in curve.steps)
        tokens = sorted({t for _, t, _ in curve.steps})
        rows = sorted({r for r, _, _ in curve.steps})
        lines += [f"## {shape['shape']} ({shape['parameters'] / 1e6:.0f}M parameters, {curve.dtype})", "",
                  f"Pass cost, ms (rows x tokens a row, cache of {context}):", "",
                  "| rows | " + " | ".join(f"k={t}" for t in tokens) + " |", "|---" * (len(tokens) + 1) + "|"]
        lines += [f"| {r} | " + " | ".join(f"{1e3 * curve.steps[r, t, context]:.2f}" for t in tokens) + " |"
                  for r in rows]
        lines += ["", "| decode | batch | tokens/s | ms/iteration | host ms/iteration | tokens/pass | syncs/iteration |"
                  " peak MiB |", "|---|---|---|---|---|---|---|---|"]
        for loop in curve.loops:
            label = loop.method if loop.drafter is None else f"{loop.method}/{loop.drafter}"
            syncs = "-" if loop.syncs is None else f"{loop.syncs:.2f}"
            peak = "-" if loop.peak_mb is None else f"{loop.peak_mb:.0f}"
            lines.append(f"| {label} | {loop.rows} | {loop.tokens_per_s:.1f} | {1e3 * loop.iteration_s:.2f} | "
                         f"{1e3 * loop.host_s:.2f} | {loop.new_tokens / loop.iterations / loop.rows:.2f} | {syncs} | "
                         f"{peak} |")
        lines += [f"- {note}" for note in shape["notes"]] + [""]
    proj = report["projection"]
    lines += [f"## Projection: the real SmolLM2-135M's acceptance on this device's {proj['curve']} curve", "",
              f"Traces: {proj['traces']}. A projection, not a measurement.", "",
              "| arm | batch | projected tokens/s | tokens/call | vs AR |", "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['batch_size']} | {r['tokens_per_s']:.1f} | {r['tokens_per_call']:.2f} | "
              f"{r['vs_ar']:.2f}x |" for r in proj["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
