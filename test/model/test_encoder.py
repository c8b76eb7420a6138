"""Tests of the EfficientNet-Lite0 encoder: real weights, padding, preprocessing and errors."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from malmm_ros.errors import CheckpointError, FrameError
from malmm_ros.imaging import IMAGE_SIZE, resize_and_crop
from malmm_ros.model.encoder import (
    FEATURE_DIM,
    MEAN_RGB,
    NUM_TOKENS,
    STD_RGB,
    Conv2dSame,
    EfficientNetLite0,
    efficientnet_lite0,
    normalize,
    preprocess,
)

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


@pytest.fixture(scope='module')
def model() -> EfficientNetLite0:
    return efficientnet_lite0()


@pytest.fixture(scope='module')
def chelsea() -> torch.Tensor:
    return preprocess(skimage.data.chelsea())


def _logits(model: EfficientNetLite0, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[0]


# ---- real weights ---------------------------------------------------------------------------


def test_pretrained_model_is_in_eval_mode(model: EfficientNetLite0) -> None:
    assert not model.training
    assert all(not m.training for m in model.modules())


def test_chelsea_is_a_cat(model: EfficientNetLite0, chelsea: torch.Tensor) -> None:
    top1 = int(_logits(model, chelsea).argmax())
    assert top1 in CAT_CLASSES


def test_coffee_top5_has_a_cup(model: EfficientNetLite0) -> None:
    top5 = set(_logits(model, preprocess(skimage.data.coffee())).topk(5).indices.tolist())
    assert top5 & COFFEE_CLASSES


def test_feature_and_token_shapes(model: EfficientNetLite0, chelsea: torch.Tensor) -> None:
    with torch.no_grad():
        features = model.forward_features(chelsea)
        tokens = model.tokens(chelsea)
    assert features.shape == (1, FEATURE_DIM, 7, 7)
    assert tokens.shape == (1, NUM_TOKENS, FEATURE_DIM)
    assert NUM_TOKENS == 49
    torch.testing.assert_close(tokens, features.flatten(2).transpose(1, 2), rtol=0, atol=0)
    # Row-major: token 8 is grid cell (row 1, column 1).
    torch.testing.assert_close(tokens[0, 8], features[0, :, 1, 1], rtol=0, atol=0)


def test_float64_matches_float32(model: EfficientNetLite0, chelsea: torch.Tensor) -> None:
    model64 = copy.deepcopy(model).double()
    logits32 = _logits(model, chelsea).double()
    logits64 = _logits(model64, chelsea.double())
    assert logits64.dtype == torch.float64
    scale = float(logits64.abs().max())
    torch.testing.assert_close(logits32, logits64, rtol=1e-4, atol=1e-4 * scale)


# ---- TF SAME padding ------------------------------------------------------------------------


@pytest.mark.parametrize('size', [(7, 7), (8, 8), (9, 12), (224, 224)])
@pytest.mark.parametrize(('kernel', 'dilation'), [(1, 1), (3, 1), (5, 1), (3, 2)])
def test_same_padding_stride1_matches_torch_same(
    size: tuple[int, int], kernel: int, dilation: int
) -> None:
    torch.manual_seed(0)
    conv = Conv2dSame(4, 6, kernel, stride=1, dilation=dilation, bias=True)
    x = torch.randn(2, 4, *size)
    expected = F.conv2d(x, conv.weight, conv.bias, padding='same', dilation=dilation)
    torch.testing.assert_close(conv(x), expected)


def _window_counts(size: int, kernel: int, stride: int, pad_before: int) -> list[int]:
    """Number of real (unpadded) pixels under each TF SAME window, worked out by hand."""
    out = -(-size // stride)
    counts = []
    for i in range(out):
        start = i * stride - pad_before
        counts.append(sum(1 for p in range(start, start + kernel) if 0 <= p < size))
    return counts


@pytest.mark.parametrize(
    ('size', 'kernel', 'pad_before', 'counts'),
    [
        # size 7, k3, s2: out 4, total pad 2 -> (1, 1): windows [-1..1] [1..3] [3..5] [5..7].
        (7, 3, 1, [2, 3, 3, 2]),
        # size 8, k3, s2: out 4, total pad 1 -> (0, 1): the odd pad goes at the end.
        (8, 3, 0, [3, 3, 3, 2]),
        # size 8, k5, s2: out 4, total pad 3 -> (1, 2).
        (8, 5, 1, [4, 5, 5, 3]),
        # size 9, k5, s2: out 5, total pad 4 -> (2, 2): windows [-2..2] [0..4] ... [6..10].
        (9, 5, 2, [3, 5, 5, 5, 3]),
    ],
)
def test_same_padding_stride2_hand_worked(
    size: int, kernel: int, pad_before: int, counts: list[int]
) -> None:
    assert _window_counts(size, kernel, 2, pad_before) == counts  # the table is self-consistent
    conv = Conv2dSame(1, 1, kernel, stride=2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        # All-ones input and kernel: each output counts the real pixels under its window.
        out = conv(torch.ones(1, 1, size, size))
    expected = torch.tensor(counts, dtype=torch.float32)
    assert out.shape == (1, 1, len(counts), len(counts))
    torch.testing.assert_close(out[0, 0], torch.outer(expected, expected))


def test_stem_halves_224() -> None:
    conv = Conv2dSame(3, 8, 3, stride=2)
    assert conv(torch.zeros(1, 3, 224, 224)).shape == (1, 8, 112, 112)
    assert conv(torch.zeros(1, 3, 225, 223)).shape == (1, 8, 113, 112)


# ---- preprocessing --------------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(480, 640), (100, 37), (3000, 20), (224, 224), (1, 1)])
def test_preprocess_shape_and_dtype(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    cropped = resize_and_crop(image)
    assert cropped.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert cropped.dtype == np.uint8
    x = preprocess(image)
    assert x.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, normalize(cropped[None]), rtol=0, atol=0)


def test_preprocess_accepts_non_contiguous_views() -> None:
    image = skimage.data.chelsea()
    bgr_view = image[:, :, ::-1]  # negative stride, as a cv2 BGR->RGB slice produces
    x = preprocess(bgr_view)
    torch.testing.assert_close(x, preprocess(np.ascontiguousarray(bgr_view)), rtol=0, atol=0)


def test_centre_crop_keeps_the_centre() -> None:
    # 256x512: the crop is the central 224x224 square of a 224/256 window, no resize needed
    # after the shorter side is 256 -> window 224 at rows 16..239, columns 144..367.
    image = np.zeros((256, 512, 3), dtype=np.uint8)
    image[16:240, 144:368] = 200
    cropped = resize_and_crop(image)
    assert (cropped == 200).all()


def test_normalize_values_and_backends() -> None:
    batch = np.stack([np.full((4, 5, 3), v, dtype=np.uint8) for v in (0, 127, 255)])
    out = normalize(batch)
    assert out.shape == (3, 3, 4, 5)
    for i, value in enumerate((0, 127, 255)):
        for c in range(3):
            expected = (value - MEAN_RGB[c]) / STD_RGB[c]
            assert torch.allclose(out[i, c], torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(normalize(torch.from_numpy(batch)), out, rtol=0, atol=0)


@pytest.mark.parametrize(
    ('image', 'pattern'),
    [
        (np.zeros((32, 32, 3), dtype=np.float32), r'uint8.*dtype float32'),
        (np.zeros((32, 32), dtype=np.uint8), r'HxWx3.*shape \(32, 32\)'),
        (np.zeros((32, 32, 4), dtype=np.uint8), r'HxWx3.*shape \(32, 32, 4\)'),
        (np.zeros((0, 0, 3), dtype=np.uint8), r'non-empty.*shape \(0, 0, 3\)'),
        ([[0, 0, 0]], r'type list'),
    ],
)
def test_preprocess_rejects_bad_frames(image: object, pattern: str) -> None:
    with pytest.raises(FrameError, match=pattern):
        preprocess(image)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ('batch', 'pattern'),
    [
        (np.zeros((1, 8, 8, 3), dtype=np.float64), r'uint8.*dtype float64'),
        (np.zeros((8, 8, 3), dtype=np.uint8), r'\[B, H, W, 3\].*shape \(8, 8, 3\)'),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), r'shape \(1, 3, 8, 8\)'),
    ],
)
def test_normalize_rejects_bad_batches(batch: object, pattern: str) -> None:
    with pytest.raises(FrameError, match=pattern):
        normalize(batch)  # type: ignore[arg-type]


# ---- weight loading errors ------------------------------------------------------------------


def test_random_init_needs_no_file() -> None:
    net = efficientnet_lite0(pretrained=False, weights_path='/nonexistent/never/read.pth')
    assert not net.training


def test_missing_weights_file(tmp_path) -> None:
    path = tmp_path / 'absent.pth'
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        efficientnet_lite0(weights_path=path)


def test_safetensors_file_is_rejected(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / 'weights.safetensors'
    save_file({'_conv_stem.weight': torch.zeros(32, 3, 3, 3)}, str(path))
    # Recent torch.load reads safetensors itself, so either the read or the key check fails.
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        efficientnet_lite0(weights_path=path)


def test_garbage_file_is_rejected(tmp_path) -> None:
    path = tmp_path / 'garbage.pth'
    path.write_bytes(b'not a checkpoint at all')
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        efficientnet_lite0(weights_path=str(path))


def test_wrong_keys_are_rejected(tmp_path) -> None:
    path = tmp_path / 'wrong_keys.pth'
    torch.save({'backbone.conv.weight': torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r'missing keys.*unexpected keys: backbone'):
        efficientnet_lite0(weights_path=path)


def test_wrong_shapes_are_rejected(tmp_path) -> None:
    state = efficientnet_lite0(pretrained=False).state_dict()
    state['_fc.weight'] = torch.zeros(10, FEATURE_DIM)
    path = tmp_path / 'wrong_shape.pth'
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r'wrong shapes: _fc\.weight \(10, 1280\)'):
        efficientnet_lite0(weights_path=path)


def test_non_state_dict_is_rejected(tmp_path) -> None:
    path = tmp_path / 'list.pth'
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match='state dict of tensors'):
        efficientnet_lite0(weights_path=path)


def test_round_trip_of_own_state_dict(tmp_path) -> None:
    net = efficientnet_lite0(pretrained=False)
    path = tmp_path / 'own.pth'
    torch.save(net.state_dict(), path)
    loaded = efficientnet_lite0(weights_path=path)
    torch.testing.assert_close(loaded._fc.weight, net._fc.weight, rtol=0, atol=0)
