"""Where the time of a decode goes, per phase: prefill, drafting, target forward, verification, cache commit,
drafter/controller bookkeeping, and the rest of the loop (Python overhead). SmolLM2-135M, batch 1, 128 new tokens,
4 CNN/DM + 4 XSum documents (as jobs/suites/performance.yaml), each method decoding every document once after an
untimed warm-up. On a CPU every phase is synchronous, so wall-clock sections are exact.

    python scripts/profile_decode.py                       # ar and strict cmasd with the defaults
    python scripts/profile_decode.py ar cmasd:ngram.branches=1 cmasd:verify=relaxed
    python scripts/profile_decode.py ar cmasd cmasd:drafter=head    # drafter=NAME: another drafter (the head)
    python scripts/profile_decode.py ar cmasd:drafter=head,head.branches=1   # overrides separated by commas
"""

import contextlib
import json
import sys
import time
from collections import defaultdict

import cmsd.decode
import cmsd.kv
from cmsd import DecodeSettings, Decoder, DocStats, PromptTemplate, load_pair
from cmsd.control import Controller
from cmsd.drafters.head import HeadDrafter
from cmsd.drafters.ngram import NgramDrafter, NgramTreeDrafter
from cmsd.models import ModelPair, load_drafter
from jobs.batch.spec import apply_overrides, parse_assignment

DATA = "../shared/data/"
PHASES = {  # phase -> (owner, attribute)
    "prefill": [(cmsd.decode, "open_state")],
    "draft": [(NgramDrafter, "propose"), (NgramTreeDrafter, "propose"), (HeadDrafter, "propose")],
    "target forward": [(cmsd.kv.HoleyState, "feed")],
    "verify": [(cmsd.decode, "verify"), (cmsd.decode, "verify_tree")],
    "cache commit": [(cmsd.kv.HoleyState, "commit")],
    "drafter commit": [(NgramDrafter, "commit"), (HeadDrafter, "commit")],  # a head's includes its cache's
    "controller": [(Controller, "draft_lengths"), (Controller, "observe"), (Controller, "thresholds")],
    "record (host transfer)": [(cmsd.decode.Decoder, "_record")],
}


@contextlib.contextmanager
def timed_phases(totals: dict[str, float]):
    saved = []
    for phase, places in PHASES.items():
        for owner, name in places:
            original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            saved.append((owner, name, original))

            def wrapper(*args, _f=original, _p=phase, **kwargs):
                start = time.perf_counter()
                try:
                    return _f(*args, **kwargs)
                finally:
                    totals[_p] += time.perf_counter() - start
            setattr(owner, name, wrapper)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def main(methods: list[str], docs: int = 4) -> None:
    rows = [json.loads(line) for line in open(DATA + "cnn_dailymail.test.jsonl")][:docs]
    rows += [json.loads(line) for line in open(DATA + "xsum.test.jsonl")][:docs]
    pair = load_pair("smollm2", "ngram", device="cpu", dtype="float32")
    prompts = [PromptTemplate("summarization").render(pair.tokenizer, r["source"]) for r in rows]
    base = DecodeSettings(max_new_tokens=128, batch_size=1)
    decoders = {}
    for spec in methods:
        method, _, overrides = spec.partition(":")
        assignments = dict(parse_assignment(a) for a in overrides.split(",") if a)  # section.field=value (YAML)
        drafter = assignments.pop("drafter", "ngram")
        data = apply_overrides(base.with_(method=method).to_dict(), assignments)
        decoders[spec] = Decoder(ModelPair(pair.target, load_drafter(pair.target, drafter)),
                                 DecodeSettings.from_dict(data))
        decoders[spec].generate(prompts[:1])  # warm-up, untimed
    walls: dict[str, float] = defaultdict(float)
    phases: dict[str, dict[str, float]] = {m: defaultdict(float) for m in methods}
    stats: dict[str, list] = defaultdict(list)
    for prompt in prompts:  # documents outer, methods inner: a burst of other work hits every method alike
        for spec, decoder in decoders.items():
            with timed_phases(phases[spec]):
                start = time.perf_counter()
                gen = decoder.generate([prompt])[0]
                walls[spec] += time.perf_counter() - start
            stats[spec].append(gen.stats)
    ar_wall = walls[methods[0]]
    for spec in methods:
        s = DocStats.total(stats[spec])
        wall, calls = walls[spec], s.target_calls
        print(f"\n{spec}: {s.new_tokens / wall:.2f} tok/s ({ar_wall / wall:.2f}x {methods[0]}), {calls} target calls, "
              f"{s.new_tokens / calls:.2f} tokens/call, {s.drafted / calls:.2f} drafted/call, wall {wall:.2f} s")
        costs = decoders[spec].costs
        print(f"  verify budget {decoders[spec].verify_tokens or 'none'} tokens"
              + (f"; measured pass costs for 1-{len(costs)} tokens: " + " ".join(f"{c:.2f}" for c in costs)
                 if costs else ""))
        rest = wall - sum(phases[spec].values())
        for phase, seconds in list(phases[spec].items()) + [("rest of the loop", rest)]:
            per_call = "" if phase == "prefill" else f"  {1000 * seconds / calls:6.2f} ms/call"
            print(f"  {phase:24s} {seconds:7.2f} s {100 * seconds / wall:5.1f} %{per_call}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["ar", "cmasd"])
