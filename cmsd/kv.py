"""KV caches for a batch of rows that advance by different numbers of tokens each iteration.

Both states below have one interface, so the decode loop and the drafters never know which one they hold:

    feed(tokens [B, W], valid [B, W]) -> logits [B, W, V]   append each row's valid tokens (valid None: all of them,
                                                            as the host knows)
    commit(keep [B])                                        of the tokens fed since the last commit, row b keeps
                                                            its first keep[b]; the rest are rolled back
                                                            (HoleyState: or keep [B, W] bool, the fed slots that stay)
    select(rows [B'])                                       keep only these rows (finished rows leave the batch)
    refill(rows [R], prompts)                               these rows start over with new prompts (continuous
                                                            batching: the next document takes a finished row's place)

`HoleyState` (decoder-only models): every row writes into the same cache slots; a rejected or padded slot becomes
a hole (mask 0) and positions come from per-row counters, so rollback is a mask update plus a crop of the
slots no row uses. Nothing is recomputed and nothing is copied. It can also be fed a tree of tokens at once
(`feed(..., parents=...)`): each token attends to its row's cache and to its ancestors only, at the row's position
plus its depth; committing one root-to-leaf path of the tree leaves holes where the other branches were.

`EncoderHoleyState` (encoder-decoder models whose decoder adds a table of absolute positions: BART, Marian, ...):
the same over the decoder, each row's positions looked up from its own counter, each row's encoder output its own.

`SyncState` (other encoder-decoder models, e.g. T5, whose decoders place positions by cache index): all rows share
one committed length T, the shortest row's; tokens a row has beyond T are fed again with its next feed. Its rows
cannot start over, so its batches drain.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutput

from cmsd.syncs import HostReads, Read


class BufferedLayer(DynamicLayer):
    """A KV cache layer in a pre-allocated buffer: appending writes in place (DynamicLayer concatenates, copying
    the whole cache every step), cropping moves the end. The buffer doubles when full."""

    def __init__(self, capacity: int = 256) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty(b, h, self.capacity, d)  # [B, heads, capacity, head_dim]
        self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[-2]:
            self._grow(max(end, 2 * self._k.shape[-2]))
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def place(self, row: int, batch: int, length: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Prefill: write one row's keys/values [1, heads, n, dim] into the last n of `length` slots of a batch
        cache (the slots before them stay zeros: holes of a finite value)."""
        if not self.is_initialized:
            self.lazy_initialization(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1))
            if length > self.capacity:
                self._grow(length)
            self._k[:, :, :length], self._v[:, :, :length] = 0, 0
        n = keys.shape[-2]
        self._k[row, :, length - n:length], self._v[row, :, length - n:length] = keys[0], values[0]
        self.length = length
        self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

    def shift(self, slots: int) -> None:
        """Drop the first `slots` slots (slots > 0: no row uses them any more), or open -slots zero slots in front
        (slots < 0: a new row's prompt is longer than the cache)."""
        if not self.is_initialized or slots == 0:
            return
        start, end = max(slots, 0), self.length - slots
        if end > self._k.shape[-2]:
            self._grow(2 * end)
        for buf in (self._k, self._v):
            part = buf[:, :, start:self.length].clone()
            buf[:, :, end - part.shape[-2]:end] = part
            buf[:, :, :end - part.shape[-2]] = 0
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]

    def _grow(self, capacity: int) -> None:
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], capacity, old.shape[-1])
            new[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, new)

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if self.is_initialized and tokens_to_remove < 0:
            self.length = max(0, self.length + tokens_to_remove)
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]


def buffered_cache(model: PreTrainedModel, capacity: int) -> DynamicCache:
    config = model.config.get_text_config(decoder=True)
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "decoder_layers")
    cache = DynamicCache()
    cache.layers = [BufferedLayer(capacity) for _ in range(n_layers)]
    return cache


def _crop_to(cache: DynamicCache | EncoderDecoderCache, length: int) -> None:
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


