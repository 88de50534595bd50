"""Host syncs of a decode: counting them, and the two helpers that keep the decode loop to one per iteration.

    SyncCounter             a context manager: `count`, the syncs made while it is active (outside_loop()'s apart)
    outside_loop()          marks work done once per decode or document (setup, prefill, refill, rows leaving):
                            its syncs go to SyncCounter.outside instead
    syncs_per_iteration     decodes prompts and returns count / Decoder.iterations (the loop's verify passes)
    HostReads               device values the host needs, read together in one transfer
    to_device               host data onto the device without a sync

On a GPU the host queues work and runs ahead; it stops and waits for the device's queue to drain (a sync) whenever
it needs the device's numbers or its copies to finish:

    reads       .item(), .tolist(), .cpu(), .numpy(), bool(), int(), float(), an index: device data to the host
    shapes      ops whose output size depends on the data: nonzero, masked_select, boolean-mask indexing and
                assignment, unique, repeat_interleave by a tensor, torch.equal
    copies      a blocking copy between host and device memory: torch.tensor(data, device=...), .to(device) of host
                data (PyTorch waits for the stream after it), or an op mixing host and device tensors (a list index)

SyncCounter counts each of them once (.item() is not counted again for the aten op it runs), whether the decode runs
on a GPU or on the CPU. It wraps those Tensor methods and torch's factory functions while active, and sees every
aten op through a TorchDispatchMode. On a GPU a tensor's device says where it lives. On the CPU, where the tests
prove the count, host and device are the same memory, so it tells them apart by provenance: host data is what was
made on the host by design (torch.tensor / torch.full / ... called without a device, numpy, .cpu()) and everything
computed from host data alone; every other tensor is device data (a model's, or one made with device=...). Reading
host data costs nothing. On the CPU a tensor made before the counter started counts as device data (an over-count,
never an under-count). An upload from pinned memory (to_device; on the CPU any non_blocking upload) is asynchronous,
not a sync: SyncCounter.uploads counts them. torch.cuda.synchronize and the decode's own timing are not counted.

The decode loop (cmsd.decode) makes one sync per iteration: the transfer that brings back everything the host needs
(HostReads: the verdict, the controller's next draft lengths, the caches' used slots); what it sends (the draft
lengths, an n-gram draft) goes up asynchronously. What costs more (tests/cmsd/test_syncs.py states each number):

    head tree        + 1: the tree's size, read to cut the verify pass to it (a pass over padding costs compute,
                     and on a single row the cut is what makes a node worth its cost); with head.tree_min_p > 0,
                     + 1 before each deeper head pass, to stop once no path is likely (at most depth - 1)
    gated drafting   + 1 per drafted token of a chain when the controller can stop a draft by its confidence
                     (control.c_stop or chain_stop > 0, SpecBound's bound): whether any row drafts on
The n-gram drafter matches on host lists: it reads the verdict in the loop's one transfer and uploads its draft
asynchronously, so it costs nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")  # Tensor methods
FACTORIES = ("tensor", "as_tensor", "from_numpy", "full", "zeros", "ones", "empty", "arange", "eye", "rand", "randn",
             "randint", "linspace")  # torch functions whose output is host data unless given a device
SHAPED = {aten.nonzero, aten.masked_select, aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive,
          aten.bincount, aten.equal, aten.is_nonzero, aten.item, aten._local_scalar_dense}  # always a sync
MASKED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}  # a sync with a boolean index
LIFTED = {aten.lift_fresh, aten.lift_fresh_copy}  # a tensor made of Python or numpy data (an index, torch.tensor)
_active: SyncCounter | None = None
_MISSING = object()


class SyncCounter:
    """Counts the host syncs a block of code makes (see the module). `device`: the decode's device (default: CUDA
    where there is one); on a CPU device host and device data are told apart by provenance.

        with SyncCounter() as syncs:
            decoder.generate_ids(prompts)
        syncs.count / decoder.iterations     # per loop iteration, per-document work apart
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.count = 0  # syncs while active, outside outside_loop() blocks
        self.outside = 0  # syncs inside outside_loop() blocks
        self.uploads = 0  # asynchronous host-to-device copies (no sync)
        self.simulated = self.device.type == "cpu"
        self._host: WeakIdKeyDictionary = WeakIdKeyDictionary()  # host data, on a CPU device
        self._quiet = 0  # > 0 inside a call already counted at the Python level: its aten ops are not counted
        self._apart = 0  # > 0 inside outside_loop()
        self._saved: list[tuple[Any, str, Any]] = []
        self._mode: _Watch | None = None

    def __enter__(self) -> SyncCounter:
        global _active
        if _active is not None:
            raise RuntimeError("a SyncCounter is already counting")
        _active = self
        for name in READS:
            self._patch(torch.Tensor, name, self._read(getattr(torch.Tensor, name)))
        self._patch(torch.Tensor, "to", self._to(torch.Tensor.to))
        self._patch(torch.Tensor, "cpu", self._copy(torch.Tensor.cpu, to_host=True))
        self._patch(torch.Tensor, "cuda", self._copy(torch.Tensor.cuda, to_host=False))
        for name in FACTORIES:
            self._patch(torch, name, self._factory(name, getattr(torch, name)))
        self._mode = _Watch(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        global _active
        try:
            self._mode.__exit__(*exc)
        finally:
            for owner, name, original in reversed(self._saved):
                if original is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)
            self._saved, self._mode, _active = [], None, None

    # -- what is host data ------------------------------------------------------------------------------------
    def is_host(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and (not self.simulated or t in self._host)

    def _host_device(self, device: torch.device | str) -> bool:
        """Whether a copy `.to(device)` lands in host memory (on a CPU device, `.to(device)` means the device)."""
        return torch.device(device).type == "cpu" and not self.simulated

    def _mark(self, outputs: Any, host: bool) -> None:
        for t in pytree.tree_leaves(outputs):
            if isinstance(t, torch.Tensor):
                if host:
                    self._host[t] = True
                else:
                    self._host.pop(t, None)

    def _tally(self) -> None:
        if self._apart:
            self.outside += 1
        else:
            self.count += 1

    def _moved(self, src: torch.Tensor, out: torch.Tensor, to_host: bool, non_blocking: bool) -> torch.Tensor:
        """Count a copy of src to the host or the device; returns its result marked as what it now is."""
        from_host = self.is_host(src)
        if from_host != to_host and src.numel():  # (nothing to copy: no copy)
            if not to_host and non_blocking and (self.simulated or src.is_pinned()):
                self.uploads += 1  # from pinned memory (to_device pins it on a GPU): asynchronous
            else:
                self._tally()
            if out is src:  # a no-op on the CPU: the copy is a new tensor all the same
                out = src.view_as(src)
        self._mark(out, to_host)
        return out

    # -- the Python-level entry points ---------------------------------------------------------------------------
    def _patch(self, owner: Any, name: str, new: Callable) -> None:
        self._saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, new)

    def _quietly(self, call: Callable, *args, **kwargs) -> Any:
        self._quiet += 1
        try:
            return call(*args, **kwargs)
        finally:
            self._quiet -= 1

    def _read(self, original: Callable) -> Callable:
        def read(t: torch.Tensor, *args, **kwargs):
            if not self.is_host(t) and t.numel():
                self._tally()
            return self._quietly(original, t, *args, **kwargs)
        return read

    def _to(self, original: Callable) -> Callable:
        def to(t: torch.Tensor, *args, **kwargs):
            parsed = {k: v for k, v in kwargs.items() if k != "copy"}
            device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **parsed)
            out = self._quietly(original, t, *args, **kwargs)
            return out if device is None else self._moved(t, out, self._host_device(device), non_blocking)
        return to

    def _copy(self, original: Callable, to_host: bool) -> Callable:
        def copy(t: torch.Tensor, *args, **kwargs):
            out = self._quietly(original, t, *args, **kwargs)
            return self._moved(t, out, to_host, bool(kwargs.get("non_blocking")))
        return copy

    def _factory(self, name: str, original: Callable) -> Callable:
        def factory(*args, **kwargs):  # (not quiet: a tensor among its arguments is read as a number)
            out = original(*args, **kwargs)
            data = args[0] if args else kwargs.get("data")
            device = kwargs.get("device")
            if isinstance(data, torch.Tensor) and name in ("tensor", "as_tensor"):  # a copy of a tensor
                return out if device is None else self._moved(data, out, self._host_device(device), False)
            to_host = device is None or self._host_device(device)
            if not to_host and name in ("tensor", "as_tensor") and out.numel():
                self._tally()  # Python or numpy data copied onto the device: a blocking copy
            self._mark(out, to_host)
            return out
        return factory

    def _saw(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        """An aten op ran: mark its outputs (host data from host data) and count it where it syncs."""
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        host = [self.is_host(t) for t in tensors]
        packet = func.overloadpacket
        if tensors and all(host) or packet in LIFTED:
            self._mark(out, True)
            return
        if self._quiet or not tensors:
            return
        mixes = any(h and t.dim() for t, h in zip(tensors, host))  # a host tensor (not a scalar) meets device data
        masked = packet in MASKED and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                          for i in args[1])
        shaped = packet in SHAPED or masked or (packet is aten.repeat_interleave and func is not
                                                aten.repeat_interleave.self_int and "output_size" not in kwargs)
        if mixes or shaped:
            self._tally()


