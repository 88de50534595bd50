"""Offline study of the n-gram drafter on greedy AR outputs of 8 CNN/DM + 8 XSum documents (128 new tokens):
first-token acceptance by match length, and predicted tokens/call and speedup of single-chain drafting with a
chain stop, at verify cost 1 + 0.17k (DESIGN.md).

    python scripts/ngram_study.py ar   # once, ~4 min: decode and cache the AR outputs in /tmp/ar_outs.pkl
    python scripts/ngram_study.py 8    # the study, 8 = the longest n-gram looked up
"""

import json
import pickle
import sys

import numpy as np

CACHE = "/tmp/ar_outs.pkl"
DATA = "../shared/data/"


def decode_ar() -> None:
    from cmsd import DecodeSettings, Decoder, PromptTemplate, load_pair

    rows = [json.loads(l) for l in open(DATA + "cnn_dailymail.test.jsonl")][:8]
    rows += [json.loads(l) for l in open(DATA + "xsum.test.jsonl")][:8]
    pair = load_pair("smollm2", "ngram")
    ids = [pair.tokenizer(PromptTemplate("summarization").render(pair.tokenizer, r["source"]))["input_ids"]
           for r in rows]
    gens = Decoder(pair, DecodeSettings(method="ar", max_new_tokens=128, batch_size=8)).generate_ids(ids)
    pickle.dump([(i, g.token_ids) for i, g in zip(ids, gens)], open(CACHE, "wb"))


def counts(seq, maxn):
    for n in range(min(maxn, len(seq) - 1), 0, -1):
        w = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
        st = np.flatnonzero((w == seq[-n:]).all(1))
        if len(st):
            f = seq[st + n][::-1]
            t, first, c = np.unique(f, return_index=True, return_counts=True)
            o = np.lexsort((first, -c))
            return n, t[o], c[o]
    return None


def simulate(data, maxn, lam, stop, kmax, slope=0.17):
    toks = calls = cost = 0
    for prompt, out in data:
        t, seq = 0, list(prompt)
        while t < len(out):
            ext, draft, p = list(seq), [], 1.0
            while len(draft) < kmax:
                r = counts(np.array(ext), maxn)
                if r is None:
                    break
                n, tk, cs = r
                q = lam(n) * cs[0] / cs.sum()
                if p * q < stop:
                    break
                p *= q
                draft.append(int(tk[0]))
                ext.append(int(tk[0]))
            a = 0
            while a < len(draft) and t + a < len(out) and draft[a] == out[t + a]:
                a += 1
            emit = min(a + 1, len(out) - t)
            seq += out[t:t + emit]
            t += emit
            toks, calls, cost = toks + emit, calls + 1, cost + 1 + slope * len(draft)
    return toks / calls, toks / cost


def study(maxn: int) -> None:
    data = pickle.load(open(CACHE, "rb"))
    recs = []
    for prompt, out in data:
        seq = np.array(prompt + out)
        for t in range(len(out)):
            r = counts(seq[:len(prompt) + t], maxn)
            if r:
                recs.append((r[0], int(r[1][0] == out[t])))
    recs = np.array(recs)
    for n in range(1, maxn + 1):
        sel = recs[:, 0] == n
        if sel.any():
            print(f"match length {n}: {int(sel.sum())} positions, first-token acceptance {recs[sel, 1].mean():.2f}")
    for kappa in (0.5, 1.5, 3.0):
        for stop in (0.1, 0.2, 0.3, 0.45):
            tpc, speed = simulate(data, maxn, lambda n: n / (n + kappa), stop, 12)
            print(f"kappa={kappa} chain_stop={stop}: tokens/call {tpc:.2f}, predicted speedup {speed:.2f}")


if __name__ == "__main__":
    decode_ar() if sys.argv[1:] == ["ar"] else study(int(sys.argv[1]) if sys.argv[1:] else 8)