class HoleyState:
    """Decoder-only model + cache whose slots may hold holes. Slot s of row b is a token iff mask[b, s]."""

    maskless = True  # given no mask, transformers attends without one, reading nothing (see chain_mask)

    def __init__(self, model: PreTrainedModel, prompts: list[list[int]], capacity: int,
                 features: bool = False, reads: HostReads | None = None) -> None:
        self.model = model
        # the decode's HostReads: the slots a commit leaves in use travel with its verdict, and are dropped before the
        # next feed; a state on its own (a test, a cost measurement) reads them and drops them at the commit
        self.reads, self.lazy = reads or HostReads(), reads is not None
        self.span: Read | None = None  # the first used slot and the end of the used slots after the last commit
        self.solid = False  # known on the host: no slot of any row is a hole (then no attention mask, as transformers)
        self.cache = buffered_cache(model, capacity)
        self.tap = features  # keep the features the LM head reads (a feature-head drafter drafts from them)
        self.features: torch.Tensor | None = None  # [B, W, H] of the last feed, when tapped
        self.prefilled: dict[int, torch.Tensor] = {}  # row -> [n, H] features of its last refill, when tapped
        device, batch = model.device, len(prompts)
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=device)  # [B, slots]
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)  # [B] next position of each row
        self.fresh = self.mask.bool()  # [B, slots fed since the last commit]
        self.tree: torch.Tensor | None = None  # [B, T] parents of the last T fresh slots, fed as a tree (or None)
        self.refill(list(range(batch)), prompts)

    @torch.inference_mode()
    def refill(self, rows: list[int], prompts: list[list[int]]) -> None:
        """Rows `rows` start over with `prompts` (all of them at construction; later, continuous batching gives a
        finished row's place to the next document). Each prompt is prefilled alone (no work on padding) and its
        cache placed in the row's last slots, left-padded; the row's old slots become holes."""
        assert not self.fresh.shape[1], "refill between iterations (after a commit)"
        self._settle()
        width = max((len(p) for p in prompts), default=0)
        if width > self.mask.shape[1]:  # a prompt longer than the cache: open holes in front of every row
            self._shift(self.mask.shape[1] - width)
        batch, length = self.mask.shape
        for row, prompt in zip(rows, prompts):
            self.mask[row], self.pos[row] = 0, len(prompt)
            self.prefilled.pop(row, None)
            if len(prompt):
                single = buffered_cache(self.model, len(prompt))
                self._prefill(row, prompt, single)
                for layer, part in zip(self.cache.layers, single.layers):
                    layer.place(row, batch, length, part.keys, part.values)
                self.mask[row, length - len(prompt):] = 1
        self._trim()

    def _prefill(self, row: int, prompt: list[int], cache: DynamicCache) -> None:
        """Run one row's prompt alone into `cache` (refill places it in the batch cache)."""
        out = self.model(input_ids=torch.tensor([prompt], device=self.mask.device), past_key_values=cache,
                         use_cache=True, logits_to_keep=1, output_hidden_states=self.tap)
        if self.tap:
            self.prefilled[row] = out.hidden_states[-1][0]

    def _shift(self, slots: int) -> None:
        """Drop the first `slots` slots, or open -slots hole slots in front."""
        for layer in self.cache.layers:
            layer.shift(slots)
        holes = self.mask.new_zeros(self.mask.shape[0], max(-slots, 0))
        self.mask = torch.cat([holes, self.mask[:, max(slots, 0):]], 1)
        self.fresh = self.mask[:, :0].bool()

    def _trim(self) -> None:
        """Drop the slots no row uses any more, now (between documents: a host sync of its own)."""
        self._ask_span()
        self._settle()

    def _ask_span(self) -> None:
        """Ask for the first used slot, the end of the used slots and whether a hole stays between the slots _settle
        keeps (read with the iteration's verdict)."""
        used = self.mask.any(0)  # [slots]
        if not len(used):
            self.span, self.solid = None, True
            return
        at = torch.arange(len(used), device=used.device)
        first = (used.long().cumsum(0) == 0).sum()  # the slots before the first used one
        end = torch.where(used, at + 1, 0).amax()
        start = torch.where((first > 0) & (4 * first >= end), first, 0)  # as _settle
        holes = ((self.mask == 0).any(0) & (at >= start) & (at < end)).any()
        self.span = self.reads.ask(torch.stack([first, end, holes.long()]))

    def _settle(self) -> None:
        """Before the slots change again: drop the slots no row used after the last commit, at the end (rolled-back
        drafts), and in front once they are a quarter of the cache (the prompts of rows that finished; moving the
        cache costs about one attention pass)."""
        if self.span is None:
            return
        first, end, holes = self.span.value
        self.span, self.solid = None, not holes
        self.mask = self.mask[:, :end]
        _crop_to(self.cache, end)
        if end and first and 4 * first >= end:
            self._shift(first)

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor, valid: torch.Tensor | None, parents: torch.Tensor | None = None
             ) -> torch.Tensor:
        """tokens, valid: [B, W]; parents: [B, W] for a tree of tokens, the index of each token's parent among
        the tree's tokens fed since the last commit (those of earlier tree feeds first, then these; -1: none, it
        follows the row's cache; parents come before their children), so a tree may grow over several feeds; None:
        a chain. valid None: every token is valid, as the host knows. Returns the logits [B, W, V] (rows of invalid
        slots are garbage)."""
        positions, mask = self.slots(*whole(tokens, valid), parents)
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, output_hidden_states=self.tap)
        if self.tap:
            self.features = out.hidden_states[-1]  # what the LM head read: the last layer's, after the final norm
        return out.logits

    def slots(self, valid: torch.Tensor, known: bool, parents: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Open W slots for a feed (see feed; known: every token is valid, as the host knows); returns the positions
        [B, W] and the attention mask."""
        if parents is None:
            assert self.tree is None, "a chain feed after a tree feed, before a commit"
            positions = self.append_slots(valid, known)
            return positions, self.chain_mask(valid.shape[1])
        return self._tree_slots(valid, parents)

    def chain_mask(self, width: int) -> torch.Tensor | None:
        """The additive attention mask [B, 1, W, slots] of the last W slots fed as a chain: each sees its row's
        tokens up to its own slot; made here in 4D, since from a 2D mask transformers reads whether it has holes before
        a 1-token pass (a host sync). None where transformers would use none (a 1-token pass, or a first one, over
        slots the host knows hold no hole), so that its kernels, and the numbers, are the same."""
        slots = self.mask.shape[1]
        if self.solid and self.maskless and (width == 1 or width == slots):
            return None
        at = torch.arange(slots, device=self.mask.device)
        causal = at <= slots - width + at[:width, None]  # [W, slots]
        return self._additive((self.mask.bool()[:, None, :] & causal)[:, None])

    def _tree_slots(self, valid: torch.Tensor, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Open W slots for a tree of tokens. Returns their positions [B, W] (the row's position before the tree
        plus the depth) and the additive attention mask [B, 1, W, slots]: the row's slots before the tree and the
        token's ancestors, itself included."""
        self._settle()
        before = self.tree if self.tree is not None else parents[:, :0]  # [B, T] the tree's earlier tokens
        self.tree = torch.cat([before, parents], 1)
        tree = ancestors(self.tree)[:, before.shape[1]:]  # [B, W, T + W]
        cached = self.mask.bool()[:, :self.mask.shape[1] - before.shape[1]]
        start = self.pos - self.fresh[:, self.fresh.shape[1] - before.shape[1]:].sum(1)
        self.append_slots(valid)
        allowed = torch.cat([cached[:, None, :].expand(-1, tree.shape[1], -1), tree], 2)[:, None]
        return start[:, None] + tree.sum(-1) - 1, self._additive(allowed)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """allowed: [B, 1, W, slots] bool -> the additive attention mask (0 where allowed)."""
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)

    def append_slots(self, valid: torch.Tensor, known: bool = False) -> torch.Tensor:
        """Open W slots (valid: [B, W]; known: all of them valid, as the host knows); returns the positions [B, W]
        of their tokens."""
        self._settle()
        self.solid = self.solid and known
        rank = valid.long().cumsum(1)  # [B, W] 1-based rank of each valid token in its row
        positions = (self.pos[:, None] + rank - 1).clamp(min=0)
        self.mask = torch.cat([self.mask, valid.long()], dim=1)
        self.fresh = torch.cat([self.fresh, valid], dim=1)
        self.pos = self.pos + rank[:, -1]
        return positions

    @torch.inference_mode()
    def commit(self, keep: torch.Tensor) -> None:
        """keep: [B] how many of the tokens fed since the last commit stay (the first ones), or [B, W] bool which
        of the W slots fed since then stay."""
        fresh = self.fresh
        kept = fresh & (keep if keep.dim() == 2 else fresh.long().cumsum(1) <= keep[:, None])
        start = self.mask.shape[1] - fresh.shape[1]
        self.mask[:, start:] = kept.long()
        self.pos = self.pos - (fresh.sum(1) - kept.sum(1))
        self.fresh, self.tree, self.solid = fresh[:, :0], None, False
        self._ask_span()  # the slots no row uses are dropped (lazy: before the next feed, with no sync of their own)
        if not self.lazy:
            self._settle()

    @torch.inference_mode()
    def select(self, rows: torch.Tensor) -> None:
        self._settle()
        self.cache.batch_select_indices(rows)
        self.mask, self.pos, self.fresh = self.mask[rows], self.pos[rows], self.fresh[rows]
        self.tree = self.tree[rows] if self.tree is not None else None
        if not self.fresh.shape[1]:
            self._trim()


