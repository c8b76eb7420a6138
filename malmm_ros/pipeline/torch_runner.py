"""runtime: torch — the model, its memory and the heads in PyTorch (the reference)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from malmm_ros.config import AnticipateConfig
from malmm_ros.labels import LabelMaps
from malmm_ros.model.checkpoint import (
    checkpoint_is_trained,
    load_checkpoint,
    read_checkpoint_metadata,
    untrained_model,
)
from malmm_ros.model.memory import MemorySpec

__all__ = ['TorchRunner']


class TorchRunner:
    """Memory + Q-Former + heads of one stream in PyTorch, from a checkpoint file (a bundle's
    included) or the config's untrained model."""

    def __init__(self, config: AnticipateConfig, checkpoint: str) -> None:
        torch.set_num_threads(config.threads())
        self.device = torch.device(config.device)
        if checkpoint:
            self.model = load_checkpoint(checkpoint, config.model, device=self.device)
            self.trained = checkpoint_is_trained(checkpoint)
            self.protocol_metadata: dict[str, Any] | None = read_checkpoint_metadata(checkpoint)
        else:
            self.model = untrained_model(config).to(self.device)
            self.trained = False
            self.protocol_metadata = None
        self.labels: LabelMaps = self.model.labels
        self.memory = self.model.new_memory(MemorySpec(
            config.memory_bank_length, cache_projections=not config.model.recompute_projections))
        self.queries: torch.Tensor | None = None  # last step's query outputs (1, Q, D)
        self._dtype = next(self.model.parameters()).dtype

    def set_threads(self, threads: int) -> None:
        torch.set_num_threads(threads)

    def reset(self) -> None:
        self.memory.reset()
        self.queries = None

    def step(self, tokens: np.ndarray, now_s: float) -> None:
        """Encoder tokens [1, N, F] of the frame at now_s into the memory."""
        with torch.inference_mode():
            frame = torch.from_numpy(tokens).to(self.device, self._dtype)
            self.queries = self.model.step(frame, now_s, self.memory)

    def probabilities(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Softmax of each head for the newest step: verb [V], noun [N], action [A] or None."""
        assert self.queries is not None
        with torch.inference_mode():
            logits = self.model.classify(self.queries)
            out = [None if x is None else x.float().softmax(-1)[0].cpu().numpy()
                   for x in (logits.verb, logits.noun, logits.action)]
        return out[0], out[1], out[2]
