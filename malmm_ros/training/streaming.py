"""Stream a batch of windows through a fresh memory, frame by frame, as the node does.

`WindowModel.forward` is the whole window (so DistributedDataParallel sees one forward per
batch); inside, each frame is one `MalmmModel.step` with the same memory length and
compression as at run time. With autograd on, stored frames' keys and values are recomputed
from the (detached) banks so their weights learn from every slot; with autograd off the
banks' cached projections are used, exactly the node's arithmetic: `predict_windows` (scores,
for validation and malmm-eval's feature mode) and `window_queries` (the caption task) run so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from malmm_ros.model.heads import HeadLogits
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.memory import MemorySpec
from malmm_ros.training.windows import WindowBatch, WindowSource, plan_batches

__all__ = ['WindowModel', 'predict_windows', 'window_queries']


class WindowModel(nn.Module):
    """A MalmmModel run over whole observed windows."""

    def __init__(self, model: MalmmModel, spec: MemorySpec, *,
                 current_frame_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
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
        # Autograd on: keys/values recomputed from the detached banks so their weights learn.
        memory = self.model.new_memory(
            dataclasses.replace(self.spec, cache_projections=not torch.is_grad_enabled()))
        queries = None
        for t, now_s in enumerate(times_s):
            queries = self.model.step(tokens[:, t], float(now_s), memory)
        return queries


@torch.inference_mode()
def predict_windows(model: WindowModel, source: WindowSource, *, batch_size: int = 32,
                    device: torch.device | str = 'cpu', progress: bool = False
                    ) -> dict[str, np.ndarray]:
    """Softmax scores of every window in `source` order: verb [W, V], noun [W, N] and, if the
    model has an action head, action [W, A]."""
    model.eval()
    out: dict[str, np.ndarray] = {}
    for index, batch in _in_order(source, batch_size, 'predict', progress):
        logits = model(batch.tokens.to(device), batch.times_s)
        for head in ('verb', 'noun', 'action'):
            scores = getattr(logits, head)
            if scores is None:
                continue
            if head not in out:
                out[head] = np.zeros((len(source), scores.shape[1]), dtype=np.float32)
            out[head][index] = scores.float().softmax(-1).cpu().numpy()
    return out


def window_queries(runner: WindowModel, source: WindowSource, *, batch_size: int = 32,
                   progress: bool = False) -> torch.Tensor:
    """The last step's query outputs of every window in `source` order, [W, Q, D]."""
    runner.eval()
    config = runner.model.config
    # Allocated outside inference mode: the caption task trains on these rows.
    out = torch.zeros(len(source), config.num_queries, config.hidden_size)
    with torch.inference_mode():
        for index, batch in _in_order(source, batch_size, 'queries', progress):
            out[index] = runner.queries(batch.tokens, batch.times_s).float().cpu()
    return out


def _in_order(source: WindowSource, batch_size: int, desc: str, progress: bool
              ) -> Iterator[tuple[list[int], WindowBatch]]:
    for index in tqdm(plan_batches(source, batch_size, shuffle=False), desc=desc, unit='batch',
                      disable=not progress):
        yield index, source.batch(index)
