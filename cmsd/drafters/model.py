"""A separate Hugging Face model as the drafter: one that shares the target's tokenizer, or one distilled from the
target (`cmsd-jobs distill`, cmsd.train.distill), whose directory may name a reduced draft vocabulary
(draft_vocab.json): `use_draft_vocab` swaps in a DraftVocabHead over those ids when the drafter is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel

from cmsd.drafters.base import Draft, DraftBuffer, Drafter, Keep, Sampler
from cmsd.kernels import linear
from cmsd.kv import open_state, refill_state
from cmsd.settings import ConfidenceSettings
from cmsd.syncs import HostReads, Read

DRAFT_VOCAB_FILE = "draft_vocab.json"


class ModelDrafter(Drafter):
    """A separate (small) Hugging Face model sharing the target's tokenizer, with its own KV cache."""

    def __init__(self, model: PreTrainedModel, prompts: list[list[int]], capacity: int, conf: ConfidenceSettings,
                 sampler: Sampler, reads: HostReads | None = None) -> None:
        self.state, first = open_state(model, prompts, capacity, reads=reads)
        self.conf_settings, self.sampler = conf, sampler
        device = model.device
        self.pending = first[:, None]  # [B, P] tokens not yet in the drafter's cache
        self.pending_ok = torch.ones_like(self.pending, dtype=torch.bool)
        self.reads = reads or HostReads()
        self.whole: bool | Read = True  # pending_ok is all True, as the host knows (then its feed is known whole)
        self.fed_drafts = torch.zeros(len(first), dtype=torch.long, device=device)  # drafts fed to the cache
        self.tokens = self.pending[:, :0]
        self.fed = False

    @torch.inference_mode()
    def propose(self, k: torch.Tensor, k_host: list[int], keep: Keep | None) -> Draft:
        batch, width = len(k), max(k_host, default=0)
        device = self.pending.device
        self.fed = width > 0
        if width == 0:
            self.tokens = self.pending[:, :0]
            return Draft.empty(batch, device)
        k = k.to(device)
        buf = DraftBuffer(batch, width, device, keep_q=self.sampler.temperature > 0)
        tokens, valid = self.pending, self.pending_ok
        whole = self._whole()
        active = k > 0
        self.fed_drafts.zero_()
        for j in range(width):
            logits = self.state.feed(tokens, None if whole else valid)  # [B, W, V]
            last = (valid.long() * torch.arange(valid.shape[1], device=device)).argmax(1)
            z = logits[torch.arange(batch, device=device), last]  # [B, V] logits after each row's last token
            x, active, done = buf.take(j, z, active, k, keep, self.conf_settings, self.sampler)
            if done:
                break
            tokens, valid = x[:, None], active[:, None]
            whole = keep is None and min(k_host) > j + 1  # every row drafts on
            self.fed_drafts += active.long()
        self.tokens = buf.tokens
        return buf.draft()

    def commit(self, accepted: torch.Tensor, next_token: torch.Tensor, path: torch.Tensor | None = None) -> None:
        assert path is None, "a model drafter drafts chains"
        if not self.fed:  # nothing was fed: the old pending tokens wait, the new one joins them
            self.pending = torch.cat([self.pending, next_token[:, None]], 1)
            self.pending_ok = torch.cat([self.pending_ok, torch.ones_like(self.pending_ok[:, :1])], 1)
            return
        self.state.commit(self.pending_ok.sum(1) + torch.minimum(accepted, self.fed_drafts))
        unfed = accepted > self.fed_drafts  # the last accepted draft was never fed to the drafter
        last = self.tokens.gather(1, (accepted - 1).clamp(min=0)[:, None]).squeeze(1)
        self.pending = torch.stack([torch.where(unfed, last, next_token), next_token], 1)
        self.pending_ok = torch.stack([torch.ones_like(unfed), unfed], 1)
        self.whole = self.reads.ask(unfed.all())  # read with the verdict

    def select(self, rows: torch.Tensor) -> None:
        self.state.select(rows)
        self.pending, self.pending_ok = self.pending[rows], self.pending_ok[rows]
        self.fed_drafts, self.tokens = self.fed_drafts[rows], self.tokens[rows]

    def refill(self, rows: list[int], prompts: list[list[int]]) -> None:
        first = refill_state(self.state, rows, prompts)
        index = torch.tensor(rows, device=self.pending.device)
        self.pending[index, 0], self.pending_ok[index] = first, False
        self.pending_ok[index, 0] = True
        self.whole = self._whole() and self.pending_ok.shape[1] == 1

    def _whole(self) -> bool:
        if isinstance(self.whole, Read):
            self.whole = bool(self.whole.value)
        return self.whole


class DraftVocabHead(torch.nn.Module):
    """An LM head over a subset of the vocabulary: logits for those ids, a large negative value elsewhere, so the
    drafter's distribution and confidences are over the draft vocabulary while ids stay the target's."""

    def __init__(self, weight: torch.Tensor, ids: torch.Tensor) -> None:
        super().__init__()
        self.vocab_size = weight.shape[0]
        self.register_buffer("ids", ids.to(weight.device))
        self.register_buffer("weight_sub", weight[ids].detach().clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        sub = linear(hidden, self.weight_sub)
        out = sub.new_full((*sub.shape[:-1], self.vocab_size), -1e4)
        out[..., self.ids] = sub
        return out


def use_draft_vocab(model: PreTrainedModel, path: Path) -> bool:
    """Swap in the reduced head when the directory has a draft vocabulary. Returns whether it did."""
    file = Path(path) / DRAFT_VOCAB_FILE
    if not file.is_file():
        return False
    ids = json.loads(file.read_text()).get("ids") or []
    if not ids:
        return False
    model.lm_head = DraftVocabHead(model.get_input_embeddings().weight, torch.tensor(ids, dtype=torch.long))
    return True
