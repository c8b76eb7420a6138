"""Tests of the streaming AnticipationPipeline with the real EfficientNet-Lite0 encoder."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch

from malmm_ros.config import AnticipateConfig, LabelsConfig, ModelConfig, load_config
from malmm_ros.errors import FrameError
from malmm_ros.imaging import resize_and_crop
from malmm_ros.labels import LabelMaps
from malmm_ros.model.checkpoint import load_checkpoint, save_checkpoint
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.memory import MemorySpec
from malmm_ros.pipeline import SCHEMA, AnticipationPipeline, Prediction

REPO = Path(__file__).resolve().parents[2]
CONFIG_PATH = REPO / 'config' / 'anticipate.yaml'
EPIC_DIR = Path(os.environ.get('MALMM_EPIC_DIR') or REPO.parent / 'shared' / 'epic100')
NS = 1_000_000_000
T0 = 1_700_000_000 * NS + 123_456_789  # a wall-clock stamp, not zero
STEP_NS = NS // 4  # frames every 0.25 s
ACTION_PAIRS = [(0, 1), (2, 3), (5, 7), (10, 20), (3, 3), (96, 299), (1, 0), (4, 4)]
LOGGER = 'malmm_ros.pipeline.anticipation'


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    return (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea())


def frame(k: int) -> np.ndarray:
    """Frame k of a test stream: a 300x400 window moving over three photos in turn."""
    photo = _photos()[(k // 6) % 3]
    height, width = photo.shape[:2]
    top = (17 * k) % (height - 300 + 1)
    left = (29 * k) % (width - 400 + 1)
    return np.ascontiguousarray(photo[top:top + 300, left:left + 400])


def stamp(k: int) -> int:
    return T0 + k * STEP_NS


def _public(prediction: Prediction) -> dict:
    """The prediction's JSON without the timings (which differ from run to run)."""
    data = prediction.to_dict()
    data.pop('latency_ms')
    return data


