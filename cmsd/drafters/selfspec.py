"""SpecBound: self-speculation from the target's own first L layers (DESIGN.md; seed "Adaptive Bounded
Self-Speculation").

The drafter is the target's layers [0, L) + final norm + LM head, with a per-layer temperature T_L that damps the
shallow exit's overconfidence. Drafting stops at a token whose calibrated exit confidence falls below a bound
that the controller adapts to recent acceptance. Verification runs only layers [L, N) over the drafted tokens'
layer-L hidden states, in one pass, reusing the shallow layers' KV cache: the output is the target's own.

Works with Llama-style decoders (`model.model.{embed_tokens, layers, norm, rotary_emb}`, `model.lm_head`).
A target's calibration (exit layer, temperatures) is fitted by cmsd.train.calibrate (`cmsd-jobs calibrate`) and
stored beside the model; SelfSpecPlan reads it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask

from cmsd.confidence import confidence
from cmsd.drafters.base import Draft, DraftBuffer, Drafter, Keep, Sampler
from cmsd.kv import HoleyState, first_tokens, whole
from cmsd.settings import ConfidenceSettings
from cmsd.syncs import HostReads

log = logging.getLogger(__name__)
CALIBRATION_FILE = "specbound.json"
VERIFY_COST_SLOPE = 0.17  # a forward over W tokens costs about 1 + 0.17 (W - 1) single steps (DESIGN.md)


def check_self_draftable(model: PreTrainedModel) -> None:
    body = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if model.config.is_encoder_decoder or body is None or not all(hasattr(body, n) for n in needed):
        raise ValueError(f"SpecBound needs a Llama-style decoder-only model; {type(model).__name__} is not one")


class LayeredState(HoleyState):
    """A HoleyState whose model runs in two parts over one cache: the exit, layers [0, L), token by token while
    drafting, and the rest, layers [L, N), once per iteration over every slot the exit has filled since."""

    def __init__(self, model: PreTrainedModel, prompts: list[list[int]], capacity: int, exit_layer: int,
                 reads: HostReads | None = None) -> None:
        check_self_draftable(model)
        if not 0 < exit_layer < model.config.num_hidden_layers:
            raise ValueError(f"exit layer must be in [1, {model.config.num_hidden_layers - 1}], got {exit_layer}")
        self.exit_layer, self.body = exit_layer, model.model
        self.hidden: list[torch.Tensor] = []  # layer-L hidden states not yet through [L, N): [B, w, H] each
        self.hidden_pos: list[torch.Tensor] = []  # their positions: [B, w] each
        super().__init__(model, prompts, capacity, reads=reads)

    @torch.inference_mode()
    def shallow(self, tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Run the exit over new tokens [B, W] (valid None: all of them, as the host knows); returns the exit's logits
        [B, W, V] (before calibration)."""
        positions = self.append_slots(*whole(tokens, valid))
        hidden = self._layers(self.body.embed_tokens(tokens), positions, 0, self.exit_layer)
        self.hidden.append(hidden)
        self.hidden_pos.append(positions)
        return self.model.lm_head(self.body.norm(hidden))

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Verify: layers [L, N) over every slot the exit filled since the last commit; the j-th valid token of a
        row is the row's j-th valid fresh slot. Tokens not yet through the exit go through it first."""
        if not self.hidden:
            self.shallow(tokens, valid)
        torch._assert_async((self.fresh.sum(1) == whole(tokens, valid)[0].sum(1)).all(),
                            "the exit has seen other tokens than those verified")  # on the device: no host sync
        hidden, positions = torch.cat(self.hidden, 1), torch.cat(self.hidden_pos, 1)
        self.hidden, self.hidden_pos = [], []
        hidden = self._layers(hidden, positions, self.exit_layer, len(self.body.layers))
        order = torch.sort((~self.fresh).long(), dim=1, stable=True).indices[:, :tokens.shape[1]]  # valid slots first
        hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.model.lm_head(self.body.norm(hidden))

    def _layers(self, hidden: torch.Tensor, positions: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """hidden: [B, W, H] entering layer `start`, for the last W slots of the mask."""
        mask = create_causal_mask(config=self.model.config, inputs_embeds=hidden,
                                  attention_mask=self.chain_mask(hidden.shape[1]),
                                  past_key_values=self.cache, position_ids=positions, layer_idx=start)
        rotary = self.body.rotary_emb(hidden, position_ids=positions)
        for layer in self.body.layers[start:end]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions,
                           past_key_values=self.cache, use_cache=True)
        return hidden