class EncoderHoleyState(HoleyState):
    """An encoder-decoder whose decoder adds a table of absolute positions (`decoder.embed_positions`, an
    nn.Embedding: BART, mBART, Marian, Pegasus, Blenderbot): a HoleyState over the decoder, whose positions come
    from per-row counters. transformers places a decoder's positions by cache index, so while the model runs a hook
    on the table looks up each row's own positions instead; the decoder starts empty (its first token is the
    start token) and each row's encoder output is its own, so a row can start over at any time."""

    maskless = False  # given no mask, the decoder makes one of ones and reads it (a sync); a 4D one: the same numbers

    def __init__(self, model: PreTrainedModel, sources: list[list[int]], capacity: int,
                 reads: HostReads | None = None) -> None:
        device = model.device
        self.encoded = torch.zeros(len(sources), 1, model.config.d_model, device=device, dtype=model.dtype)  # [B, S, H]
        self.enc_mask = torch.zeros(len(sources), 1, dtype=torch.long, device=device)  # [B, S]
        self.table = position_table(model)
        super().__init__(model, sources, capacity, reads=reads)

    @torch.inference_mode()
    def refill(self, rows: list[int], sources: list[list[int]]) -> None:
        super().refill(rows, [[] for _ in rows])  # the decoder's prompt is the start token, fed next
        width = max(1, max(len(s) for s in sources))
        if width > self.encoded.shape[1]:
            grow = width - self.encoded.shape[1]
            self.encoded = torch.nn.functional.pad(self.encoded, (0, 0, 0, grow))
            self.enc_mask = torch.nn.functional.pad(self.enc_mask, (0, grow))
        encoder = self.model.get_encoder()
        for row, source in zip(rows, sources):
            ids = torch.tensor([source or [self.model.config.pad_token_id or 0]], device=self.encoded.device)
            self.encoded[row] = 0
            self.encoded[row, :ids.shape[1]] = encoder(input_ids=ids).last_hidden_state[0]
            self.enc_mask[row] = 0
            self.enc_mask[row, :len(source)] = 1
        self.cross = DynamicCache()  # cross-attention keys and values: computed again at the next feed

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor, valid: torch.Tensor | None, parents: torch.Tensor | None = None
             ) -> torch.Tensor:
        positions, mask = self.slots(*whole(tokens, valid), parents)
        table, offset = self.table, getattr(self.table, "offset", 0)
        table.forward = lambda *args, **kwargs: torch.nn.functional.embedding(positions + offset, table.weight)
        # the source mask in 4D too: from a 2D one transformers reads whether it has padding (a host sync)
        source = self._additive(self.enc_mask.bool()[:, None, None, :].expand(-1, 1, tokens.shape[1], -1))
        try:  # the table's own forward would look up slot indices, holes included (and past its end)
            return self.model(encoder_outputs=BaseModelOutput(last_hidden_state=self.encoded),
                              attention_mask=source, decoder_input_ids=tokens, decoder_attention_mask=mask,
                              past_key_values=EncoderDecoderCache(self.cache, self.cross), use_cache=True).logits
        finally:
            del table.forward

    @torch.inference_mode()
    def select(self, rows: torch.Tensor) -> None:
        super().select(rows)
        self.encoded, self.enc_mask = self.encoded[rows], self.enc_mask[rows]
        self.cross.batch_select_indices(rows)