@pytest.fixture(scope='module', autouse=True)
def _restore_threads():
    """The pipelines run on one thread (num_threads 1: a shared 2-core machine); restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def pipeline() -> AnticipationPipeline:
    return AnticipationPipeline.from_config(CONFIG_PATH, sample_fps=1.0, publish_every_n=2,
                                            num_threads=1)


@pytest.fixture(scope='module')
def encoder(pipeline: AnticipationPipeline):
    return pipeline.encoder


@pytest.fixture(scope='module')
def base_config() -> AnticipateConfig:
    return load_config(CONFIG_PATH).replace(num_threads=1)


@pytest.fixture(scope='module')
def make(encoder, base_config: AnticipateConfig):
    """Build a pipeline from the YAML with top-level changes, sharing the loaded encoder."""

    def build(**changes) -> AnticipationPipeline:
        return AnticipationPipeline(base_config.replace(**changes), encoder=encoder)

    return build


@pytest.fixture(scope='module')
def stream_run(pipeline: AnticipationPipeline) -> list[tuple[int, Prediction | None]]:
    pipeline.reset()
    out = [(k, pipeline.push(frame(k), stamp(k), f'cam{k}')) for k in range(40)]
    assert pipeline.stats['resets'] == 0
    return out


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint nobody trained, with an action vocabulary and non-zero time biases."""
    torch.manual_seed(5)
    model = MalmmModel(ModelConfig(), LabelMaps.placeholder().with_actions(ACTION_PAIRS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('time_bias.table'):
                param.normal_(0.0, 1.0)
    return save_checkpoint(tmp_path_factory.mktemp('ckpt') / 'edge.safetensors', model)


# -- cadence and schema -----------------------------------------------------------------------


def test_from_config_reads_the_yaml(pipeline: AnticipationPipeline) -> None:
    assert pipeline.config == load_config(CONFIG_PATH).replace(
        sample_fps=1.0, publish_every_n=2, num_threads=1)
    assert torch.get_num_threads() == 1
    assert pipeline.trained is False
    assert pipeline.memory.spec.capacity == 20


def test_predictions_every_eight_frames(stream_run) -> None:
    # 4 frames/s sampled at 1 fps, published every 2nd sampled frame: every 2 s = 8 frames
    published = [k for k, prediction in stream_run if prediction is not None]
    assert published == [4, 12, 20, 28, 36]


def test_prediction_schema(pipeline: AnticipationPipeline, stream_run) -> None:
    labels = pipeline.labels
    for count, (k, prediction) in enumerate(p for p in stream_run if p[1] is not None):
        data = prediction.to_dict()
        assert set(data) == {'schema', 'stamp', 'frame_id', 'frames_seen', 'memory_slots',
                             'verb', 'noun', 'action', 'latency_ms', 'model'}
        assert data['schema'] == SCHEMA == 'malmm_ros/actions/v1'
        assert set(data['stamp']) == {'sec', 'nanosec'}
        assert 0 <= data['stamp']['nanosec'] < NS
        assert data['stamp']['sec'] * NS + data['stamp']['nanosec'] == stamp(k)
        assert data['frame_id'] == f'cam{k}'
        assert data['frames_seen'] == 2 * (count + 1)  # frames 0, 4, 8, ... were sampled
        assert 1 <= data['memory_slots'] <= 20
        assert data['memory_slots'] == data['frames_seen']  # fewer frames than slots so far
        for kind, name_of, size in (('verb', labels.verb_name, 97),
                                    ('noun', labels.noun_name, 300)):
            entries = data[kind]
            assert len(entries) == 5
            for entry in entries:
                assert set(entry) == {'id', 'name', 'score'}
                assert isinstance(entry['id'], int) and 0 <= entry['id'] < size
                assert entry['name'] == name_of(entry['id'])
            assert len({e['id'] for e in entries}) == 5
        assert len(data['action']) == 5
        for entry in data['action']:
            assert set(entry) == {'id', 'verb_id', 'noun_id', 'name', 'score'}
            assert entry['id'] == entry['verb_id'] * 1000 + entry['noun_id']
            assert entry['name'] == (f"{labels.verb_name(entry['verb_id'])} "
                                     f"{labels.noun_name(entry['noun_id'])}")
        # no action head: the best action is the best verb with the best noun
        best = data['action'][0]
        assert (best['verb_id'], best['noun_id']) == (data['verb'][0]['id'],
                                                      data['noun'][0]['id'])
        assert best['score'] == pytest.approx(data['verb'][0]['score']
                                              * data['noun'][0]['score'], rel=1e-5)
        for kind in ('verb', 'noun', 'action'):
            scores = [e['score'] for e in data[kind]]
            assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
            assert scores == sorted(scores, reverse=True)
            assert sum(scores) <= 1.0 + 1e-6
        latency = data['latency_ms']
        assert set(latency) == {'encoder', 'memory', 'heads', 'total'}
        assert all(v >= 0 for v in latency.values())
        parts = latency['encoder'] + latency['memory'] + latency['heads']
        assert latency['total'] == pytest.approx(parts, abs=0.01)
        assert data['model'] == {'name': 'malmm-edge', 'trained': False, 'checkpoint': ''}
        assert json.loads(json.dumps(data)) == data


def test_prediction_stamp_is_newest_sampled_frame(make) -> None:
    pipe = make(sample_fps=1.0, publish_every_n=5)
    assert pipe.push(frame(0), stamp(0), 'a') is None
    assert pipe.push(frame(1), stamp(4), 'b') is None  # sampled
    assert pipe.push(frame(2), stamp(5), 'c') is None  # not sampled
    data = pipe.predict().to_dict()
    assert data['stamp']['sec'] * NS + data['stamp']['nanosec'] == stamp(4)
    assert (data['frame_id'], data['frames_seen']) == ('b', 2)
    assert pipe.stats == {'frames_in': 3, 'frames_sampled': 2, 'resets': 0, 'bad_frames': 0}


def test_untrained_pipeline_warns(encoder, base_config: AnticipateConfig, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        pipe = AnticipationPipeline(base_config, encoder=encoder)
    assert pipe.trained is False
    assert any(r.levelno == logging.WARNING and 'untrained' in r.getMessage()
               for r in caplog.records)
    assert pipe.push(frame(0), stamp(0)).to_dict()['model']['trained'] is False


def test_untrained_heads_are_reproducible(make) -> None:
    first, second = make(sample_fps=0.0), make(sample_fps=0.0)
    assert _public(first.push(frame(3), stamp(0))) == _public(second.push(frame(3), stamp(0)))


def _read_keys(path: Path) -> list[str]:
    with path.open(newline='') as handle:
        return [row['key'] for row in csv.DictReader(handle)]


def test_real_ek100_names(make) -> None:
    verbs, nouns = EPIC_DIR / 'EPIC_100_verb_classes.csv', EPIC_DIR / 'EPIC_100_noun_classes.csv'
    if not (verbs.is_file() and nouns.is_file()):
        pytest.skip(f'EK-100 class CSVs not found in {EPIC_DIR} (set MALMM_EPIC_DIR)')
    pipe = make(labels=LabelsConfig(verb_classes=str(verbs), noun_classes=str(nouns)),
                sample_fps=0.0)
    assert pipe.labels.verb_name(0) == 'take'
    assert pipe.labels.noun_name(0) == 'tap'
    verb_keys, noun_keys = _read_keys(verbs), _read_keys(nouns)
    assert (pipe.labels.num_verbs, pipe.labels.num_nouns) == (len(verb_keys), len(noun_keys))
    data = pipe.push(frame(0), stamp(0)).to_dict()
    assert all(e['name'] == verb_keys[e['id']] for e in data['verb'])
    assert all(e['name'] == noun_keys[e['id']] for e in data['noun'])
    assert all(e['name'] == f"{verb_keys[e['verb_id']]} {noun_keys[e['noun_id']]}"
               for e in data['action'])


# -- stream discontinuities -------------------------------------------------------------------


def test_normal_stream_never_resets(pipeline: AnticipationPipeline, stream_run) -> None:
    assert pipeline.stats['resets'] == 0
    assert pipeline.stats['frames_in'] == 40 and pipeline.stats['frames_sampled'] == 10


def test_backwards_stamp_resets_memory(make) -> None:
    pipe = make(sample_fps=0.0)
    slots = [pipe.push(frame(k), stamp(k)).memory_slots for k in range(5)]
    assert slots == [1, 2, 3, 4, 5]
    back = pipe.push(frame(5), stamp(2))
    assert (back.memory_slots, back.frames_seen) == (1, 1)
    assert pipe.stats['resets'] == 1
    assert pipe.push(frame(6), stamp(3)).memory_slots == 2
    assert pipe.stats['resets'] == 1


def test_memory_fills_to_its_length(make) -> None:
    pipe = make(sample_fps=0.0, memory_bank_length=3, max_gap_s=0.0)
    slots = [pipe.push(frame(k), stamp(40 * k)).memory_slots for k in range(6)]
    assert slots == [1, 2, 3, 3, 3, 3]  # max_gap_s 0: a 10 s gap never resets
    assert pipe.stats['resets'] == 0


@pytest.mark.parametrize(('gap_s', 'resets'), [(10.5, 1), (9.5, 0)])
def test_gap_resets_memory(make, gap_s: float, resets: int) -> None:
    pipe = make(sample_fps=0.0, max_gap_s=10.0)
    for k in range(3):
        pipe.push(frame(k), stamp(k))
    after = pipe.push(frame(3), stamp(2) + int(gap_s * NS))
    assert pipe.stats['resets'] == resets
    assert after.memory_slots == (1 if resets else 4)


def test_reset_then_predict(make) -> None:
    pipe = make(sample_fps=0.0)
    assert pipe.predict() is None
    assert pipe.push(frame(0), stamp(0)) is not None
    assert pipe.predict() is not None
    pipe.reset()
    assert pipe.predict() is None
    assert len(pipe.memory) == 0 and pipe.memory.frames_seen == 0
    again = pipe.push(frame(1), stamp(1))
    assert (again.frames_seen, again.memory_slots) == (1, 1)


# -- bad frames -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'image',
    [
        np.zeros((300, 400, 3), dtype=np.float32),
        np.zeros((300, 400), dtype=np.uint8),
        np.zeros((300, 400, 4), dtype=np.uint8),
        np.zeros((0, 0, 3), dtype=np.uint8),
        np.zeros((300, 0, 3), dtype=np.uint8),
        [[0, 0, 0]],
    ],
    ids=['float', '2-d', '4-channels', '0x0', 'zero-width', 'list'],
)
def test_bad_frame_leaves_memory_untouched(make, image) -> None:
    pipe = make(sample_fps=0.0)
    for k in range(3):
        pipe.push(frame(k), stamp(k))
    before = _public(pipe.predict())
    stats = dict(pipe.stats)
    with pytest.raises(FrameError, match='expected'):
        pipe.push(image, stamp(3))
    with pytest.raises(FrameError, match='expected'):
        pipe.push(image, stamp(0))  # an old stamp on a bad frame must not reset either
    assert pipe.stats == {**stats, 'bad_frames': stats['bad_frames'] + 2}
    assert pipe.memory.frames_seen == 3 and len(pipe.memory) == 3
    assert _public(pipe.predict()) == before
    assert pipe.push(frame(3), stamp(3)).frames_seen == 4


# -- trained checkpoint -----------------------------------------------------------------------


def test_checkpoint_through_the_pipeline(make, checkpoint: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        pipe = make(checkpoint=str(checkpoint), sample_fps=0.0)
    assert not any('untrained' in r.getMessage() for r in caplog.records)
    assert pipe.trained is True
    assert pipe.labels.num_actions == len(ACTION_PAIRS)
    allowed = {v * 1000 + n: (v, n) for v, n in ACTION_PAIRS}
    for k in range(3):
        data = pipe.push(frame(k), stamp(k)).to_dict()
        assert data['model'] == {'name': 'malmm-edge', 'trained': True,
                                 'checkpoint': str(checkpoint)}
        assert len(data['action']) == 5
        for entry in data['action']:
            assert allowed[entry['id']] == (entry['verb_id'], entry['noun_id'])
            assert entry['name'] == (f"verb_{entry['verb_id']:03d} "
                                     f"noun_{entry['noun_id']:03d}")
        scores = [e['score'] for e in data['action']]
        assert scores == sorted(scores, reverse=True) and sum(scores) <= 1.0 + 1e-6


def _assert_same_top(ids_a: list[int], scores_a: list[float], ids_b: list[int],
                     scores_b: list[float], tol: float) -> None:
    """Same top-k ids and scores; ids may only differ where their scores tie within tol."""
    assert scores_a == pytest.approx(scores_b, abs=tol)
    for i, (a, b) in enumerate(zip(ids_a, ids_b, strict=True)):
        if a != b:  # a near-tie ordered differently: the swapped scores must match too
            assert (b in ids_a and a in ids_b) or i == len(ids_a) - 1, (ids_a, ids_b)
            assert abs(scores_a[i] - scores_b[i]) < tol


def _stream(pipe: AnticipationPipeline, frames: int) -> list[tuple[int, Prediction]]:
    out = []
    for k in range(frames):
        prediction = pipe.push(frame(k), stamp(k), str(k))
        if prediction is not None:
            out.append((k, prediction))
    return out


def test_streaming_equals_stepping_by_hand(make, encoder, checkpoint: Path) -> None:
    pipe = make(checkpoint=str(checkpoint), sample_fps=2.0, publish_every_n=1,
                memory_bank_length=3)
    predictions = _stream(pipe, 18)
    assert [k for k, _ in predictions] == list(range(0, 18, 2))  # 4 fps in, 2 fps sampled

    model = load_checkpoint(checkpoint)
    memory = model.new_memory(MemorySpec(3))
    with torch.no_grad():
        for k, prediction in predictions:
            tokens = torch.from_numpy(encoder.run(resize_and_crop(frame(k))[None]))
            queries = model.step(tokens, (stamp(k) - stamp(0)) / NS, memory)
            logits = model.classify(queries)
            for kind, got in (('verb', prediction.verbs), ('noun', prediction.nouns),
                              ('action', prediction.actions)):
                probs = getattr(logits, kind).softmax(-1)[0]
                scores, ids = probs.topk(5)
                if kind == 'action':
                    ids = torch.tensor([model.labels.actions[i].id for i in ids.tolist()])
                assert torch.allclose(torch.tensor([e.score for e in got]), scores, atol=1e-5)
                _assert_same_top([e.id for e in got], [e.score for e in got], ids.tolist(),
                                 scores.tolist(), 1e-5)
    assert len(memory) == 3 and prediction.memory_slots == 3
    assert memory.visual.compressions > 0


def test_recompute_projections_gives_the_same_predictions(make, base_config, checkpoint) -> None:
    runs = []
    for recompute in (False, True):
        model = dataclasses.replace(base_config.model, recompute_projections=recompute)
        pipe = make(checkpoint=str(checkpoint), sample_fps=0.0, memory_bank_length=4,
                    model=model)
        assert pipe.memory.spec.cache_projections is not recompute
        runs.append(_stream(pipe, 10))
        assert len(runs[-1]) == 10 and pipe.memory.visual.compressions == 6
    for (_, cached), (_, recomputed) in zip(*runs, strict=True):
        for a, b in ((cached.verbs, recomputed.verbs), (cached.nouns, recomputed.nouns),
                     (cached.actions, recomputed.actions)):
            _assert_same_top([e.id for e in a], [e.score for e in a], [e.id for e in b],
                             [e.score for e in b], 1e-4)