class SelfDrafter(Drafter):
    """Drafts with the exit of a LayeredState that the target's verification shares."""

    def __init__(self, state: LayeredState, first: torch.Tensor, temperature: float, conf: ConfidenceSettings,
                 sampler: Sampler) -> None:
        self.state, self.pending = state, first  # pending: [B] the token the exit sees first next time
        self.temperature, self.conf_settings, self.sampler = temperature, conf, sampler

    def propose(self, k: torch.Tensor, k_host: list[int], keep: Keep | None) -> Draft:
        batch, width, device = len(k), max(k_host, default=0), self.pending.device
        if width == 0:
            return Draft.empty(batch, device)
        k = k.to(device)
        buf = DraftBuffer(batch, width, device, keep_q=self.sampler.temperature > 0)
        tokens, valid, active = self.pending[:, None], torch.ones(batch, 1, dtype=torch.bool, device=device), k > 0
        fed = torch.zeros(batch, dtype=torch.long, device=device)  # drafted tokens the exit has seen
        for j in range(width):
            z = self.state.shallow(tokens, valid)[:, -1].float() / self.temperature  # [B, V] calibrated exit
            c = confidence(z, self.conf_settings)
            c[:, 3] = torch.softmax(z, -1).amax(-1)  # SpecBound's confidence: the calibrated exit probability
            x = self.sampler.pick(z)
            ok = active & keep(c[:, 3]) if keep else active
            buf.put(j, ok, x, c, self.sampler.probs(z) if buf.keep_q else z)
            active = ok & (j + 1 < k)
            unseen = buf.lengths > fed  # rows whose last draft the exit has not seen, if drafting stops here
            # one sync a drafted token (the bound stops rows by the device's numbers): does any row draft on?
            filled, going, behind = torch.stack([ok.any(), active.any(), unseen.any()]).tolist()
            buf.width = j + 1 if filled else buf.width
            if not going:
                break
            tokens, valid = x[:, None], active[:, None]
            fed += active.long()
        if behind:  # a row's last draft: through the exit now, so verification is one deep pass
            last = buf.tokens.gather(1, (buf.lengths - 1).clamp(min=0)[:, None])
            self.state.shallow(last, unseen[:, None])
        return buf.draft()

    def commit(self, accepted: torch.Tensor, next_token: torch.Tensor, path: torch.Tensor | None = None) -> None:
        self.pending = next_token  # the shared state was rolled back by the target's commit

    def select(self, rows: torch.Tensor) -> None:
        self.pending = self.pending[rows]  # the shared state is selected as the target

    def refill(self, rows: list[int], prompts: list[list[int]]) -> None:
        self.pending = self.pending.clone()  # the shared state is refilled as the target
        self.pending[torch.tensor(rows, device=self.pending.device)] = first_tokens(self.state.model, prompts)


# -- calibration (fitted by cmsd.train.calibrate) -----------------------------------------------------------------

@dataclass
class LayerCalibration:
    layer: int
    agreement: float  # share of tokens where the exit's argmax equals the final layer's
    temperature: float
    ece_before: float  # expected calibration error of the exit's max probability at temperature 1
    ece_after: float  # ... at the fitted temperature
    reliability: list[list[float]] = field(default_factory=list)  # [bin confidence, bin agreement, count] after