# Encoder-decoders whose decoder looks positions up in `embed_positions`, an nn.Embedding, at position + `offset`
# (its attribute, else 0). Others (T5's relative positions, FSMT's padding-based numbering) decode with SyncState.
POSITION_TABLES = ("bart", "mbart", "plbart", "marian", "pegasus", "blenderbot", "blenderbot-small")


def position_table(model: PreTrainedModel) -> torch.nn.Embedding | None:
    """The decoder's table of absolute positions, where it has one (see EncoderHoleyState)."""
    if not model.config.is_encoder_decoder or model.config.model_type not in POSITION_TABLES:
        return None
    table = getattr(model.get_decoder(), "embed_positions", None)
    return table if isinstance(table, torch.nn.Embedding) else None


class SyncState:
    """Encoder-decoder model + decoder cache whose rows share one committed length T (see the module doc)."""

    def __init__(self, model: PreTrainedModel, sources: list[list[int]], capacity: int) -> None:
        self.model = model
        device, batch = model.device, len(sources)
        width = max(1, max(len(s) for s in sources))
        pad = model.config.pad_token_id or 0
        ids = torch.full((batch, width), pad, dtype=torch.long, device=device)
        self.enc_mask = torch.zeros(batch, width, dtype=torch.long, device=device)  # [B, S]
        for row, source in enumerate(sources):
            ids[row, :len(source)] = torch.tensor(source, dtype=torch.long, device=device)
            self.enc_mask[row, :len(source)] = 1
        with torch.inference_mode():
            self.encoded = model.get_encoder()(input_ids=ids, attention_mask=self.enc_mask).last_hidden_state
        self.cache = EncoderDecoderCache(buffered_cache(model, capacity), DynamicCache())
        self.seqs: list[list[int]] = [[] for _ in range(batch)]  # every decoder token of each row
        self.fresh = [0] * batch  # tokens fed to each row since the last commit
        self.length = 0  # T: the committed length shared by all rows

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        valid, _ = whole(tokens, valid)
        new = [row[ok].tolist() for row, ok in zip(tokens, valid)]
        starts = [len(seq) for seq in self.seqs]
        for seq, add in zip(self.seqs, new):
            seq.extend(add)
        self.fresh = [f + len(add) for f, add in zip(self.fresh, new)]
        chunks = [seq[self.length:] for seq in self.seqs]
        width = max(len(c) for c in chunks)
        x = torch.zeros(len(chunks), width, dtype=torch.long, device=tokens.device)
        for row, chunk in enumerate(chunks):  # right padding: causal attention keeps it out of real tokens
            x[row, :len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=self.encoded), attention_mask=self.enc_mask,
                         decoder_input_ids=x, past_key_values=self.cache, use_cache=True).logits  # [B, width, V]
        result = out.new_zeros(*tokens.shape, out.shape[-1])
        for row, (start, ok) in enumerate(zip(starts, valid)):
            cols = ok.nonzero().squeeze(1)
            offsets = start - self.length + torch.arange(len(cols), device=out.device)
            result[row, cols] = out[row, offsets]
        self._sync(min(len(seq) for seq in self.seqs))
        return result

    def _sync(self, length: int) -> None:
        self.length = length
        _crop_to(self.cache, length)

    def commit(self, keep: torch.Tensor) -> None:
        for row, (seq, fresh, k) in enumerate(zip(self.seqs, self.fresh, keep.tolist())):
            del seq[len(seq) - fresh + k:]
        self.fresh = [0] * len(self.seqs)
        self._sync(min(self.length, min(len(seq) for seq in self.seqs)))

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.encoded, self.enc_mask = self.encoded[rows], self.enc_mask[rows]
        keep = rows.tolist()
        self.seqs = [self.seqs[r] for r in keep]
        self.fresh = [self.fresh[r] for r in keep]


