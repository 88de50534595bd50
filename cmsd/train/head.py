"""Training a feature head (cmsd.drafters.head): its inputs from the teacher's data, EAGLE's two losses, the held-out
check, and writing the head directory that cmsd.drafters.head.load_head reads."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cmsd.decode import Decoder
from cmsd.drafters.head import HEAD_CONFIG, HEAD_WEIGHTS, FeatureHead, HeadInfo
from cmsd.models import LoadedModel, ModelPair
from cmsd.settings import DecodeSettings
from cmsd.stats import DocStats
from cmsd.train.data import TeacherData, pad, soft_targets, vocab_index
from cmsd.train.loop import DistillSettings, Progress, TrainState, train_loop

FEATURE_NOISE = 0.1  # training adds Gaussian noise of this many feature standard deviations to the input features:
#                      drafting past the first token reads the head's own (inexact) features


def save_head(head: FeatureHead, out: Path, target_name: str, meta: dict, card: str) -> None:
    """A head directory: head.json, head.safetensors (fc and the layers, float16) and the model card."""
    out.mkdir(parents=True, exist_ok=True)
    full = len(head.vocab) == head.lm_head.vocab_size
    info = HeadInfo(target_name, head.fingerprint, len(head.body.layers), [] if full else head.vocab.tolist(),
                    meta, head.shape)
    (out / HEAD_CONFIG).write_text(json.dumps(asdict(info)))
    weights = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in head.state_dict().items()
               if not k.startswith("lm_head.")}  # the LM head is the target's
    save_file(weights, str(out / HEAD_WEIGHTS))
    (out / "README.md").write_text(card)


def head_inputs(data: TeacherData, rows: list[int], device: torch.device, noise: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded [B, L-1] inputs of the rows' sequences: features f_0..f_{L-2} [B, L-1, H] (with noise), tokens
    x_1..x_{L-1} and the attention mask."""
    seqs = [data.seqs[i] for i in rows]
    ids, mask = pad([s[1:].tolist() for s in seqs], device)
    width, hidden = ids.shape[1], data.features[rows[0]].shape[1]
    feats = torch.zeros(len(rows), width, hidden, device=device)
    for r, i in enumerate(rows):
        f = data.features[i][:-1].float().to(device)
        feats[r, :len(f)] = f
    if noise:
        scale = noise * feats[mask.bool()].std()
        feats = feats + scale * torch.randn(feats.shape, generator=generator, device=device) * mask[..., None]
    return feats, ids, mask


def shifted(data: TeacherData, rows: list[int]) -> TeacherData:
    """The teacher's data one position on: the head's output at t is scored against the target at t + 1."""
    return TeacherData([data.seqs[i][1:] for i in rows], [max(0, data.answer_starts[i] - 1) for i in rows],
                       [data.top_ids[i][1:] for i in rows], [data.top_p[i][1:] for i in rows],
                       [data.features[i][1:] for i in rows])


def head_loss(head: FeatureHead, data: TeacherData, rows: list[int], index: torch.Tensor,
              generator: torch.Generator, feature_weight: float = 0.1) -> torch.Tensor:
    """Soft cross-entropy from the target's distribution at t + 1 to the head's q from (f_t, x_{t+1}), plus a
    smooth-L1 pull of g_{t+1} towards the target's feature f_{t+1} (EAGLE's two losses)."""
    device = head.fc.weight.device
    feats, ids, mask = head_inputs(data, rows, device, FEATURE_NOISE, generator)
    g = head.run(feats, ids, attention_mask=mask)
    nxt = shifted(data, rows)
    cols, probs, counted = soft_targets(nxt, list(range(len(rows))), ids.shape[1], index, device)
    counted = counted & mask.bool()
    logp = torch.log_softmax(head.draft_logits(g).float(), -1)
    ce = -((logp.gather(-1, cols) * probs).sum(-1) * counted).sum() / counted.sum().clamp(min=1)
    truth, _, _ = head_inputs(nxt, list(range(len(rows))), device)
    truth = torch.cat([truth, torch.zeros_like(truth[:, :1])], 1)[:, :g.shape[1]]  # f_{t+1}; the last has none
    has = mask.bool().clone()
    lengths = mask.sum(1)
    has[torch.arange(len(rows)), (lengths - 1).clamp(min=0)] = False
    reg = F.smooth_l1_loss(g.float()[has], truth[has], reduction="mean") if bool(has.any()) else g.sum() * 0
    return ce + feature_weight * reg


