"""Stream a batch of windows through a fresh memory, frame by frame, as the node does.

`WindowModel.forward` is the whole window (so DistributedDataParallel sees one forward per
batch); inside, each frame is one `MalmmModel.step` with the same memory length and
compression as at run time. With autograd on, stored frames' keys and values are recomputed
from the (detached) banks so their weights learn from every slot; with autograd off the
banks' cached projections are used, exactly the node's arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from malmm_ros.model.heads import HeadLogits
from malmm_ros.model.malmm import MalmmModel

__all__ = ['WindowModel']


class WindowModel(nn.Module):
    """A MalmmModel run over whole observed windows."""

    def __init__(self, model: MalmmModel, capacity: int, *, policy: str = 'mbc',
                 query_memory: bool = True, current_frame_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.capacity = capacity
        self.policy = policy
        self.query_memory = query_memory
        self.current_frame_only = current_frame_only

    def forward(self, tokens: torch.Tensor, times_s: Sequence[float]) -> HeadLogits:
        """tokens [B, K, P, F] of K frames at times_s (ascending) -> logits after the last."""
        return self.model.classify(self.queries(tokens, times_s))

    def queries(self, tokens: torch.Tensor, times_s: Sequence[float]) -> torch.Tensor:
        """The last frame's query outputs [B, Q, D] (what the heads and the text projector
        read)."""
        if tokens.dim() != 4 or tokens.shape[1] != len(times_s) or not len(times_s):
            raise ValueError(f'tokens {tuple(tokens.shape)} do not match {len(times_s)} times')
        if self.current_frame_only:
            tokens, times_s = tokens[:, -1:], times_s[-1:]
        memory = self.model.new_memory(self.capacity,
                                       cache_projections=not torch.is_grad_enabled(),
                                       policy=self.policy, query_memory=self.query_memory)
        queries = None
        for t, now_s in enumerate(times_s):
            queries = self.model.step(tokens[:, t], float(now_s), memory)
        return queries
