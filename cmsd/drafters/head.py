"""A feature head: a drafter coupled to the target's own features (EAGLE-style; DESIGN.md "Drafters").

The head drafts token t+2 from the target's feature at t (what its LM head reads: the last layer's hidden state
after the final norm) and the embedding of token t+1:

    g_{t+1} = norm(layers(fc([f_t ; emb(x_{t+1})])))      layers: one (or a few) decoder layers shaped like the target's
    q(x_{t+2}) = softmax(lm_head(g_{t+1}))                the target's embedding and LM head, frozen (draft vocabulary)

and keeps drafting in feature space: the next step reads (g_{t+1}, the drafted token). It has its own small KV
cache (a HoleyState over its layers), rolled back with the target's. The target's features come from the verify
pass the decoder runs anyway (HoleyState.tap), so the head adds no target work. Each iteration, the head first
takes in the target's real features of the tokens just accepted (one forward over them), whose last output drafts
the first token; every further drafted token (a chain) or depth of a tree (strict greedy: EAGLE-2's tree, grown
best first by the product of the head's q along each path) is one more head step.

A head is a directory: head.json (its configuration, the target it was trained for, the draft vocabulary) and
head.safetensors (fc and the layers; the embedding and the LM head are the target's), plus a model card.
`cmsd-jobs distill --kind head` trains one (cmsd.train.head, driven by jobs/train/distill.py); `load_head` loads one
for a target.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, DynamicCache, PreTrainedModel
from safetensors.torch import load_file

from cmsd.confidence import confidence
from cmsd.drafters.base import Draft, DraftBuffer, Drafter, Keep, Sampler, worth_drafting
from cmsd.drafters.model import DraftVocabHead
from cmsd.identity import ModelError, fingerprint, target_shape
from cmsd.kv import HoleyState, whole
from cmsd.settings import ConfidenceSettings, HeadSettings
from cmsd.syncs import HostReads, to_device

HEAD_DRAFTER = "head"  # the drafter name of the head shipped for the target; a head directory loads as well
HEAD_CONFIG, HEAD_WEIGHTS = "head.json", "head.safetensors"
SHIPPED = Path(__file__).parents[1] / "heads"  # heads that ship with cmsd, one directory per default target


class HeadError(ModelError):
    """A head that cannot be used with this target."""


def check_head_target(model: PreTrainedModel) -> None:
    body = getattr(model, "model", None)
    if model.config.is_encoder_decoder or body is None or not all(
            hasattr(body, n) for n in ("embed_tokens", "layers", "norm")):
        raise HeadError(f"a feature head needs a Llama-style decoder-only target; {type(model).__name__} is not one")


@dataclass
class HeadInfo:
    """head.json."""

    target: str  # the name of the target it was trained for
    target_fingerprint: str
    layers: int
    vocab: list[int]  # the draft vocabulary (empty: the whole vocabulary)
    meta: dict  # how it was trained and what it measured (the card's numbers)
    target_shape: str = ""  # target_shape() of the target it was trained for

    @classmethod
    def read(cls, path: Path) -> HeadInfo:
        return cls(**json.loads((path / HEAD_CONFIG).read_text()))


class FeatureHead(nn.Module):
    """fc + decoder layers shaped like the target's + its final norm; the target's embedding and LM head."""

    def __init__(self, target: PreTrainedModel, layers: int = 1, vocab: torch.Tensor | None = None,
                 name: str = "head") -> None:
        super().__init__()
        check_head_target(target)
        config = copy.deepcopy(target.config.get_text_config(decoder=True))
        total = config.num_hidden_layers
        if not 1 <= layers <= total:
            raise HeadError(f"a head has between 1 and {total} layers (the target's), got {layers}")
        config.num_hidden_layers, config.vocab_size, config.pad_token_id = layers, 1, None
        for key in ("quantization_config", "layer_types"):
            if hasattr(config, key):
                delattr(config, key)
        hidden = config.hidden_size
        device, dtype = target.device, target.dtype
        self.name, self.fingerprint, self.shape = name, fingerprint(target), target_shape(target)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False, device=device, dtype=dtype)
        self.body = AutoModel.from_config(config).to(device=device, dtype=dtype)
        self.body.embed_tokens = None  # the head reads fused features, never token ids
        src = target.model
        with torch.no_grad():  # start from the target's last layers and its final norm (shaped alike)
            # f + s*e at first, s giving the token's embedding the feature's size (the feature is RMS-normed by the
            # target's final norm: its size is that norm's weight; an embedding row is ~20x smaller in SmolLM2)
            emb = target.get_input_embeddings().weight
            scale = src.norm.weight.float().pow(2).mean().sqrt() / emb.float().pow(2).mean().sqrt()
            eye = torch.eye(hidden, device=device, dtype=dtype)
            self.fc.weight.copy_(torch.cat([eye, eye * scale.to(dtype)], 1))
            for mine, theirs in zip(self.body.layers, src.layers[total - layers:]):
                mine.load_state_dict(theirs.state_dict())
            self.body.norm.load_state_dict(src.norm.state_dict())
        full = target.get_input_embeddings().weight.shape[0]
        self.vocab = (torch.arange(full) if vocab is None or len(vocab) == 0 else vocab.cpu()).long()
        self.frozen = [target]  # the target's embedding and LM head, outside this module's parameters
        self.lm_head = DraftVocabHead(target.get_output_embeddings().weight, self.vocab)
        self.lm_head.requires_grad_(False)

    @property
    def config(self):
        """The layers' configuration (cmsd.kernels.decode_kernels switches their attention)."""
        return self.body.config

    @property
    def embed(self) -> nn.Embedding:
        return self.frozen[0].get_input_embeddings()

    def fuse(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[..., H] features f_t and [...] tokens x_{t+1} -> [..., H] the layers' input."""
        return self.fc(torch.cat([features.to(self.fc.weight.dtype), self.embed(tokens)], -1))

    def run(self, features: torch.Tensor, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """One pass of the layers: [B, W, H] features, [B, W] tokens -> [B, W, H] output features g."""
        return self.body(inputs_embeds=self.fuse(features, tokens), **kwargs).last_hidden_state

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary (outside the draft vocabulary a large negative value)."""
        return self.lm_head(g)

    def draft_logits(self, g: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary only (training)."""
        return g @ self.lm_head.weight_sub.T


def is_head_dir(path: str | Path) -> bool:
    return (Path(path) / HEAD_CONFIG).is_file()


def names_head(drafter: object) -> bool:
    """Whether a drafter is a feature head or names one: "head" (HEAD_DRAFTER) or a head directory."""
    return isinstance(drafter, FeatureHead) or isinstance(drafter, (str, Path)) and (
        drafter == HEAD_DRAFTER or is_head_dir(drafter))


def shipped_head(target: PreTrainedModel, by_shape: bool = False) -> Path:
    """The head shipped with cmsd for this target (`--drafter head`); by_shape: for a target of its shape (a model
    whose weights are not loaded: the submit-time check; load_head checks the weights)."""
    heads = sorted(p for p in SHIPPED.iterdir() if is_head_dir(p)) if SHIPPED.is_dir() else []
    infos = {p: HeadInfo.read(p) for p in heads}
    mine = target_shape(target) if by_shape else fingerprint(target)
    for path, info in infos.items():
        if (info.target_shape if by_shape else info.target_fingerprint) == mine:
            return path
    trained = ", ".join(f"{info.target!r}" for info in infos.values()) or "none"
    raise HeadError(f"no feature head ships for this target (the shipped heads were trained for: {trained}); train "
                    "one with `cmsd-jobs distill --kind head` and pass its directory as --drafter")


def head_dir(drafter: str, target: PreTrainedModel, by_shape: bool = False) -> Path:
    """The directory a head drafter names: "head" (HEAD_DRAFTER) is the one shipped for `target`."""
    return shipped_head(target, by_shape) if drafter == HEAD_DRAFTER else Path(drafter)


def check_head_shape(path: str | Path, target: PreTrainedModel) -> None:
    """Refuse (HeadError) a head directory trained for a target of another shape, from the target's config only."""
    info = HeadInfo.read(Path(path))
    check_head_target(target)
    if info.target_shape and info.target_shape != target_shape(target):
        raise _other_target(path, info, target_shape(target))


def _other_target(path: str | Path, info: HeadInfo, mine: str) -> HeadError:
    return HeadError(f"head {path} was trained for target {info.target!r} ({info.target_shape or 'fingerprint '}"
                     f"{'' if info.target_shape else info.target_fingerprint}), not for this one ({mine}): train a "
                     "head for it with `cmsd-jobs distill --kind head`")


def load_head(path: str | Path, target: PreTrainedModel) -> FeatureHead:
    """A head directory for a loaded target; refused (HeadError) when it was trained for another target."""
    path = Path(path)
    info = HeadInfo.read(path)
    check_head_target(target)
    if info.target_fingerprint != fingerprint(target):
        raise _other_target(path, info, f"{target_shape(target)}, fingerprint {fingerprint(target)}")
    vocab = torch.tensor(info.vocab, dtype=torch.long) if info.vocab else None
    head = FeatureHead(target, info.layers, vocab, name=str(path))
    weights = load_file(str(path / HEAD_WEIGHTS))
    head.load_state_dict({k: v.to(target.dtype) for k, v in weights.items()}, strict=False)
    head.info = info
    return head.eval()


# -- drafting ----------------------------------------------------------------------------------------------------

@dataclass
class HeadPrompt:
    """What the head prefills for a row: the target's features f_0..f_{n-1} and the tokens x_1..x_n after them."""

    features: torch.Tensor  # [n, H]
    tokens: torch.Tensor  # [n]

    def __len__(self) -> int:
        return len(self.tokens)


class HeadState(HoleyState):
    """The head's own KV cache: a HoleyState over its layers, fed features and tokens (not token ids)."""

    def __init__(self, head: FeatureHead, prompts: list[HeadPrompt], capacity: int,
                 reads: HostReads | None = None) -> None:
        self.head = head
        self.last = torch.zeros(len(prompts), head.fc.out_features, device=head.fc.weight.device,
                                dtype=head.fc.weight.dtype)  # [B, H] the head's output at each row's last entry
        super().__init__(head.body, prompts, capacity, reads=reads)

    def _prefill(self, row: int, prompt: HeadPrompt, cache: DynamicCache) -> None:
        g = self.head.run(prompt.features[None], prompt.tokens[None], past_key_values=cache, use_cache=True)
        self.last[row] = g[0, -1]

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor, valid: torch.Tensor,  # type: ignore[override]
             features: torch.Tensor, parents: torch.Tensor | None = None) -> torch.Tensor:
        """features [B, W, H], tokens, valid [B, W] (parents: a tree, as HoleyState.feed) -> the head's output
        features g [B, W, H]."""
        positions, mask = self.slots(*whole(tokens, valid), parents)
        return self.head.run(features, tokens, attention_mask=mask, position_ids=positions,
                             past_key_values=self.cache, use_cache=True)

    def select(self, rows: torch.Tensor) -> None:
        super().select(rows)
        self.last = self.last[rows]


class HeadDrafter(Drafter):
    """Drafts with a FeatureHead from the features of `target` (a HoleyState with tap on): a chain, or with `tree`
    (strict greedy only) a tree grown best first by the product of the head's q along each path (EAGLE-2): each
    depth is one head pass over the tree.branches likeliest paths so far, whose tree.branches likeliest
    continuations each are the next depth's candidates, none whose path's q is under tree.tree_min_p (and no deeper
    pass once none is left); the tree is the min(tree.tree_tokens, k[b]) likeliest of all the candidates, and with
    `costs` (a pass over 1, 2, ... tokens in 1-token steps) a single row's tree is cut to the size that maximizes
    the expected tokens per cost (cmsd.drafters.base.worth_drafting). The controller's keep gate and k_j do not bound a
    tree. A tree costs a host sync of its own: its size, to cut the verify pass to it (and with tree.tree_min_p, one
    per deeper pass: whether any path is still likely)."""

    def __init__(self, head: FeatureHead, target: HoleyState, prompts: list[list[int]], capacity: int,
                 conf: ConfidenceSettings, sampler: Sampler, tree: HeadSettings | None = None,
                 costs: tuple[float, ...] | None = None, reads: HostReads | None = None) -> None:
        assert target.tap, "the target state must keep its features"
        self.head, self.target, self.conf_settings, self.sampler = head, target, conf, sampler
        self.tree, self.costs = tree, costs
        device = target.mask.device
        self.vocab = head.vocab.to(device)  # the draft vocabulary's ids
        self.curve = to_device(torch.tensor(costs), device) if costs else None  # costs, for worth_drafting
        self.state = HeadState(head, [self._prompt(r, p) for r, p in enumerate(prompts)], capacity, reads)
        batch, hidden = len(prompts), head.fc.out_features
        self.ready = torch.tensor([len(p) > 1 for p in prompts], device=device)  # [B] state.last is a real output
        # on the host, which rows can draft: state.last is a real output (ready), or target features wait (waiting)
        self.ready_host, self.waiting = [len(p) > 1 for p in prompts], [False] * batch
        # target features and tokens accepted since the head last ran (it catches up when it next drafts)
        self.pending = torch.zeros(batch, 0, hidden, device=device, dtype=self.state.last.dtype)  # [B, P, H]
        self.pending_tokens = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.pending_ok = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.caught_up = torch.zeros(batch, dtype=torch.long, device=device)  # entries fed by this propose's catch-up
        self.tokens = self.pending_tokens  # this iteration's drafted tokens [B, K] (a tree's in its order)

    def _prompt(self, row: int, prompt: list[int]) -> HeadPrompt:
        """The target prefilled prompt[:-1]: its features f_0..f_{n-2} go with the tokens x_1..x_{n-1}."""
        weight = self.head.fc.weight  # a one-token prompt prefilled nothing: no features
        features = self.target.prefilled.pop(row, None)
        if features is None:
            features = torch.zeros(0, weight.shape[0], device=weight.device, dtype=weight.dtype)
        return HeadPrompt(features, torch.tensor(prompt[1:len(features) + 1], device=self.target.mask.device))

    @torch.inference_mode()
    def propose(self, k: torch.Tensor, k_host: list[int], keep: Keep | None) -> Draft:
        batch, device = len(k), self.pending.device
        k = k.to(device)
        active = (k > 0) & (self.ready | self.pending_ok.any(1))
        width = max((n for n, r, w in zip(k_host, self.ready_host, self.waiting) if r or w), default=0)
        self.caught_up.zero_()
        if width == 0:
            self.tokens = self.pending_tokens[:, :0]
            return Draft.empty(batch, device)
        if self.pending.shape[1]:  # catch up on the target's real features: the last output drafts the first token
            g = self.state.feed(self.pending_tokens, self.pending_ok, self.pending)
            last = (self.pending_ok.long() * torch.arange(self.pending_ok.shape[1], device=device)).argmax(1)
            fed = self.pending_ok.any(1)
            self.state.last = torch.where(fed[:, None], g[torch.arange(batch, device=device), last], self.state.last)
            self.caught_up = self.pending_ok.sum(1)
            self.ready |= fed
            self.ready_host = [r or w for r, w in zip(self.ready_host, self.waiting)]
            self._clear_pending()
        if self.tree:
            return self._grow(k, active, width)
        buf = DraftBuffer(batch, width, device, keep_q=self.sampler.temperature > 0)
        g = self.state.last
        for j in range(width):
            x, active, done = buf.take(j, self.head.logits(g).float(), active, k, keep, self.conf_settings,
                                       self.sampler)
            if done:
                break
            g = self.state.feed(x[:, None], active[:, None], g[:, None])[:, 0]
        self.tokens = buf.tokens
        return buf.draft()

    def _grow(self, k: torch.Tensor, active: torch.Tensor, width: int) -> Draft:
        """A tree draft (see the class): [B, M] candidates over the draft vocabulary, then the likeliest ones."""
        settings, vocab = self.tree, self.vocab
        branches, depth = settings.branches, min(settings.depth, width)
        g = self.state.last[:, None]  # [B, F, H] what the frontier's candidates are drafted from
        score = torch.zeros_like(g[..., 0])  # [B, F] log product of q along each frontier path
        parent = torch.full_like(score, -1, dtype=torch.long)  # [B, F] its node (-1: the pending token)
        nodes: list[tuple[torch.Tensor, ...]] = []  # per depth: tokens, scores, parents, confidences [B, branches]
        for d in range(depth):
            z = self.head.draft_logits(g).float()  # [B, F, Vd]
            best, index = (score[..., None] + torch.log_softmax(z, -1)).flatten(1).topk(branches)
            best = best.masked_fill(best.exp() < settings.tree_min_p, -torch.inf)
            src = torch.div(index, z.shape[-1], rounding_mode="floor")  # [B, branches] the frontier path
            tokens = vocab[index % z.shape[-1]]
            conf = confidence(z.gather(1, src[..., None].expand(-1, -1, z.shape[-1])).flatten(0, 1),
                              self.conf_settings).view(*src.shape, 4)
            # a child scores strictly below its parent, so the likeliest m nodes always form a tree
            nodes.append((tokens, best - 1e-4 * (d + 1), parent.gather(1, src), conf))
            likely = active[:, None] & (best > -torch.inf)  # [B, branches] the paths worth going on with
            if d + 1 < depth and (not settings.tree_min_p or bool(likely.any())):
                g = self.state.feed(tokens, likely, g.gather(1, src[..., None].expand(-1, -1, g.shape[-1])),
                                    parents=nodes[-1][2])
                score, parent = best, (torch.arange(branches, device=k.device) + d * branches).expand_as(src)
            else:
                break
        tokens, scores, parents, conf = (torch.cat(column, 1) for column in zip(*nodes))  # [B, M] depth by depth
        count = scores.shape[1]
        take = min(count, settings.tree_tokens, width)
        size = torch.minimum(k.clamp(max=take), (scores > -torch.inf).sum(1)) * active  # [B] nodes per row
        if self.costs and len(k) == 1:  # a single row: cut where a node costs more than it gives
            size = torch.minimum(size, worth_drafting(scores.exp(), self.curve))
        ranked = scores.topk(take, 1).indices  # [B, take] the likeliest nodes, then in tree order (parents first)
        order = torch.where(torch.arange(take, device=k.device) < size[:, None], ranked, ranked + count).sort(1).values
        chosen, order = order < count, order % count
        place = torch.full_like(scores, -1, dtype=torch.long).scatter(1, order, torch.arange(take, device=k.device)
                                                                      .expand_as(order))
        up = parents.gather(1, order)
        up = torch.where(chosen & (up >= 0), place.gather(1, up.clamp(min=0)), -1)
        cut = int(size.max())
        self.tokens = torch.where(chosen, tokens.gather(1, order), 0)[:, :cut]
        conf = conf.gather(1, order[..., None].expand(-1, -1, conf.shape[-1])) * chosen[..., None]
        return Draft(self.tokens, size, conf[:, :cut], parents=up[:, :cut])

    def commit(self, accepted: torch.Tensor, next_token: torch.Tensor, path: torch.Tensor | None = None) -> None:
        self.state.commit(self.caught_up)  # the catch-up stays; the entries of drafted tokens are rolled back
        features = self.target.features  # [B, 1 + K, H]: the pending token's and the drafts' features
        drafts = self.tokens
        if path is not None:  # a tree: its accepted path first
            order = torch.cat([torch.zeros_like(path[:, :1]), 1 + path], 1)
            features = features.gather(1, order[..., None].expand(-1, -1, features.shape[-1]))
            drafts = drafts.gather(1, path)
        width = features.shape[1]
        tokens = torch.zeros(len(accepted), width, dtype=torch.long, device=accepted.device)
        drafted = min(drafts.shape[1], width)
        tokens[:, :drafted] = drafts[:, :drafted]
        tokens.scatter_(1, accepted[:, None], next_token[:, None])  # after the accepted drafts, the target's token
        ok = torch.arange(width, device=accepted.device) <= accepted[:, None]
        self.pending = torch.cat([self.pending, features.to(self.pending.dtype)], 1)
        self.pending_tokens = torch.cat([self.pending_tokens, tokens], 1)
        self.pending_ok = torch.cat([self.pending_ok, ok], 1)
        self.waiting = [True] * len(self.waiting)  # (ok[:, 0]: the token after the accepted drafts)

    def _clear_pending(self) -> None:
        self.pending, self.pending_tokens = self.pending[:, :0], self.pending_tokens[:, :0]
        self.pending_ok = self.pending_ok[:, :0]
        self.waiting = [False] * len(self.waiting)

    def select(self, rows: torch.Tensor) -> None:
        self.state.select(rows)
        self.pending, self.pending_tokens, self.pending_ok = self.pending[rows], self.pending_tokens[rows], \
            self.pending_ok[rows]
        self.ready, self.caught_up, self.tokens = self.ready[rows], self.caught_up[rows], self.tokens[rows]
        keep = rows.tolist()
        self.ready_host, self.waiting = [self.ready_host[r] for r in keep], [self.waiting[r] for r in keep]

    def refill(self, rows: list[int], prompts: list[list[int]]) -> None:
        self.state.refill(rows, [self._prompt(r, p) for r, p in zip(rows, prompts)])
        index = torch.tensor(rows, device=self.pending.device)
        self.pending_ok[index] = False
        self.ready[index] = torch.tensor([len(p) > 1 for p in prompts], device=self.pending.device)
        for row, prompt in zip(rows, prompts):
            self.ready_host[row], self.waiting[row] = len(prompt) > 1, False
