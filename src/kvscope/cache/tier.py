"""The recall tier's host side (kvscope.cache.recall): one layer's waiting tokens (`Tier`), and the evictions of a
recorded prefill on their way there (`Moves`), several layers' in one move.

Why several layers at once: a 32k prompt in 512-token chunks evicts 2,048 times on Llama-3-8B, and the chunked
prefill is bound by its launches on the host; a move is a gather per field and a copy per record. Layer i's evicted
slots keep their bytes until layer i writes again (its next chunk), so the moves of consecutive layers wait and go
together: every field of those layers is one evenly spaced view of the cache's one allocation (`Arena.stacked`), one
gather for them all. A group goes once it reaches GROUP_BYTES, at the model's last layer, when an eviction cannot join
it (another layer than the next, another slot count or format), or before one of its layers writes or recalls."""

from __future__ import annotations

import math

import torch

from kvscope.cache.arena import TORCH_TYPES, TYPE_NAMES
from kvscope.cache.store import gather_slots, make_store, slot_index, wrap_store
from kvscope.cache.streams import side_stream
from kvscope.kvformats import ELEMENT_BYTES, RECALL_META, recall_format, recall_records

META_NAMES = tuple(name for name, _, _ in RECALL_META)
# a group goes once its staging (the evicted slots of consecutive layers, every record, held on the device until its
# copies to the host are done) reaches this, so it holds at most this plus one layer's: for Llama-3-8B at batch 1 a
# layer evicting a 512-token chunk stages 2.06 MiB, and a group is eight layers, 16.5 MiB
GROUP_BYTES = 16 * 1024**2


def _tier_records(layer):
    """(the layer's store format, the tier's, the tier's host records) of a layer."""
    store_kind = layer.settings.kv_dtype or TYPE_NAMES[layer.compute_dtype]
    return store_kind, recall_format(store_kind), recall_records(store_kind, layer.head_dim,
                                                                 TYPE_NAMES[layer.compute_dtype])


def record_eviction(layer, tier, order: torch.Tensor, leaves: torch.Tensor, bound: int):
    """An eviction during a recorded prefill: the evicted slots go to `tier` (made on first use); returns the tier.
    The first `bound` slots of `order` ([B, H, S], eviction order) hold every row's evicted ones (`bound` is a host-side
    bound on what any row evicts: no device read); `leaves` marks which of them go. Rows that evict fewer move a few
    kept or empty slots too, marked not valid in the tier. A tier that keeps the store's format waits in the cache's
    `Moves`; one that re-quantizes (int4 waits as int8) moves at once."""
    bound = min(bound, layer.capacity)
    if bound <= 0:
        return tier
    tier = tier or Tier(layer, layer.settings.recall_capacity)
    slots, leaves = order[:, :, :bound], leaves[:, :, :bound]
    if tier.exact:
        layer.settings.moves.add(layer.index, tier, slots, leaves, layer.settings.arena, layer.num_layers)
    else:
        tier.add(layer, slots, leaves)
    return tier


