"""The top-5 overlay drawn for rqt / Foxglove (malmm_ros.ros.overlay)."""

from __future__ import annotations

import numpy as np
import pytest

from malmm_ros.pipeline import ActionScore, ClassScore, Prediction
from malmm_ros.ros.overlay import draw_overlay

GRAY = 100  # mid-gray input: the darkened band and white text are both easy to tell apart


def _prediction(trained: bool = True, actions: int = 5) -> Prediction:
    verbs = tuple(ClassScore(i, f'verb{i}', 0.5 / (i + 1)) for i in range(5))
    nouns = tuple(ClassScore(i, f'noun{i}', 0.4 / (i + 1)) for i in range(5))
    top = tuple(ActionScore(v * 1000 + v + 1, v, v + 1, f'take plate {v}', 0.3 / (v + 1))
                for v in range(actions))
    return Prediction(stamp_ns=1_500_000_000, frame_id='camera', frames_seen=12,
                      memory_slots=12, verbs=verbs, nouns=nouns, actions=top,
                      model_name='test', trained=trained)


def _image(height: int, width: int, value: int | None = GRAY, seed: int = 0) -> np.ndarray:
    if value is not None:
        return np.full((height, width, 3), value, dtype=np.uint8)
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _band_height(before: np.ndarray, after: np.ndarray) -> int:
    """Rows from the top that were changed; asserts the changed rows are one top block."""
    changed = (before != after).any(axis=(1, 2))
    height = int(changed.argmin()) if not changed.all() else len(changed)
    assert not changed[height:].any(), 'pixels below the band were changed'
    return height


def _text_lines(band: np.ndarray) -> int:
    """Separate runs of rows that hold bright (text) pixels."""
    bright = (band.max(axis=2) > 200).any(axis=1).astype(np.int8)
    return int(np.count_nonzero(np.diff(np.concatenate([[0], bright])) == 1))


PREDICTIONS = {
    'none': None,
    'trained': _prediction(True),
    'untrained': _prediction(False),
}


@pytest.mark.parametrize('which', sorted(PREDICTIONS))
@pytest.mark.parametrize(('height', 'width'), [(480, 640), (240, 320), (720, 1280)])
def test_returns_new_array_of_same_shape_and_keeps_input(which: str, height: int,
                                                         width: int) -> None:
    rgb = _image(height, width, None, seed=height)
    before = rgb.copy()
    out = draw_overlay(rgb, PREDICTIONS[which])
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert not np.shares_memory(out, rgb)
    np.testing.assert_array_equal(rgb, before)
    assert out.flags.writeable


@pytest.mark.parametrize('which', sorted(PREDICTIONS))
def test_band_at_top_is_darker_and_the_rest_unchanged(which: str) -> None:
    rgb = _image(480, 640, None, seed=1)
    out = draw_overlay(rgb, PREDICTIONS[which])
    band = _band_height(rgb, out)
    assert 0 < band < 480 // 2
    np.testing.assert_array_equal(out[band:], rgb[band:])
    top_in, top_out = rgb[:band].astype(np.float64), out[:band].astype(np.float64)
    assert top_out.mean() < 0.6 * top_in.mean()
    # Apart from text, the band keeps a third or so of each pixel's brightness.
    lit = top_in > 20
    ratio = np.median(top_out[lit] / top_in[lit])
    assert 0.25 < ratio < 0.45, ratio


def test_background_of_the_band_is_uniformly_dimmed() -> None:
    rgb = _image(480, 640, GRAY)
    out = draw_overlay(rgb, _prediction())
    band = out[:_band_height(rgb, out)]
    values, counts = np.unique(band, return_counts=True)
    background = int(values[counts.argmax()])
    assert background < GRAY * 0.5  # most of the band is the dimmed gray
    assert (band >= background).all()  # text only adds light


@pytest.mark.parametrize('which', ['trained', 'untrained', 'none'])
def test_text_is_drawn_in_the_band(which: str) -> None:
    rgb = _image(480, 640, GRAY)
    out = draw_overlay(rgb, PREDICTIONS[which])
    band = out[:_band_height(rgb, out)]
    bright = band.max(axis=2) > 200
    assert bright.sum() > 200, 'no text in the band'
    assert (out[band.shape[0]:] == GRAY).all()


@pytest.mark.parametrize(('which', 'lines'), [('none', 1), ('trained', 5), ('untrained', 6)])
def test_one_text_line_per_action_plus_untrained_warning(which: str, lines: int) -> None:
    rgb = _image(480, 640, GRAY)
    out = draw_overlay(rgb, PREDICTIONS[which])
    assert _text_lines(out[:_band_height(rgb, out)]) == lines


@pytest.mark.parametrize('actions', [1, 3])
def test_fewer_actions_give_fewer_lines_and_a_shorter_band(actions: int) -> None:
    rgb = _image(480, 640, GRAY)
    full = draw_overlay(rgb, _prediction(actions=5))
    short = draw_overlay(rgb, _prediction(actions=actions))
    assert _text_lines(short[:_band_height(rgb, short)]) == actions
    assert _band_height(rgb, short) < _band_height(rgb, full)


@pytest.mark.parametrize(('height', 'width'), [(480, 640), (100, 60), (2160, 3840)])
def test_untrained_band_is_taller_than_trained(height: int, width: int) -> None:
    rgb = _image(height, width, GRAY)
    trained = _band_height(rgb, draw_overlay(rgb, _prediction(True)))
    untrained = _band_height(rgb, draw_overlay(rgb, _prediction(False)))
    assert trained < untrained < height


def test_untrained_text_differs_from_trained() -> None:
    rgb = _image(480, 640, GRAY)
    trained = draw_overlay(rgb, _prediction(True))
    untrained = draw_overlay(rgb, _prediction(False))
    assert not np.array_equal(trained, untrained)


def test_text_scales_with_the_image() -> None:
    small = _image(480, 640, GRAY)
    large = _image(1440, 1920, GRAY)
    band_small = _band_height(small, draw_overlay(small, _prediction()))
    band_large = _band_height(large, draw_overlay(large, _prediction()))
    assert 2.0 < band_large / band_small < 4.0


@pytest.mark.parametrize('which', sorted(PREDICTIONS))
@pytest.mark.parametrize(('height', 'width'), [(8, 8), (1, 1), (8, 200), (200, 8)])
def test_tiny_images_do_not_fail(which: str, height: int, width: int) -> None:
    rgb = _image(height, width, 200)
    out = draw_overlay(rgb, PREDICTIONS[which])
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert (rgb == 200).all()
    assert out[0].min() < 200  # the top row is part of the darkened band


@pytest.mark.parametrize('which', sorted(PREDICTIONS))
def test_large_image(which: str) -> None:
    rgb = _image(2160, 3840, GRAY)
    out = draw_overlay(rgb, PREDICTIONS[which])
    band = _band_height(rgb, out)
    assert 0 < band < 2160 // 2
    assert (out[band:] == GRAY).all()
    assert (out[:band].max(axis=2) > 200).sum() > 1000


def test_non_contiguous_input() -> None:
    rgb = _image(480, 1280, None, seed=4)[:, ::2]
    before = rgb.copy()
    out = draw_overlay(rgb, _prediction())
    np.testing.assert_array_equal(rgb, before)
    band = _band_height(rgb, out)
    np.testing.assert_array_equal(out[band:], rgb[band:])
