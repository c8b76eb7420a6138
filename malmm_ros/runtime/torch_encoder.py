"""The PyTorch encoder backend: EfficientNet-Lite0 eager, on CPU (fp32) or CUDA (fp16)."""

from __future__ import annotations

import numpy as np
import torch

from malmm_ros.errors import ConfigError
from malmm_ros.model.encoder import efficientnet_lite0, normalize

__all__ = ['TorchEncoder']


class TorchEncoder:
    """Runs uint8 RGB frames [B, 224, 224, 3] through EfficientNet-Lite0 -> [B, 49, 1280]."""

    def __init__(self, device: str = 'cpu', *, threads: int = 0) -> None:
        if device == 'cuda' and not torch.cuda.is_available():
            raise ConfigError('device "cuda" requested but torch sees no CUDA GPU')
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        # fp16 on a GPU halves memory traffic; the CPU keeps fp32 (fp16 is slow there).
        self.dtype = torch.float16 if self.device.type == 'cuda' else torch.float32
        self.model = efficientnet_lite0(pretrained=True).to(self.device, self.dtype)
        self.name = f'torch-{self.device.type}-{str(self.dtype).removeprefix("torch.")}'

    def run(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [B, 224, 224, 3] RGB -> float32 tokens [B, 49, 1280]."""
        with torch.inference_mode():
            batch = normalize(torch.from_numpy(np.ascontiguousarray(frames)).to(self.device))
            tokens = self.model.tokens(batch.to(self.dtype))
        return tokens.float().cpu().numpy()
