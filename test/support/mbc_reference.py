"""The functional MBC step, the memory's reference in the tests.

A pure function over whole banks, written the way the MA-LMM paper and its public code state the
rule: for every (batch, token position) merge the most cosine-similar adjacent pair of slots into
their count-weighted mean; counts add. MemoryBank (malmm_ros/model/memory.py) does the same in
place and incrementally; the tests hold it to this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ['memory_bank_compress', 'merge_adjacent_slots', 'most_similar_adjacent_pair']


def most_similar_adjacent_pair(bank: torch.Tensor) -> torch.Tensor:
    """Index k of the most cosine-similar adjacent slot pair (k, k+1), per batch and position.

    bank: [B, T, N, C] with T >= 2. Returns [B, N] int64. Ties go to the earliest pair.
    """
    unit = F.normalize(bank, dim=-1, eps=1e-12)
    similarity = (unit[:, :-1] * unit[:, 1:]).sum(dim=-1)  # (B, T-1, N)
    return similarity.argmax(dim=1)


def merge_adjacent_slots(
    values: torch.Tensor, counts: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """Merge slots k and k+1 of `values` into their count-weighted mean, per (batch, position).

    values: [B, T, N, *]; counts: [B, T, N] (frames already merged into each slot); k: [B, N].
    Returns [B, T-1, N, *]: slots before k unchanged, the merged slot at k, later slots shifted.
    """
    batch, slots, positions = counts.shape
    tail = values.shape[3:]
    slot = torch.arange(slots - 1, device=values.device).view(1, -1, 1)  # (1, T-1, 1)
    k_b = k.unsqueeze(1)  # (B, 1, N)
    source = slot + (slot > k_b).long()  # (B, T-1, N): which old slot lands in each new slot
    expand = source.view(batch, slots - 1, positions, *([1] * len(tail))).expand(
        batch, slots - 1, positions, *tail
    )
    shifted = values.gather(1, expand)

    index = k_b.view(batch, 1, positions, *([1] * len(tail))).expand(batch, 1, positions, *tail)
    first = values.gather(1, index)  # (B, 1, N, *)
    second = values.gather(1, index + 1)
    c_first = counts.gather(1, k_b).to(values.dtype)  # (B, 1, N)
    c_second = counts.gather(1, k_b + 1).to(values.dtype)
    total = c_first + c_second
    w_second = (c_second / total).view(batch, 1, positions, *([1] * len(tail)))
    merged = first + w_second * (second - first)  # exact when the slots are equal
    at_k = (slot == k_b).view(batch, slots - 1, positions, *([1] * len(tail)))
    return torch.where(at_k, merged, shifted)


def _merge_counts(counts: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Counts after merging slots k and k+1: the two counts add, later slots shift left."""
    slots = counts.shape[1]
    slot = torch.arange(slots - 1, device=counts.device).view(1, -1, 1)
    k_b = k.unsqueeze(1)
    shifted = counts.gather(1, slot.expand(counts.shape[0], -1, counts.shape[2]) + (slot > k_b))
    summed = counts.gather(1, k_b) + counts.gather(1, k_b + 1)
    return torch.where(slot == k_b, summed, shifted)


def memory_bank_compress(
    bank: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MBC step: bank [B, T, N, C], counts [B, T, N] -> [B, T-1, N, C], [B, T-1, N].

    For every (b, n) the most similar adjacent pair is merged into its count-weighted mean
    (the public MA-LMM code's rule); counts add, so each position's counts still sum to the
    number of frames seen.
    """
    if bank.dim() != 4 or counts.shape != bank.shape[:3]:
        raise ValueError(
            f'bank must be [B,T,N,C] and counts [B,T,N]; got {tuple(bank.shape)} and '
            f'{tuple(counts.shape)}'
        )
    if bank.shape[1] < 2:
        raise ValueError(f'cannot compress a bank of {bank.shape[1]} slot(s)')
    k = most_similar_adjacent_pair(bank)
    return merge_adjacent_slots(bank, counts, k), _merge_counts(counts, k)
