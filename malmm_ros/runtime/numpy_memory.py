"""The MA-LMM memory in numpy, for the torch-free runtime (`runtime: onnx`).

The same banks as model/memory.py (the reference, which training and the torch runtime use),
for inference only: one stream, capacity M, MBC, cached key/value projections. The step graph
(runtime/step_export.py) reads each bank's storage as explicit inputs and returns the current
frame's rows; this module writes them, ages the decays and compresses. Merges use the same
count-weighted formula in the same float type as the reference, so a stream gives the same
memory in both up to rounding.

Storage is one array per field, [G, H, M + 1, P, W] (groups, heads, physical slots, token
positions, width per head): each group's rows of a field are then one contiguous
[H, (M + 1) * P, W] graph input, already split into the attention's heads, with no copy or
transpose. Empty slots are masked by the attention bias (`attention_inputs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ['MASKED', 'NumpyBank', 'NumpyMemory', 'age_buckets']

# Additive attention bias of an empty or not-yet-written slot: exp() of it underflows to exactly
# 0 in float32 (and it still fits float16, for TensorRT).
MASKED = -1.0e4

# Stored decays are rescaled once a new frame's would pass e^16 (as model/memory.py).
_MAX_LOG_DECAY = 16.0


def age_buckets(ages_s: np.ndarray, num_buckets: int, max_age_s: float) -> np.ndarray:
    """model/time_encoding.py `age_buckets` in numpy (float64, int64 out)."""
    log_scale = (num_buckets - 2) / math.log1p(max_age_s)
    with np.errstate(invalid='ignore'):  # NaN ages land in bucket 0, as in torch
        log_age = np.minimum(np.log1p(np.maximum(ages_s, 0.0)), 2 * math.log1p(max_age_s))
        past = 1 + np.minimum(np.floor(log_age * log_scale), num_buckets - 2).astype(np.int64)
    return np.where(ages_s > 0, past, 0)


class NumpyBank:
    """Up to `capacity` slots of `positions` token positions, in `groups` independent banks.

    `fields`: name -> (heads, width per head), 'tokens' (what MBC compares, one head) among
    them. `decay_fields`: name -> first head whose last len(decay_rates) channels hold the
    decays (that head and every later one), relative to a reference time (model/memory.py
    says why); `fresh` and `scale` are this step's factors (stored decays of a new frame;
    stored -> now).

    Slots are addressed as in model/memory.py: `order[g, t, p]` is the physical slot of the
    t-th oldest frame of position p, and a merge frees one physical slot per (group, position)
    for the next frame. Every gather and scatter goes through flat row numbers (one index
    array per operation), several times faster in numpy than indexing with four arrays.
    """

    def __init__(self, capacity: int, positions: int, fields: Mapping[str, tuple[int, int]], *,
                 groups: int = 1, decay_rates: Sequence[float] = (),
                 decay_fields: Mapping[str, int] | None = None,
                 dtype: type = np.float32) -> None:
        if capacity < 1 or positions < 1 or groups < 1:
            raise ValueError(f'capacity, positions and groups must be >= 1, got {capacity}, '
                             f'{positions}, {groups}')
        if fields.get('tokens', (0, 0))[0] != 1:
            raise ValueError("a bank needs a 'tokens' field of one head")
        self.capacity, self.positions, self.groups = capacity, positions, groups
        self.slots = slots = capacity + 1
        self.data = {name: np.zeros((groups, heads, slots, positions, width), dtype)
                     for name, (heads, width) in fields.items()}
        self._flat = {name: array.reshape(-1, array.shape[-1])
                      for name, array in self.data.items()}
        self.decay_fields = dict(decay_fields or {})
        self.num_decays = len(decay_rates)
        for name, first in self.decay_fields.items():
            if not 0 <= first < fields[name][0] or fields[name][1] < self.num_decays:
                raise ValueError(f'decay field {name!r} of {fields[name]} (heads, channels) '
                                 f'cannot hold {self.num_decays} decays from head {first}')
        # As model/memory.py: float64 rates cast to the storage type, the factors in it.
        self._rates = np.asarray(decay_rates, np.float64).astype(dtype)
        self._max_rate = max(decay_rates, default=0.0)
        # Flat number of (group, slot 0, position) in a [G, S, P] array, and of (group, head,
        # slot 0, position) in each field, per head count: a slot s adds s * P.
        self._base = (np.arange(groups).reshape(-1, 1) * slots * positions
                      + np.arange(positions).reshape(1, -1))  # (G, P)
        self._row_base = {heads: ((np.arange(groups).reshape(-1, 1, 1) * heads
                                   + np.arange(heads).reshape(1, -1, 1)) * slots * positions
                                  + np.arange(positions).reshape(1, 1, -1))
                          for heads, _ in fields.values()}  # (G, H, P)
        self._heads = {name: heads for name, (heads, _) in fields.items()}
        self._entry = np.arange(slots).reshape(1, -1, 1)  # places in the order
        self.reset()

    def reset(self) -> None:
        """Forget every slot (storage kept; empty slots are masked, never read)."""
        shape = (self.groups, self.slots, self.positions)
        self.counts = np.zeros(shape)
        self.times = np.zeros(shape)
        self.order = np.broadcast_to(self._entry, shape).copy()
        self.sims = np.zeros(shape, self._rates.dtype)  # the storage's type, as the reference
        self.newest = np.zeros(shape[::2], np.int64)  # (G, P) physical slot of the newest
        self._free = np.zeros(shape[::2], np.int64)
        self.length = 0
        self.frames_seen = 0
        self.compressions = 0
        self._last_time = 0.0
        self._decay_ref = 0.0
        self.fresh = np.ones(self.num_decays, self._rates.dtype)
        self.scale = np.ones(self.num_decays, self._rates.dtype)

    def __len__(self) -> int:
        return self.length

    # -- indexing ---------------------------------------------------------------------------

    def _cells(self, slots: np.ndarray) -> np.ndarray:
        """Flat numbers in a [G, S, P] array of physical `slots` [G, P]."""
        return self._base + slots * self.positions

    def _rows(self, name: str, slots: np.ndarray) -> np.ndarray:
        """Row numbers in field `name`'s flat view of physical `slots` [..., G, P]:
        [..., G, H, P]."""
        return self._row_base[self._heads[name]] + np.expand_dims(slots * self.positions, -2)

    def _order_at(self, entries: np.ndarray) -> np.ndarray:
        """Physical slots of the order's `entries` [G, P] (t-th oldest per position)."""
        return self.order.reshape(-1)[self._cells(entries)]

    # -- a frame: open_slot, (graphs), write, commit ----------------------------------------

    def open_slot(self, time_s: float) -> None:
        """Reserve the newest frame's slot in every group and position, stamped `time_s`."""
        slot = self._free
        if self.num_decays:
            self._start_decays(time_s)
        cells = self._cells(slot)
        self.counts.reshape(-1)[cells] = 1.0
        self.times.reshape(-1)[cells] = time_s
        self.order[:, self.length] = slot
        self.newest = slot
        self.length += 1
        self.frames_seen += 1
        self._free = np.full_like(slot, self.length)

    def write(self, name: str, rows: np.ndarray) -> None:
        """Field `name` of the newest frame: rows [G, H, P, W] (decay channels included)."""
        flat = self._flat[name]
        flat[self._rows(name, self.newest).reshape(-1)] = rows.reshape(-1, flat.shape[1])

    def commit(self) -> None:
        """The newest pair's similarity, then one compression if over capacity."""
        if self.length > 1:
            previous = self.order[:, self.length - 2]
            self.sims[:, self.length - 2] = _cosine(self._tokens(previous),
                                                    self._tokens(self.newest))
        if self.length > self.capacity:
            self._compress()

    def _tokens(self, slots: np.ndarray) -> np.ndarray:
        """Tokens at physical `slots` [..., G, P] -> [..., G, P, C]."""
        return np.take(self._flat['tokens'], self._rows('tokens', slots)[..., 0, :], axis=0)

    # -- what the graphs read ---------------------------------------------------------------

    def rows(self, name: str, group: int = 0) -> np.ndarray:
        """Field `name` of every physical slot of `group`: [H, (M + 1) * P, W] (a view)."""
        array = self.data[name][group]
        return array.reshape(array.shape[0], -1, array.shape[-1])

    def attention_inputs(self, now_s: float, num_buckets: int, max_age_s: float, *,
                         mask_newest: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(age buckets int64, order places float32, additive mask float32), each
        [G, (M + 1) * P]: what the attention bias of every stored row needs. Empty slots are
        masked, and the newest one with `mask_newest` (when the graph computes the current
        frame's rows itself). Places as model/memory.py `order_places`: rank (0 newest) /
        (M - 1)."""
        buckets = age_buckets(now_s - self.times, num_buckets, max_age_s)
        newest_first = np.arange(self.length - 1, -1, -1, dtype=np.float32)
        newest_first /= np.float32(max(self.capacity - 1, 1))
        places = np.zeros(self.counts.shape, np.float32)
        cells = self._base[:, None] + self.order[:, :self.length] * self.positions
        places.reshape(-1)[cells] = newest_first.reshape(1, -1, 1)
        mask = np.where(self.counts > 0, np.float32(0.0), np.float32(MASKED))
        if mask_newest:
            mask.reshape(-1)[self._cells(self.newest)] = MASKED
        flat = (self.groups, -1)
        return buckets.reshape(flat), places.reshape(flat), mask.reshape(flat)

    # -- decays -----------------------------------------------------------------------------

    def _start_decays(self, time_s: float) -> None:
        """Advance the decays' clock (jitter back counts as no time) and set this step's
        factors, rescaling the stored decays first if new ones would pass e^16."""
        if self.length == 0:
            self._last_time = self._decay_ref = time_s
        elif time_s > self._last_time:
            self._last_time = time_s
            if (time_s - self._decay_ref) * self._max_rate > _MAX_LOG_DECAY:
                shift = self._exp(self._decay_ref - time_s)
                for name, first in self.decay_fields.items():
                    self.data[name][:, first:, ..., -self.num_decays:] *= shift
                self._decay_ref = time_s
        self.fresh = self._exp(self._last_time - self._decay_ref)
        self.scale = np.reciprocal(self.fresh)

    def _exp(self, elapsed: float) -> np.ndarray:
        out = np.multiply(self._rates, self._rates.dtype.type(elapsed))
        return np.exp(out, out=out)

    # -- compression ------------------------------------------------------------------------

    def _compress(self) -> None:
        """Merge the most similar adjacent pair of every group and position (MBC)."""
        length, positions = self.length, self.positions
        k = self.sims[:, :length - 1].argmax(axis=1)  # (G, P): pair (k, k + 1) of the order
        keep, drop = self._order_at(k), self._order_at(k + 1)
        keep_cells, drop_cells = self._cells(keep), self._cells(drop)
        counts, times = self.counts.reshape(-1), self.times.reshape(-1)
        c_keep, c_drop = counts[keep_cells], counts[drop_cells]
        w_drop = c_drop / (c_keep + c_drop)  # float64, as the reference
        weight = w_drop.astype(self._rates.dtype)[:, None, :, None]  # (G, 1, P, 1)
        merged_tokens = None
        for name, flat in self._flat.items():
            keep_rows = self._rows(name, keep)
            first = np.take(flat, keep_rows, axis=0)  # (G, H, P, W)
            merged = first + weight * (np.take(flat, self._rows(name, drop), axis=0) - first)
            flat[keep_rows] = merged
            if name == 'tokens':
                merged_tokens = merged[:, 0]
        t_keep = times[keep_cells]
        times[keep_cells] = t_keep + w_drop * (times[drop_cells] - t_keep)
        counts[keep_cells] = c_keep + c_drop
        counts[drop_cells] = 0.0

        # Entry k + 1 leaves the temporal order and the adjacent-pair similarities.
        source = np.minimum(self._entry + (self._entry > k[:, None]), self.slots - 1)
        source_cells = self._base[:, None] + source * positions
        self.order = self.order.reshape(-1)[source_cells]
        self.sims = self.sims.reshape(-1)[source_cells]
        self.length = length - 1
        # Pairs (k - 1, k) and (k, k + 1) of the new order hold the merged slot: both
        # neighbours' similarities in one gather and one cosine.
        assert merged_tokens is not None
        before, after = np.maximum(k - 1, 0), np.minimum(k + 1, self.length - 1)
        neighbours = self._tokens(self._order_at(np.stack([before, after])))  # (2, G, P, C)
        fresh = _cosine(neighbours, merged_tokens)  # (2, G, P)
        sims = self.sims.reshape(-1)
        cells = self._cells(np.stack([before, k]))  # pair (k-1, k) sits at k-1, (k, k+1) at k
        valid = np.stack([k > 0, k + 1 < self.length])
        # Two writes, in this order: with k == 0 both pairs name cell k (the first keeps it).
        for index in (0, 1):
            sims[cells[index]] = np.where(valid[index], fresh[index], sims[cells[index]])
        self._free = drop
        self.compressions += 1

    def nbytes(self) -> int:
        arrays = (*self.data.values(), self.counts, self.times, self.order, self.sims)
        return sum(a.nbytes for a in arrays)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine over the last axis, norms floored at F.normalize's eps (as the reference)."""
    dot = np.einsum('...i,...i->...', a, b)
    norms = np.sqrt(np.einsum('...i,...i->...', a, a) * np.einsum('...i,...i->...', b, b))
    return dot / np.maximum(norms, 1e-24)


class NumpyMemory:
    """One stream's memory for the step graph: the visual bank and the stacked query banks.

    `visual_fields` / `query_fields`: name -> (heads, width per head), 'tokens' and the cached
    keys and values of the attention layers reading each bank (runtime/step_spec.py names
    them); the decays ride in the last channels of the heads of `visual_decay_fields` (name ->
    first such head).
    """

    def __init__(self, capacity: int, *, num_layers: int, num_tokens: int, num_queries: int,
                 visual_fields: Mapping[str, tuple[int, int]],
                 query_fields: Mapping[str, tuple[int, int]],
                 decay_rates: Sequence[float] = (),
                 visual_decay_fields: Mapping[str, int] | None = None) -> None:
        self.visual = NumpyBank(capacity, num_tokens, visual_fields, decay_rates=decay_rates,
                                decay_fields=visual_decay_fields)
        self.query_bank = NumpyBank(capacity, num_queries, query_fields, groups=num_layers)

    @property
    def frames_seen(self) -> int:
        return self.visual.frames_seen

    def reset(self) -> None:
        self.visual.reset()
        self.query_bank.reset()

    def __len__(self) -> int:
        """Slots stored in the visual bank."""
        return len(self.visual)

    def nbytes(self) -> int:
        return self.visual.nbytes() + self.query_bank.nbytes()
