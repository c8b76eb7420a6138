"""MA-LMM long-term memory: memory banks, memory bank compression and the per-stream state.

A bank holds T slots of N token positions. Compression (MBC) follows the public MA-LMM code: for
each token position separately, merge the most similar pair of temporally adjacent slots into their
count-weighted mean. Every tensor a bank carries beside its tokens (cached key/value projections,
slot times, decays) is merged with the same pair and the same weights, which keeps the cache
exact: a weighted mean whose weights sum to one commutes with an affine map.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from malmm_ros.errors import ConfigError

__all__ = [
    'BankRows',
    'Decays',
    'MemoryBank',
    'MemorySpec',
    'StreamMemory',
]


class MemoryBank:
    """Up to `capacity` slots of N token positions, with counts and count-weighted mean times.

    Storage is preallocated (capacity + 1 physical slots) and slots are never shifted: every
    position keeps its own temporal order as an index, and the similarity of each temporally
    adjacent pair is kept up to date as frames arrive and merge. A step therefore costs O(N*C)
    whatever M is, apart from the attention that reads the bank.

    `fields` are tensors stored beside the tokens (name -> width) that follow every merge, such
    as the cached key/value projections of the attention layers reading this bank.
    `decay_rates` (1 / tau per timescale) adds the field 'decay': exp(-age / tau) of every
    token, aged in place as frames arrive (model/time_encoding.py says why).
    capacity=None never compresses (the no-compression baseline of the benchmark).

    `policy` says what happens when the bank is over capacity: 'mbc' merges the most similar
    adjacent pair (MA-LMM); 'fifo' drops the oldest slot, the baseline of the memory ablation.

    `groups` stacks several independent banks that receive frames at the same times (the
    per-layer query banks) along the batch dimension, so one `commit` compresses them all:
    each (group, batch, position) still merges its own most similar pair.

    A frame enters in three phases: `open_slot` reserves a free slot and stamps it (or
    `add_frame`, which also writes the tokens), `write` fills tokens and cached fields (attention
    then reads [stored ; current] as one view, no copy), and `commit` compresses once if the
    bank now holds more than `capacity` frames.
    """

    POLICIES = ('mbc', 'fifo')

    def __init__(self, capacity: int | None, fields: Mapping[str, int] | None = None, *,
                 groups: int = 1, policy: str = 'mbc',
                 decay_rates: Sequence[float] | None = None,
                 decay_fields: Mapping[str, int] | None = None) -> None:
        if policy not in self.POLICIES:
            raise ValueError(f'memory policy must be one of {self.POLICIES}, got {policy!r}')
        self.policy = policy
        if capacity is not None and capacity < 1:
            raise ValueError(f'memory capacity must be >= 1 or None, got {capacity}')
        if groups < 1:
            raise ValueError(f'groups must be >= 1, got {groups}')
        self.capacity = capacity
        self.fields = dict(fields or {})
        self.groups = groups
        # Decays: exp(-age / tau) per timescale, merged like the tokens (a merged slot holds
        # the mean decay of its frames). They live in the last F channels of each of `parts`
        # equal parts of the fields named in decay_fields (each head's cached value, so
        # attention reads [value_h ; decays] with no copy), or in a field 'decay' of their own.
        # Stored as of a reference time: stored * decay_scale() is the decay now. Every token
        # ages by the same factor, so a reader applies it to what it read, and the stored
        # values are rescaled in place only when new frames' values would grow too large.
        self.decay_rates = tuple(float(r) for r in decay_rates or ())
        self.decay_fields: dict[str, int] = {}
        if self.decay_rates:
            if any(not math.isfinite(r) or r <= 0 for r in self.decay_rates):
                raise ValueError(f'decay rates must be finite and > 0, got {self.decay_rates}')
            for name, parts in (decay_fields or {}).items():
                width = self.fields.get(name, 0)
                if parts < 1 or width % parts or width // parts < len(self.decay_rates):
                    raise ValueError(f'decay field {name!r} of width {width} cannot hold '
                                     f'{parts} part(s) of {len(self.decay_rates)} decays')
                self.decay_fields[name] = parts
            if not self.decay_fields:
                if 'decay' in self.fields:
                    raise ValueError("field name 'decay' is reserved for the decays")
                self.fields['decay'] = len(self.decay_rates)
                self.decay_fields = {'decay': 1}
        elif decay_fields:
            raise ValueError('decay_fields without decay_rates')
        self._max_rate = max(self.decay_rates, default=0.0)
        self._rates_np = np.array(self.decay_rates)  # float64; as the storage in _exps
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None  # _exps' outputs
        # Per length: each slot's place value, newest first, laid out like _order (age_ranks
        # and order_places scatter it; made once per length, shape, dtype and device).
        self._place_values: dict[tuple, torch.Tensor] = {}
        self._data: torch.Tensor | None = None  # (G*B, S, N, W) packed: tokens, then fields
        self.reset()

    def reset(self) -> None:
        """Forget every slot (storage is kept for reuse)."""
        self._len = 0
        self._counts: torch.Tensor | None = None  # (G*B, S, N) float64 frames per slot
        self._times: torch.Tensor | None = None  # (G*B, S, N) float64 seconds (mean)
        self._order: torch.Tensor | None = None  # (G*B, S, N): physical slot of t-th oldest
        self._sims: torch.Tensor | None = None  # (G*B, S, N): cos(order[t], order[t+1])
        self._newest: torch.Tensor | None = None  # (G*B, 1, N): physical slot of newest
        self._newest_rows: torch.Tensor | None = None  # (G*B*N,): its rows in _flat()
        self._row_offsets: torch.Tensor | None = None  # (G*B, N): row of slot 0 per position
        self._free: torch.Tensor | None = None  # (G*B, 1, N): physical slot for the next
        self._batch = 0
        self._token_width = 0
        self._last_time = 0.0  # newest stamp seen (the decays' clock: it never goes back)
        self._decay_ref = 0.0  # the time the stored decays are relative to
        self._fresh: torch.Tensor | None = None  # [F] stored decays of age 0 (this step)
        self._scale: torch.Tensor | None = None  # [F] stored -> now (decay_scale())
        self._open = False  # a slot was opened and not yet committed
        self._sims_pending = False  # the newest slot's similarity is computed at commit
        self.frames_seen = 0
        self.compressions = 0

    def __len__(self) -> int:
        return self._len

    # -- layout -----------------------------------------------------------------------------

    def _slice(self, name: str) -> slice:
        if name == 'tokens':
            return slice(0, self._token_width)
        offset = self._token_width
        for field_name, width in self.fields.items():
            if field_name == name:
                return slice(offset, offset + width)
            offset += width
        raise KeyError(f'bank has no field {name!r}; fields: {sorted(self.fields)}')

    def _rows(self, group: int | None) -> slice:
        if group is None:
            return slice(None)
        if not 0 <= group < self.groups:
            raise IndexError(f'group {group} out of range for {self.groups} group(s)')
        return slice(group * self._batch, (group + 1) * self._batch)

    def has(self, name: str) -> bool:
        """Whether the bank stores `name` (tokens always; cached fields if configured)."""
        return name == 'tokens' or name in self.fields

    def _allocate(self, like: torch.Tensor) -> None:
        batch, positions, width = like.shape
        self._batch, self._token_width = batch, width
        slots = self.capacity + 1 if self.capacity is not None else 16
        shape = (self.groups * batch, slots, positions)
        packed = width + sum(self.fields.values())
        data = self._data
        if data is None or data.shape != (*shape, packed) or data.dtype != like.dtype \
                or data.device != like.device:
            self._data = like.new_zeros(*shape, packed)
        self._counts = torch.zeros(shape, dtype=torch.float64, device=like.device)
        self._times = torch.zeros(shape, dtype=torch.float64, device=like.device)
        self._order = torch.arange(slots, device=like.device).view(1, -1, 1).expand(
            shape).contiguous()
        self._sims = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self._free = torch.zeros(shape[0], 1, positions, dtype=torch.long, device=like.device)
        self._set_row_offsets()

    def _set_row_offsets(self) -> None:
        """Row of slot 0 of every (row, position) in _flat(); a slot s adds s * N."""
        assert self._data is not None
        rows, slots, positions = self._data.shape[:3]
        device = self._data.device
        self._row_offsets = (torch.arange(rows, device=device).view(-1, 1) * slots * positions
                             + torch.arange(positions, device=device).view(1, -1))

    def _flat(self) -> torch.Tensor:
        """Storage as one row per (row, slot, position): [G*B*S*N, packed] (a view)."""
        assert self._data is not None
        return self._data.view(-1, self._data.shape[-1])

    def _grow(self) -> None:
        """Double the storage of an uncompressed bank (capacity=None)."""
        assert self._data is not None and self._counts is not None and self._times is not None
        assert self._order is not None and self._sims is not None
        slots = self._data.shape[1]
        self._data = torch.cat([self._data, torch.zeros_like(self._data)], dim=1)
        self._counts = torch.cat([self._counts, torch.zeros_like(self._counts)], dim=1)
        self._times = torch.cat([self._times, torch.zeros_like(self._times)], dim=1)
        extra = torch.arange(slots, 2 * slots, device=self._order.device).view(1, -1, 1)
        self._order = torch.cat([self._order, extra.expand_as(self._order)], dim=1)
        self._sims = torch.cat([self._sims, torch.zeros_like(self._sims)], dim=1)
        self._set_row_offsets()

    # -- writing ----------------------------------------------------------------------------

    def open_slot(self, time_s: float, like: torch.Tensor) -> None:
        """Reserve the slot of a new frame stamped `time_s` (seconds) in every group.

        `like` is one group's tokens [B, N, C] (shape, dtype, device); fill the slot with
        `write('tokens', ...)` per group before reading the bank.
        """
        if self._open:
            raise RuntimeError('open_slot() twice without commit()')
        if self._len == 0:
            self._allocate(like)
        elif self._len == self._data.shape[1]:
            self._grow()
        assert self._data is not None and self._free is not None and self._order is not None
        if like.shape != (self._batch, self._data.shape[2], self._token_width):
            raise ValueError(f'frame tokens {tuple(like.shape)} do not fit bank of '
                             f'{self._batch} x {self._data.shape[2]} x {self._token_width}')
        slot = self._free
        # Rows of the new slot in _flat(): writes copy whole rows there (index_copy_), several
        # times faster than a scatter over an index expanded to every channel.
        self._newest_rows = self._flat_rows(slot)
        if self.decay_rates:
            self._start_decays(float(time_s))
        self._counts.scatter_(1, slot, 1.0)
        self._times.scatter_(1, slot, float(time_s))
        self._order[:, self._len:self._len + 1] = slot
        self._newest = slot
        self._len += 1
        self.frames_seen += 1
        self._free = torch.full_like(slot, self._len)
        self._sims_pending = self._len > 1
        self._open = True

    def _decay_views(self, data: torch.Tensor) -> list[torch.Tensor]:
        """The decay channels of `data` [R, S, N, packed]: one [R, S, N, parts, F] view per
        decay field."""
        count = len(self.decay_rates)
        return [data[..., self._slice(name)].unflatten(-1, (parts, -1))[..., -count:]
                for name, parts in self.decay_fields.items()]

    def _start_decays(self, time_s: float) -> None:
        """Advance the decays' clock to `time_s` (jitter back in time counts as no time
        passing) and give the new slot the decays of age 0 (exp(elapsed / tau) relative to the
        reference time), rescaling every stored decay first if those would pass e^16."""
        assert self._data is not None
        data = self._data
        if self._len == 0:
            self._last_time = self._decay_ref = time_s
        elif time_s > self._last_time:  # False for jitter (and NaN)
            self._last_time = time_s
            if (time_s - self._decay_ref) * self._max_rate > _MAX_LOG_DECAY:
                shift = self._exps(self._decay_ref - time_s)[0]
                for decay in self._decay_views(data):
                    decay.mul_(shift)
                self._decay_ref = time_s
        # exp(+elapsed / tau) is a new token's stored decay, its inverse ages what was stored
        # to now: both once per step.
        self._fresh, self._scale = self._exps(self._last_time - self._decay_ref)
        if 'decay' in self.decay_fields:  # a field of its own: nobody else writes it
            self._flat()[:, self._slice('decay')].index_copy_(
                0, self._newest_rows, self._fresh.expand(len(self._newest_rows), -1))

    def _exps(self, elapsed: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(exp(elapsed * rate), exp(-elapsed * rate)) per timescale as the storage, computed
        in numpy: one small array per step costs less than torch operators on a rates tensor
        or torch.tensor() of a list."""
        data = self._data
        assert data is not None
        kind = _NUMPY_TYPES.get(data.dtype)
        if kind is not None and data.device.type == 'cpu':
            # No torch operator at all: numpy writes into two small tensors kept for this
            # (the factors are read within the step that made them).
            if self._factors is None or self._factors[0].dtype != data.dtype:
                with torch.inference_mode(False):
                    self._factors = (torch.empty(len(self._rates_np), dtype=data.dtype),
                                     torch.empty(len(self._rates_np), dtype=data.dtype))
                self._rates_np = self._rates_np.astype(kind)
            up, down = self._factors
            array = up.numpy()
            np.exp(np.multiply(self._rates_np, elapsed, out=array), out=array)
            np.reciprocal(array, out=down.numpy())
            return up, down
        up = np.exp(self._rates_np * elapsed)
        both = torch.from_numpy(np.stack([up, 1.0 / up])).to(dtype=data.dtype,
                                                               device=data.device)
        return both[0], both[1]

    def decay_scale(self) -> torch.Tensor:
        """[F]: stored decays times this are the decays at the newest frame's time. On CPU the
        same tensor is rewritten when the next frame opens: read it within the step."""
        if self._scale is None or not self.decay_rates:
            raise RuntimeError('the bank has no decays yet')
        return self._scale

    def write(self, name: str, value: torch.Tensor, group: int | None = None) -> None:
        """Fill field `name` (or 'tokens') of the newest frame: value [B, N, W] for one group,
        or [G*B, N, W] with group None. A field holding decays takes every channel but the
        decays (W minus F per part): the bank keeps those."""
        if self._newest is None or self._data is None:
            raise RuntimeError('write() before add_frame() / open_slot()')
        assert self._newest_rows is not None
        target = self._flat()[:, self._slice(name)]
        rows = self._newest_rows
        if group is not None:
            self._rows(group)  # checks the group
            count = self._batch * self._data.shape[2]
            rows = rows[group * count:(group + 1) * count]
        if value.requires_grad:
            value = value.detach()
        value = value.reshape(len(rows), -1)
        if value.dtype != target.dtype:
            value = value.to(target.dtype)
        if name in self.decay_fields:  # the value's parts, each followed by the new decays
            parts = self.decay_fields[name]
            value = value.view(len(rows), parts, -1)
            assert self._fresh is not None
            value = torch.cat([value, self._fresh.expand(len(rows), parts, -1)],
                              dim=-1).flatten(1)
        target.index_copy_(0, rows, value)

    def add_frame(self, tokens: torch.Tensor, time_s: float) -> None:
        """open_slot and write the tokens [B, N, C] (a bank of one group)."""
        if self.groups != 1:
            raise RuntimeError('add_frame() is for single-group banks; use open_slot/write')
        self.open_slot(time_s, tokens)
        self.write('tokens', tokens)

    def commit(self) -> None:
        """Finish the newest frame: update similarities, compress once if over capacity."""
        self._open = False
        if self._sims_pending:
            assert self._order is not None and self._sims is not None
            previous = self._order[:, self._len - 2:self._len - 1]
            sim = _cosine(self._gather('tokens', previous), self._gather('tokens', self._newest))
            self._sims[:, self._len - 2:self._len - 1] = sim
            self._sims_pending = False
        if self.capacity is not None and self._len > self.capacity:
            self._compress()

    def append(self, tokens: torch.Tensor, time_s: float,
               fields: Mapping[str, torch.Tensor] | None = None) -> None:
        """add_frame, write every field, commit: one frame [B, N, C] in one call."""
        self.add_frame(tokens, time_s)
        for name, value in (fields or {}).items():
            self.write(name, value)
        self.commit()

    def _compress(self) -> None:
        """Merge the most similar adjacent pair of every row and position (MBC), in place."""
        assert self._data is not None and self._counts is not None and self._times is not None
        assert self._order is not None and self._sims is not None
        length = self._len
        if self.policy == 'fifo':  # the second oldest takes the oldest's place: oldest dropped
            k = torch.zeros_like(self._sims[:, :1], dtype=torch.long)
        else:
            k = self._sims[:, :length - 1].argmax(dim=1, keepdim=True)  # (R, 1, N)
        keep = self._order.gather(1, k)  # physical slots: merged into `keep`, `drop` freed
        drop = self._order.gather(1, k + 1)
        c_keep, c_drop = self._counts.gather(1, keep), self._counts.gather(1, drop)
        w_drop = c_drop / (c_keep + c_drop)
        if self.policy == 'fifo':
            w_drop = torch.ones_like(w_drop)
            c_keep = torch.zeros_like(c_keep)
        # first + w * (second - first): equal slots stay bit-identical, so exact ties keep
        # breaking towards the earliest pair whatever the float type or device.
        first = self._gather(None, keep)
        merged = first + w_drop.to(self._data.dtype).unsqueeze(-1) * (
            self._gather(None, drop) - first)
        self._flat().index_copy_(0, self._flat_rows(keep), merged.flatten(0, 2))
        t_keep = self._times.gather(1, keep)
        self._times.scatter_(1, keep, t_keep + w_drop * (self._times.gather(1, drop) - t_keep))
        self._counts.scatter_(1, keep, c_keep + c_drop)
        self._counts.scatter_(1, drop, 0.0)

        # Remove entry k+1 from the temporal order and the adjacent-pair similarities.
        index = torch.arange(self._order.shape[1], device=k.device).view(1, -1, 1)
        source = (index + (index > k).long()).clamp(max=self._order.shape[1] - 1)
        self._order = self._order.gather(1, source)
        self._sims = self._sims.gather(1, source)
        self._len = length - 1
        merged_tokens = merged[..., self._slice('tokens')]
        # Pairs (k-1, k) and (k, k+1) of the new order involve the merged slot; the first
        # exists when k > 0, the second when k + 1 < new length.
        at = torch.cat([(k - 1).clamp(min=0), (k + 1).clamp(max=self._len - 1)], dim=1)
        neighbours = self._gather('tokens', self._order.gather(1, at))  # (R, 2, N, C)
        fresh = _cosine(neighbours, merged_tokens)  # (R, 2, N)
        # Two scatters, not one: with k == 0 both pairs would target index 0, and scatter_ with
        # duplicate indices does not say which write wins.
        before = at[:, :1]
        self._sims.scatter_(1, before, torch.where(k > 0, fresh[:, :1],
                                                   self._sims.gather(1, before)))
        self._sims.scatter_(1, k, torch.where(k + 1 < self._len, fresh[:, 1:],
                                              self._sims.gather(1, k)))
        self._free = drop
        self.compressions += 1

    # -- reading ----------------------------------------------------------------------------

    def view(self, name: str, group: int | None = None) -> torch.Tensor:
        """Field `name` of every slot in use, in storage order: [B, S_used, N, W] (a view).

        Attention does not depend on slot order, so it reads this directly; during a step the
        newest frame is included. Pair it with `ages`, which uses the same order.
        """
        if self._data is None or self._len == 0:
            raise RuntimeError('the bank is empty')
        return self._data[self._rows(group), :self._used(), :, self._slice(name)]

    def decays(self, group: int | None = None) -> torch.Tensor:
        """exp(-age / tau) of every token in use, in storage order: [B, S_used, N, F] (the
        first decay field's first part, times decay_scale())."""
        if not self.decay_rates:
            raise KeyError('bank has no decays (decay_rates not set)')
        if self._data is None or self._len == 0:
            raise RuntimeError('the bank is empty')
        stored = self._decay_views(self._data[self._rows(group), :self._used()])[0][..., 0, :]
        return stored * self.decay_scale()

    def ages(self, now_s: float, group: int | None = None) -> torch.Tensor:
        """Age in seconds of every slot in use, in storage order: [B, S_used, N] float64."""
        assert self._times is not None
        return now_s - self._times[self._rows(group), :self._used()]

    def age_ranks(self, group: int | None = None) -> torch.Tensor:
        """Place of every slot in use in its position's temporal order, in storage order:
        [B, S_used, N] int64, 0 for the newest frame up to len(self) - 1 for the oldest.

        Compression merges each token position on its own, so the slots of one storage index
        can rank differently across positions (as their times differ).
        """
        return self._scatter_places(torch.long, 1, group)

    def order_places(self, dtype: torch.dtype, group: int | None = None) -> torch.Tensor:
        """`age_ranks` as places in [0, 1], scaled by the capacity (rank / (M - 1); an
        uncompressed bank by its own length): [B, S_used * N, 1] in `dtype`, laid out for the
        attention bias (model/time_encoding.py `order_places` says why; this is the same
        value in three operators, as it runs for every bank on every step)."""
        span = (self.capacity if self.capacity is not None else self._len) - 1
        places = self._scatter_places(dtype, max(span, 1), group)
        return places.view(places.shape[0], -1, 1)

    def _scatter_places(self, dtype: torch.dtype, span: int,
                        group: int | None) -> torch.Tensor:
        """Storage-order [B, S_used, N] of each slot's rank (0 newest) / span, in dtype."""
        assert self._order is not None
        order = self._order[self._rows(group), :self._len]  # physical slot of t-th oldest
        key = (self._len, tuple(order.shape), dtype, order.device, span)
        values = self._place_values.get(key)
        if values is None:
            if len(self._place_values) > 16:
                self._place_values.clear()
            newest_first = torch.arange(self._len - 1, -1, -1, device=order.device)
            values = newest_first.to(dtype).div(span) if dtype != torch.long else newest_first
            values = values.view(1, -1, 1).expand_as(order)
            self._place_values[key] = values
        places = torch.zeros((order.shape[0], self._used(), order.shape[2]), dtype=dtype,
                             device=order.device)
        # During a step every used physical slot is in the order once: a permutation.
        return places.scatter_(1, order, values)

    def place_newest(self, stored: torch.Tensor, live: torch.Tensor,
                     group: int | None = None) -> torch.Tensor:
        """`stored` [B, S_used, N, W] with the newest frame's entries replaced by `live` [B, N, W].

        Out of place, so gradients reach `live` (training); the stored copy is detached.
        """
        assert self._newest is not None
        newest = self._newest[self._rows(group)]
        return stored.scatter(1, _expand(newest, (*live.shape[:1], 1, *live.shape[1:])),
                              live.unsqueeze(1))

    def _used(self) -> int:
        # Until the first compression, slots 0..len-1 are used; afterwards all physical slots
        # are, the freed one holding the newest frame during a step.
        assert self._data is not None
        return min(self._data.shape[1], self._len if self.compressions == 0
                   else self._data.shape[1])

    def ordered(self, name: str = 'tokens', group: int | None = None) -> torch.Tensor:
        """Field `name` of the stored slots, oldest first: [B, T, N, W] (a copy)."""
        if self._data is None or self._len == 0:
            raise RuntimeError('the bank is empty')
        return self._gather(name, self._order[:, :self._len])[self._rows(group)]

    @property
    def tokens(self) -> torch.Tensor:
        """Stored tokens oldest first: [G*B, T, N, C]."""
        return self.ordered('tokens')

    @property
    def counts(self) -> torch.Tensor:
        """Frames merged into each stored slot, oldest first: [G*B, T, N] float64."""
        assert self._counts is not None and self._order is not None
        return self._counts.gather(1, self._order[:, :self._len])

    @property
    def times(self) -> torch.Tensor:
        """Count-weighted mean timestamp (seconds) of each stored slot, oldest first."""
        assert self._times is not None and self._order is not None
        return self._times.gather(1, self._order[:, :self._len])

    def rows(self, group: int) -> BankRows:
        """A read-only view of one group (e.g. one layer's query bank)."""
        return BankRows(self, group)

    def nbytes(self) -> int:
        """Bytes of storage held by the bank."""
        tensors = (self._data, self._counts, self._times, self._order, self._sims)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # -- helpers ----------------------------------------------------------------------------

    def _gather(self, name: str | None, slots: torch.Tensor) -> torch.Tensor:
        """Field `name` (None: every field) at physical `slots` [R, K, N] -> [R, K, N, W]:
        whole rows of _flat() (index_select copies rows; a gather over an index expanded to
        every channel was several times slower)."""
        flat = self._flat()
        if name is not None:
            flat = flat[:, self._slice(name)]
        return flat.index_select(0, self._flat_rows(slots)).view(*slots.shape, -1)

    def _flat_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Physical `slots` [R, K, N] of every row -> their rows in _flat(), flattened."""
        assert self._row_offsets is not None and slots.shape[0] == self._row_offsets.shape[0]
        return (slots * slots.shape[-1] + self._row_offsets.unsqueeze(1)).flatten()


class BankRows:
    """One group of a MemoryBank seen as a bank of its own (read-only)."""

    def __init__(self, bank: MemoryBank, group: int) -> None:
        self.bank, self.group = bank, group

    def __len__(self) -> int:
        return len(self.bank)

    @property
    def capacity(self) -> int | None:
        return self.bank.capacity

    @property
    def fields(self) -> dict[str, int]:
        return self.bank.fields

    @property
    def frames_seen(self) -> int:
        return self.bank.frames_seen

    @property
    def compressions(self) -> int:
        return self.bank.compressions

    def has(self, name: str) -> bool:
        return self.bank.has(name)

    def ordered(self, name: str = 'tokens') -> torch.Tensor:
        return self.bank.ordered(name, self.group)

    @property
    def tokens(self) -> torch.Tensor:
        return self.ordered('tokens')

    @property
    def counts(self) -> torch.Tensor:
        return self.bank.counts[self.bank._rows(self.group)]

    @property
    def times(self) -> torch.Tensor:
        return self.bank.times[self.bank._rows(self.group)]

    def nbytes(self) -> int:
        return self.bank.nbytes() // self.bank.groups


# The storage dtypes whose decay factors numpy makes directly (MemoryBank._exps).
_NUMPY_TYPES = {torch.float32: np.float32, torch.float64: np.float64}

# Stored decays are rescaled once a new frame's would pass e^16 (far from float32's e^88).
_MAX_LOG_DECAY = 16.0


def _expand(slots: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Index [B, K, N] broadcast over trailing dims: [B, K, N, W] (or [B, K, N, P, W])."""
    return slots.view(*slots.shape, *[1] * (len(shape) - slots.dim())).expand(*shape)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dim, computed exactly as the functional MBC reference of
    the tests (test/support/mbc_reference.py)."""
    return (F.normalize(a, dim=-1, eps=1e-12) * F.normalize(b, dim=-1, eps=1e-12)).sum(dim=-1)


@dataclass(frozen=True)
class Decays:
    """A bank's decays: rates (1 / tau per timescale) and the fields holding them (name ->
    parts, MemoryBank's decay_fields; empty: a field of their own)."""

    rates: tuple[float, ...]
    fields: Mapping[str, int]