@dataclass
class Calibration:
    """What `calibrate` measured for one model: per exit layer, and the layer/k it predicts are best."""

    model: str
    layers: list[LayerCalibration]
    exit_layer: int
    k: int
    predicted_speedup: float
    tokens: int

    def temperature(self, layer: int) -> float:
        for item in self.layers:
            if item.layer == layer:
                return item.temperature
        return default_temperature(layer, max(i.layer for i in self.layers) + 1)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> Calibration:
        data = json.loads(path.read_text())
        data["layers"] = [LayerCalibration(**item) for item in data["layers"]]
        return cls(**data)


def default_temperature(layer: int, n_layers: int) -> float:
    """Uncalibrated annealing: the shallower the exit, the hotter (1 at the last layer, 3 at the first)."""
    return 1.0 + 2.0 * (1.0 - layer / n_layers)


def predicted_speedup(agreement: float, layer: int, n_layers: int, k: int) -> float:
    """Expected tokens per unit of compute over AR, with independent acceptance at rate `agreement`:
    an iteration drafts k tokens (k + 1 exit steps of L/N of a step each) and verifies them in one pass over the
    other N - L layers, and emits (1 - a^(k+1)) / (1 - a) tokens."""
    a = min(agreement, 0.999)
    tokens = (1 - a ** (k + 1)) / (1 - a)
    cost = (k + 1) * layer / n_layers + (n_layers - layer) / n_layers * (1 + VERIFY_COST_SLOPE * k)
    return tokens / cost


def calibration_path(model_dir: Path) -> Path:
    return Path(model_dir) / CALIBRATION_FILE


@dataclass(frozen=True)
class SelfSpecPlan:
    """How SpecBound runs on one target: exit layer, temperature, and whether calibration predicts a speedup."""

    exit_layer: int
    temperature: float
    predicted_speedup: float | None  # None: not calibrated
    fallback: bool

    @classmethod
    def make(cls, target, settings) -> SelfSpecPlan:
        """target: a LoadedModel; settings: DecodeSettings. Reads the calibration stored beside the model."""
        check_self_draftable(target.model)
        n_layers = target.model.config.num_hidden_layers
        path = calibration_path(target.home)
        cal = Calibration.load(path) if path.is_file() else None
        sb = settings.specbound
        layer = sb.exit_layer or (cal.exit_layer if cal else max(1, n_layers // 2))
        temperature = sb.temperature or (cal.temperature(layer) if cal else default_temperature(layer, n_layers))
        predicted = None
        if cal:
            agreement = next((c.agreement for c in cal.layers if c.layer == layer), 0.0)
            predicted = max(predicted_speedup(agreement, layer, n_layers, k)
                            for k in range(1, settings.control.k_max + 1))
        fallback = bool(sb.fallback and predicted is not None and predicted < 1.0)
        if fallback:
            log.warning("SpecBound: calibration (%s) predicts %.2fx at exit layer %d, a slowdown: decoding as AR "
                        "instead (set specbound.fallback: false to force it)", path, predicted, layer)
        elif cal is None:
            log.warning("SpecBound: %s is not calibrated (no %s); exit layer %d, temperature %.2f by default. "
                        "Run `cmsd-jobs calibrate` to fit them.", target.name, path, layer, temperature)
        return cls(layer, temperature, predicted, fallback)

    def open(self, model: PreTrainedModel, prompts: list[list[int]], capacity: int, conf: ConfidenceSettings,
             sampler: Sampler, reads: HostReads | None = None) -> tuple[LayeredState, torch.Tensor, SelfDrafter]:
        state = LayeredState(model, [p[:-1] for p in prompts], capacity, self.exit_layer, reads)
        first = torch.tensor([p[-1] for p in prompts], device=model.device)
        return state, first, SelfDrafter(state, first, self.temperature, conf, sampler)