class Moves:
    """A recorded prefill's evictions waiting to go to their tiers: a group of consecutive layers' with the same
    number of slots, moved together (`flush`). Holds the tiers it writes to, never the layers. Each layer's slots and
    leaves are copied into the group's own [G, B, H, n] buffers as they come: held by reference they would keep each
    eviction's whole order ([B, H, slots] int64) alive until the group goes."""

    def __init__(self):
        self.tiers: list[Tier] = []
        self.first, self.arena = 0, None
        self.slots = self.leaves = None  # [G, B, H, n]: row g for layer first + g; G the layers the group takes

    def holds(self, index: int) -> bool:
        """Whether layer `index` has a move waiting (it must go before the layer writes or recalls)."""
        return self.first <= index < self.first + len(self.tiers)

    def add(self, index: int, tier, slots: torch.Tensor, leaves: torch.Tensor, arena, layers: int) -> None:
        """Layer `index` (of `layers`) evicts `slots` into `tier`."""
        if self.tiers and (index != self.first + len(self.tiers) or slots.shape != self.slots.shape[1:]
                           or tier.records != self.tiers[0].records):
            self.flush()
        if not self.tiers:  # the layers of one group stage alike: it goes once they reach GROUP_BYTES
            most = min(layers - index, max(1, -(-GROUP_BYTES // tier.staging_bytes(slots.shape[-1]))))
            self.first, self.arena = index, arena
            self.slots = torch.empty((most, *slots.shape), dtype=slots.dtype, device=slots.device)
            self.leaves = torch.empty((most, *leaves.shape), dtype=leaves.dtype, device=leaves.device)
        g = len(self.tiers)
        self.slots[g].copy_(slots)
        self.leaves[g].copy_(leaves)
        self.tiers.append(tier)
        if g + 1 == self.slots.shape[0]:
            self.flush()

    def flush(self) -> None:
        """Move the group: one gather per field for all its layers, one copy per layer and record to the host."""
        if not self.tiers:
            return
        tiers, count = self.tiers, len(self.tiers)
        sources = {name: self.arena.stacked(name, self.first, count)
                   for name in ("position", "score", *(f"store.{n}" for n in tiers[0].store_names))}
        _move(tiers, self.slots[:count], self.leaves[:count], sources)
        self.tiers, self.slots, self.leaves = [], None, None


def _move(tiers: list, slots: torch.Tensor, leaves: torch.Tensor, sources: dict[str, torch.Tensor],
          stored: dict[str, torch.Tensor] | None = None) -> None:
    """Write the slots `slots` [G, B, H, n] of G layers (`sources`: their position, score and store tensors, each
    [G, B, H, S, ...]) to their `tiers`: the gathers write straight into the records' places of one device staging
    buffer, then one copy per layer and record crosses to the host (on the side stream on CUDA: it overlaps the next
    layers' compute). `stored`: a layer's store tensors already in the tier's format ([B, H, n, ...], G = 1)."""
    first, n = tiers[0], slots.shape[-1]
    flat, staged, fields = _staging(first.rows, first.records, len(tiers), n, slots.device)
    torch.gather(sources["position"], 3, slots, out=fields["position"])
    torch.gather(sources["score"], 3, slots, out=fields["score"])
    fields["valid"].copy_(leaves)
    if stored is None:  # the store's own bytes: exact, and nothing dequantized. The formats a tier keeps as they are
        # (dense, fp8, int8) hold a slot at dim 2 of each layer's tensors, dim 3 once stacked (int4's packed groups do
        # not, and int4 waits as int8: never here)
        index = {}  # one expanded index per trailing shape (keys and values share theirs)
        for name in first.store_names:
            t = sources[f"store.{name}"]
            shape = tuple(t.shape[4:])
            if shape not in index:
                index[shape] = slot_index(slots, shape)
            gather_slots(t, index[shape], out=fields[name], dim=3)
    else:
        for name, t in stored.items():
            fields[name][0].copy_(t)
    targets = [tier.reserve(n) for tier in tiers]
    stream = first.stream
    if stream is None:
        for target, parts in zip(targets, staged):
            for t, part in zip(target, parts):
                t.copy_(part)
        return
    stream.wait_stream(torch.cuda.current_stream(slots.device))
    with torch.cuda.stream(stream):
        for target, parts in zip(targets, staged):
            for t, part in zip(target, parts):
                t.copy_(part, non_blocking=True)
    flat.record_stream(stream)  # its memory is reused once the copies are done, not when the tier is freed


def _staging(rows: tuple[int, int], records, layers: int, n: int, device):
    """One device buffer for `n` slots of `layers` layers' every record, freed when its copies are done (not kept
    through the prefill: on the H200 at 32k a kept buffer added its bytes to the prefill's peak): (the buffer, per
    layer each record's part [n, B, H, bytes], each field [G, B, H, n, ...]). The views are one `as_strided` each,
    from one typed view of the buffer per element type: slicing and reshaping a view per field took 21 of a one-layer
    move's 35 operations."""
    b, h = rows
    flat = torch.empty(layers * n * b * h * sum(size for _, size in records), dtype=torch.uint8, device=device)
    typed, staged, fields, at = {}, [[] for _ in range(layers)], {}, 0
    for record, size in records:
        part = n * b * h * size  # one layer's bytes of this record
        for g in range(layers):
            staged[g].append(flat.as_strided((n, b, h, size), (b * h * size, h * size, size, 1), at + g * part))
        for name, shape, kind, offset in record:
            e = ELEMENT_BYTES[kind]  # records are padded to 8 bytes, fields aligned to their own type
            if kind not in typed:
                typed[kind] = flat.view(TORCH_TYPES[kind])
            inner = [math.prod(shape[i + 1:]) for i in range(len(shape))]
            fields[name] = typed[kind].as_strided((layers, b, h, n, *shape),
                                                  (part // e, h * size // e, size // e, b * h * size // e, *inner),
                                                  (at + offset) // e)
        at += layers * part
    return flat, staged, fields


class Tier:
    """One layer's waiting tokens: host records (kvscope.kvformats.recall_records) of `capacity` slots per row.

    Each record buffer is [slots, B, H, bytes] (slot-major; the stores are [B, H, slots, ...]) with every field of a
    slot side by side, so the slots one eviction adds, and the slots a recall streams back, are one contiguous span of
    each buffer: one asynchronous copy each way. (A strided span of pinned memory is copied through a pageable
    temporary, which blocks the host until the GPU's queue drains; a copy per field is a launch per field.)"""

    def __init__(self, layer, capacity: int):
        st = layer.state
        self.rows = tuple(st.valid.shape[:2])
        self.store_kind, self.kind, self.records = _tier_records(layer)  # the layer's own format, the tier's
        self.exact = self.kind == self.store_kind  # the store's own bytes wait here
        self.dtype = layer.compute_dtype
        self.store_names = [f[0] for fields, _ in self.records for f in fields if f[0] not in META_NAMES]
        self.pin = st.valid.is_cuda  # pinned host memory: copies to and from it are asynchronous
        self.capacity = capacity
        self.buffers = self._allocate(capacity)
        # Invariant: slots [0, used) of every row were written (invalid ones pad the rows that evicted fewer), and
        # nothing reads past `used`: the buffers are allocated unwritten.
        self.used = 0
        self.stream = side_stream(st.valid.device)  # the copies into the tier run here (`_move`)

    def _allocate(self, capacity: int) -> list[torch.Tensor]:
        """Every record buffer, allocated pinned at once: a pageable buffer pinned afterwards would be allocated,
        zeroed and copied once more (gigabytes for a long prompt)."""
        return [torch.empty((capacity, *self.rows, size), dtype=torch.uint8, pin_memory=self.pin)
                for _, size in self.records]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.buffers)

    def staging_bytes(self, n: int) -> int:
        """Device bytes the staging of `n` slots of this layer takes (`_staging`)."""
        return n * math.prod(self.rows) * sum(size for _, size in self.records)

    def add(self, layer, slots: torch.Tensor, leaves: torch.Tensor) -> None:
        """Move a layer's `slots` ([B, H, n]) here now, before the layer invalidates them; `leaves` [B, H, n] marks
        the ones evicted (the others are kept or empty: not valid here)."""
        st = layer.state
        sources = {"position": st.position[None], "score": st.score[None]}
        stored = None
        if self.exact:
            sources.update({f"store.{name}": t[None] for name, t in layer.store.tensors().items()})
        else:  # re-quantized on the device (int4 waits as int8), not the whole store dequantized into the tier
            k, v = read_slots(layer, slots)
            staging = make_store(self.kind, *k.shape[:3], layer.head_dim, self.dtype, k.device)
            staging.write_range(0, k, v)
            stored = staging.tensors()
        _move([self], slots[None], leaves[None], sources, stored)

    def reserve(self, n: int) -> list[torch.Tensor]:
        """The next `n` slots of every record buffer ([n, B, H, bytes] each), counted as written."""
        if self.used + n > self.capacity:  # the host's bound, not what rows evict, can pass the tier's size
            self._grow(self.used + n + n)
        out = [t[self.used:self.used + n] for t in self.buffers]
        self.used += n
        return out

    def _grow(self, need: int) -> None:
        self.wait()
        old, self.capacity = self.buffers, need
        self.buffers = self._allocate(self.capacity)
        for new, t in zip(self.buffers, old):
            new[:self.used].copy_(t[:self.used])

    def wait(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def first_record(self, span: slice, device) -> dict[str, torch.Tensor]:
        """The fields of the first record (what scoring reads) over `span`, [B, H, n, ...] on `device`: one copy."""
        return views([self.buffers[0][span].to(device, non_blocking=True).movedim(0, 2)], self.records[:1])

    def keys(self, fields: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Keys [B, H, n, D] from the fields of the first record (`first_record`), in `dtype`: a dense tier's as they
        are, a quantized one's dequantized."""
        if "keys" in fields:
            return fields["keys"].to(dtype)
        return self._store(fields).read(fields["valid"].shape[-1], dtype)[0]

    def keys_values(self, index: torch.Tensor | slice, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the tier slots `index` (a slice, or [B, H, n] per row), dequantized on `device`."""
        return self.read(self.fields(index, device))

    def fields(self, index: torch.Tensor | slice, device) -> dict[str, torch.Tensor]:
        """Every field of the tier slots `index` (a slice, or [B, H, n] per row), [B, H, n, ...] on `device`."""
        if isinstance(index, slice):  # one contiguous span: an asynchronous copy from pinned memory
            moved = [t[index].to(device, non_blocking=True).movedim(0, 2) for t in self.buffers]
        else:  # each row's records gathered on the host, whole records at a time, then one copy per record
            flat = self._flat(index)
            moved = [self._gather(t, flat).view(*index.shape, -1).to(device, non_blocking=True)
                     for t in self.buffers]
        return views(moved, self.records)

    def read(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, n, D] in the compute dtype from the fields of every record (`Tier.fields`)."""
        return self._store(fields).read(fields["valid"].shape[-1], self.dtype)

    def _flat(self, index: torch.Tensor) -> torch.Tensor:
        """Host slots `index` [B, H, n] as record numbers of a buffer [capacity, B, H, bytes] seen as [records, bytes],
        in [B, H, n] order."""
        rows = math.prod(self.rows)
        return (index * rows + torch.arange(rows).view(*self.rows, 1)).reshape(-1)

    def _gather(self, buffer: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """The records `flat` of `buffer`, into pinned memory on CUDA (so the copy up is asynchronous): one row copy
        per record, where an element-wise gather over the bytes took milliseconds per layer."""
        out = torch.empty((flat.numel(), buffer.shape[-1]), dtype=torch.uint8, pin_memory=self.pin)
        return torch.index_select(buffer.view(-1, buffer.shape[-1]), 0, flat, out=out)

    def _store(self, fields: dict[str, torch.Tensor]):
        return wrap_store(self.kind, {name: fields[name].contiguous() for name in self.store_names})


def views(buffers: list[torch.Tensor], records) -> dict[str, torch.Tensor]:
    """Every field of `records` as a typed view [..., *shape] of its record buffer [..., bytes]."""
    out = {}
    for buffer, (fields, _) in zip(buffers, records):
        for name, shape, kind, offset in fields:
            t = buffer[..., offset:offset + math.prod(shape) * ELEMENT_BYTES[kind]].view(TORCH_TYPES[kind])
            out[name] = t.unflatten(-1, shape) if shape else t[..., 0]
    return out


def read_slots(layer, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, H, n, D] of `slots` [B, H, n] of a layer's store, in the compute dtype."""
    k, v = layer.read(layer.capacity, layer.compute_dtype)
    index = slot_index(slots, k.shape[3:])
    return k.gather(2, index), v.gather(2, index)