def train_head(head: FeatureHead, data: TeacherData, settings: DistillSettings, progress: Progress | None = None,
               checkpoint: Path | None = None) -> TrainState:
    index = vocab_index(head.vocab, head.lm_head.vocab_size)
    head.embed.weight.requires_grad_(False)  # the target's: frozen
    generator = torch.Generator(device=head.fc.weight.device).manual_seed(settings.seed)
    return train_loop(head, data, settings, lambda rows: head_loss(head, data, rows, index, generator),
                      progress, checkpoint)


@dataclass
class HeadHeldOut:
    positions: int  # continuation positions scored
    acceptance: float  # first-token acceptance: top-1 of q(x_{t+2} | f_t, x_{t+1}) == the target's, continuations
    acceptance_all: float  # ... at every position, prompts included
    kl: float  # KL(target || head) over the draft vocabulary, continuation positions
    coverage: float  # share of the target's continuation tokens inside the draft vocabulary
    confident_share: float = 0.0  # continuation positions where the head's top-1 probability is >= 0.5
    confident_acceptance: float = 0.0


@torch.inference_mode()
def evaluate_head(head: FeatureHead, data: TeacherData) -> HeadHeldOut:
    """Teacher-forced on held-out sequences (prompt + the target's greedy continuation): at each position the head
    reads the target's real feature, as the first drafted token of every iteration does."""
    device, was_training = head.fc.weight.device, head.training
    head.eval()
    index = vocab_index(head.vocab, head.lm_head.vocab_size)
    hits = hits_all = positions = total = inside = sure = sure_hits = 0
    kl = 0.0
    for i in range(len(data.seqs)):
        if len(data.seqs[i]) < 3:
            continue
        feats, ids, mask = head_inputs(data, [i], device)
        logp = torch.log_softmax(head.draft_logits(head.run(feats, ids, attention_mask=mask)).float(), -1)[0]
        nxt = shifted(data, [i])
        theirs = nxt.top_ids[0][:, 0].long()[:len(logp)]  # the target's greedy token after x_{t+1}
        mine = head.vocab.to(device)[logp.argmax(-1)].cpu()
        match = mine == theirs
        start = max(nxt.answer_starts[0] - 1, 0)  # continuation positions: the predicted token is generated
        cont = match[start:]
        cols, probs, counted = soft_targets(nxt, [0], len(logp), index, device)
        p = (probs[0] * counted[0, :, None])[start:]
        kl += float((p * (p.clamp(min=1e-12).log() - logp[start:].gather(-1, cols[0, start:]))).sum())
        confident = (logp.max(-1).values.exp().cpu() >= 0.5)[start:]
        hits, hits_all = hits + int(cont.sum()), hits_all + int(match.sum())
        positions, total = positions + len(cont), total + len(match)
        inside += int((index[theirs[start:]] >= 0).sum())
        sure, sure_hits = sure + int(confident.sum()), sure_hits + int((cont & confident).sum())
    head.train(was_training)
    return HeadHeldOut(positions, hits / max(positions, 1), hits_all / max(total, 1), kl / max(positions, 1),
                       inside / max(positions, 1), sure / max(positions, 1), sure_hits / max(sure, 1))


def decode_held_out(target: LoadedModel, head: FeatureHead, data: TeacherData, new_tokens: int,
                    progress: Callable[[int], None] | None = None) -> dict:
    """Decode the held-out prompts with the head (strict cmasd, batch 1, the decoder's own chain lengths): the
    target's output, so tokens per target call and acceptance are what a job would see."""
    prompts = [seq[:start].tolist() for seq, start in zip(data.seqs, data.answer_starts)]
    decoder = Decoder(ModelPair(target, head), DecodeSettings(method="cmasd", verify="strict",
                                                              max_new_tokens=new_tokens, batch_size=1, trace=False))
    total = DocStats.total([g.stats for g in decoder.generate_ids(prompts, progress=progress)])
    rates = total.rates()
    return {"tokens_per_call": rates["tokens_per_call"], "draft_acceptance": rates["acceptance_rate"],
            "drafted_per_call": total.drafted / max(total.target_calls, 1), "decoded_docs": len(prompts)}