@dataclass(frozen=True)
class MemorySpec:
    """How one stream's memory behaves, passed whole to every layer that builds one.

    The node runs MemorySpec(memory_bank_length): MBC over both kinds of bank, projections
    cached. The other values exist for the memory ablation (bench/memory_ablation.py) and for
    comparisons.
    """

    capacity: int | None  # M: slots of every bank; None never compresses (a baseline)
    policy: str = 'mbc'  # over capacity: 'mbc' merges the most similar pair; 'fifo' drops one
    query_memory: bool = True  # False: no query banks (self-attention: current queries only)
    cache_projections: bool = True  # keep stored frames' keys/values; False: recompute them

    def __post_init__(self) -> None:
        if self.policy not in MemoryBank.POLICIES:
            raise ConfigError(f'memory policy must be one of {list(MemoryBank.POLICIES)}, got '
                              f'{self.policy!r}')
        if self.capacity is not None and (isinstance(self.capacity, bool) or self.capacity < 1):
            raise ConfigError(f'memory capacity must be >= 1 or None, got {self.capacity!r}')


class StreamMemory:
    """All memory of one stream: the visual bank and one query bank per Q-Former layer.

    One object, owned by the pipeline and passed to the Q-Former each step; `reset()` clears
    every bank together (the public code resets query banks on a frame counter instead).
    The per-layer query banks live stacked in `query_bank` (one compression call per step for
    all layers); `queries[l]` shows layer l's bank on its own.
    `spec` says how it behaves (MemorySpec). With spec.cache_projections the banks also keep
    each attention layer's key/value projections of stored frames (`visual_fields`,
    `query_fields`: name -> width); without it every step recomputes them, as the public code
    does. `visual_decays` / `query_decays` give a bank its decays (Decays: in the cached value
    fields, or in a field of their own when nothing is cached).
    """

    def __init__(self, num_layers: int, spec: MemorySpec, *,
                 visual_fields: Mapping[str, int] | None = None,
                 query_fields: Mapping[str, int] | None = None,
                 visual_decays: Decays | None = None,
                 query_decays: Decays | None = None) -> None:
        cached = spec.cache_projections

        def bank(fields: Mapping[str, int] | None, decays: Decays | None,
                 groups: int) -> MemoryBank:
            # Without cached fields the decays get a field of their own.
            return MemoryBank(spec.capacity, fields if cached else None, groups=groups,
                              policy=spec.policy, decay_rates=decays.rates if decays else None,
                              decay_fields=decays.fields if decays and cached else None)

        self.spec = spec
        self.visual = bank(visual_fields, visual_decays, 1)
        self.query_bank = bank(query_fields, query_decays, num_layers)
        self.queries = [self.query_bank.rows(layer) for layer in range(num_layers)]
        self.frames_seen = 0

    def reset(self) -> None:
        """Forget everything: visual bank, query banks and the frame count."""
        self.visual.reset()
        self.query_bank.reset()
        self.frames_seen = 0

    def __len__(self) -> int:
        """Slots currently stored in the visual bank."""
        return len(self.visual)

    def nbytes(self) -> int:
        """Bytes held by every bank."""
        return self.visual.nbytes() + self.query_bank.nbytes()