def whole(tokens: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """A feed's valid [B, W], and whether the host knows every token is valid (valid None)."""
    return (torch.ones_like(tokens, dtype=torch.bool), True) if valid is None else (valid, False)


def ancestors(parents: torch.Tensor) -> torch.Tensor:
    """parents: [B, W] the index of each node's parent (-1: a root; parents come before their children).
    Returns [B, W, W] bool: [b, i, j] says node j is node i or one of its ancestors."""
    batch, width = parents.shape
    rows = torch.arange(batch, device=parents.device)
    torch._assert_async((parents < torch.arange(width, device=parents.device)).all(),
                        "a parent comes before its children")  # checked on the device: no host sync
    tree = torch.eye(width, dtype=torch.bool, device=parents.device).repeat(batch, 1, 1)
    for node in range(width):
        parent = parents[:, node]
        tree[:, node] |= tree[rows, parent.clamp(min=0)] & (parent >= 0)[:, None]
    return tree


def open_state(model: PreTrainedModel, prompts: list[list[int]], capacity: int, features: bool = False,
               reads: HostReads | None = None) -> tuple[HoleyState | SyncState, torch.Tensor]:
    """Prefill a model on a batch of prompts. Returns the state and, per row, the first token to feed
    (first_tokens). With `features` (decoder-only) the state keeps what its LM head reads (HoleyState.tap); `reads`:
    the decode's HostReads (HoleyState)."""
    if model.config.is_encoder_decoder:
        if refillable(model):
            return EncoderHoleyState(model, prompts, capacity, reads), first_tokens(model, prompts)
        return SyncState(model, prompts, capacity), first_tokens(model, prompts)
    return HoleyState(model, [p[:-1] for p in prompts], capacity, features, reads), first_tokens(model, prompts)


def refillable(model: PreTrainedModel) -> bool:
    """Whether open_state gives the model a state whose rows can start over (a HoleyState, not a SyncState)."""
    return not model.config.is_encoder_decoder or position_table(model) is not None


def refill_state(state: HoleyState | SyncState, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
    """Continuous batching: rows `rows` of a state that open_state made start over with new prompts. Returns the
    first token each of them feeds (as open_state)."""
    assert isinstance(state, HoleyState), "a SyncState's rows share one length: its batches drain"
    state.refill(rows, prompts if state.model.config.is_encoder_decoder else [p[:-1] for p in prompts])
    return first_tokens(state.model, prompts)


def first_tokens(model: PreTrainedModel, prompts: list[list[int]]) -> torch.Tensor:
    """The first token each row feeds: the last prompt token (decoder-only; it is verified together with the first
    draft) or the decoder start token."""
    if not model.config.is_encoder_decoder:
        return torch.tensor([p[-1] for p in prompts], device=model.device)
    start = model.config.decoder_start_token_id
    start = model.config.bos_token_id if start is None else start
    return torch.full((len(prompts),), start, device=model.device)