class _Watch(TorchDispatchMode):
    """Sees every aten op while a SyncCounter is active."""

    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.counter._saw(func, args, kwargs, out)
        return out


@contextmanager
def outside_loop() -> Iterator[None]:
    """Work done once per decode or document, not per iteration (setup, prefill, refill, rows leaving): an active
    SyncCounter counts its syncs in `outside`, apart from the loop's `count`. Costs nothing when nothing counts."""
    counter = _active
    if counter is None:
        yield
        return
    counter._apart += 1
    try:
        yield
    finally:
        counter._apart -= 1


def syncs_per_iteration(decoder: Any, prompts: list[list[int]]) -> float:
    """Decode token-id prompts with a cmsd.decode.Decoder (not imported: it imports this module) and return the
    loop's syncs per iteration (Decoder.iterations: its verify passes; per-document work apart)."""
    with SyncCounter(decoder.pair.device) as syncs:
        decoder.generate_ids(prompts)
    return syncs.count / max(1, decoder.iterations)


# -- one transfer per iteration ---------------------------------------------------------------------------------

class HostReads:
    """Device values the host needs, read together: everything asked for since the last transfer comes back in one
    device-to-host transfer (one sync) the first time any of it is read. The decoder, the controller and the caches
    share one per decode, so what each of them asks for during an iteration travels with the verdict."""

    def __init__(self) -> None:
        self._asked: list[Read] = []

    def ask(self, tensor: torch.Tensor) -> Read:
        """A read of `tensor` (not to be changed in place before the transfer); the same tensor asked for twice is
        read once."""
        for read in self._asked:
            if read.tensor is tensor:
                return read
        read = Read(tensor, self)
        if tensor.numel():
            self._asked.append(read)
        else:  # nothing to read
            read.settle(_nest([], tensor.shape))
        return read

    def transfer(self) -> None:
        asked, self._asked = self._asked, []
        # every value as int64 bits (floats through float64: exact), so that one tensor carries them all
        parts = [_int64_bits(r.tensor) for r in asked]
        total = sum(p.numel() for p in parts)
        packed = torch.cat(parts).cpu() if total else torch.zeros(0, dtype=torch.int64)  # nothing: no transfer
        values, at = packed.tolist(), 0
        for r, part in zip(asked, parts):
            n, dtype = part.numel(), r.tensor.dtype
            flat = packed[at:at + n].view(torch.float64).tolist() if dtype.is_floating_point else values[at:at + n]
            r.settle(_nest([bool(v) for v in flat] if dtype == torch.bool else flat, r.tensor.shape))
            at += n


class Read:
    """One asked-for tensor; `value` is it as nested Python lists (as .tolist() gives it)."""

    def __init__(self, tensor: torch.Tensor, reads: HostReads) -> None:
        self.tensor: torch.Tensor | None = tensor  # until it is read
        self._reads, self._value = reads, _MISSING

    @property
    def value(self) -> Any:
        if self._value is _MISSING:
            self._reads.transfer()
        return self._value

    def settle(self, value: Any) -> None:
        self._value, self.tensor = value, None


def _int64_bits(t: torch.Tensor) -> torch.Tensor:
    """t flattened, as int64 (floats: their float64 bits)."""
    t = t.reshape(-1)
    return t.to(torch.float64).view(torch.int64) if t.is_floating_point() else t.to(torch.int64)


def _nest(flat: list, shape: torch.Size) -> Any:
    """A flat list as nested lists of `shape` (as .tolist() gives them)."""
    if len(shape) == 0:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host data onto the device without a sync: on a GPU from pinned memory, asynchronously (a copy from pageable
    memory waits for the device's queue first)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, non_blocking=True)
