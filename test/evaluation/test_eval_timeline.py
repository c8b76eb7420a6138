"""Direct mode's timeline on real bags with the real encoder: it equals the pipeline fed every
decoded frame (its own sampler), decodes only what it samples, and refuses bags that are not
one video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rosbags.rosbag2 import Writer
from rosbags.typesys import Stores, get_typestore

from malmm_ros.config import AnticipateConfig, model_preset
from malmm_ros.data.bags import read_camera_frames
from malmm_ros.errors import DataError
from malmm_ros.evaluation import bag_timeline
from malmm_ros.pipeline import AnticipationPipeline
from support.tiny_epic import TinyEpic, make_tiny_epic

SECONDS = 6.0
SMALL = model_preset('edge', num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128,
                     num_queries=8, encoder_width=64)
CONFIG = AnticipateConfig(sample_fps=2.0, memory_bank_length=3, num_threads=1, model=SMALL)
TYPES = get_typestore(Stores.ROS2_KILTED)


pytestmark = pytest.mark.usefixtures('single_thread')  # test/conftest.py


@pytest.fixture(scope='module')
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyEpic:
    return make_tiny_epic(tmp_path_factory.mktemp('epic'), videos=('P01_01',),
                          seconds=SECONDS, fps=15.0, frames=False, mp4=False)


def reference(bag: Path, config: AnticipateConfig) -> list:
    """The pipeline with its own sampler, fed every decoded frame of the bag."""
    pipeline = AnticipationPipeline(config)
    out = []
    for frame in read_camera_frames(bag):
        prediction = pipeline.push(frame.image, frame.stamp_ns, frame.frame_id)
        if prediction is not None:
            out.append(prediction)
    return out


def test_timeline_equals_the_pipeline_fed_every_frame(tiny: TinyEpic) -> None:
    bag = tiny.bags['P01_01']
    expected = reference(bag, CONFIG)
    timeline = bag_timeline(bag, CONFIG)
    assert timeline.stamps_ns.tolist() == [p.stamp_ns for p in expected]
    assert len(timeline) == SECONDS * CONFIG.sample_fps
    start = tiny.video_start_ns['P01_01']
    np.testing.assert_allclose(timeline.times_s, (timeline.stamps_ns - start) / 1e9)
    assert timeline.stats['frames'] == SECONDS * 15 and timeline.stats['sampled'] == 12
    for i, prediction in enumerate(expected):
        verbs = np.argsort(-timeline.rows.verb[i], kind='stable')[:5]
        assert verbs.tolist() == [v.id for v in prediction.verbs]
        np.testing.assert_allclose(timeline.rows.verb[i, verbs],
                                   [v.score for v in prediction.verbs], rtol=1e-5)
        # No action head (untrained, placeholder labels): the top pairs of p(verb) x p(noun).
        best = np.argsort(-timeline.rows.action[i], kind='stable')[:5]
        pairs = [tuple(timeline.rows.action_pairs[j]) for j in best]
        assert pairs == [(a.verb_id, a.noun_id) for a in prediction.actions]
        assert np.count_nonzero(timeline.rows.action[i]) == 100


def test_scores_are_the_full_distribution_behind_predict(tiny: TinyEpic) -> None:
    pipeline = AnticipationPipeline(CONFIG.replace(sample_fps=0.0))
    assert pipeline.scores() is None
    frame = tiny.frame('P01_01', 0)
    prediction = pipeline.push(frame, tiny.video_start_ns['P01_01'])
    scores = pipeline.scores()
    assert scores is not None and scores.action is None
    assert scores.verb.shape == (97,) and scores.noun.shape == (300,)
    assert scores.verb.sum() == pytest.approx(1.0, abs=1e-5)
    top = np.argsort(-scores.noun, kind='stable')[:5]
    assert top.tolist() == [n.id for n in prediction.nouns]


def test_publish_every_n_and_video_start(tiny: TinyEpic) -> None:
    bag = tiny.bags['P01_01']
    every = bag_timeline(bag, CONFIG)
    second = bag_timeline(bag, CONFIG.replace(publish_every_n=2))
    assert second.stamps_ns.tolist() == every.stamps_ns[1::2].tolist()
    start = tiny.video_start_ns['P01_01'] - 5_000_000_000  # the video began 5 s earlier
    shifted = bag_timeline(bag, CONFIG, video_start_ns=start)
    np.testing.assert_allclose(shifted.times_s, every.times_s + 5.0)
    np.testing.assert_array_equal(shifted.rows.verb, every.rows.verb)  # deterministic


def test_compressed_mcap_bags(tmp_path: Path) -> None:
    tiny = make_tiny_epic(tmp_path, videos=('P03_01',), seconds=3.0, fps=10.0, frames=False,
                          mp4=False, bag_compressed=True, bag_storage='mcap')
    timeline = bag_timeline(tiny.bags['P03_01'], CONFIG)
    assert len(timeline) == 6 and timeline.stats['bad_frames'] == 0


def write_bag(path: Path, messages: list[tuple[str, str, int, object]]) -> Path:
    """(topic, msgtype, log time, message) written as they come."""
    writer = Writer(path, version=Writer.VERSION_LATEST)
    writer.open()
    connections = {}
    for topic, msgtype, log_time, message in messages:
        if topic not in connections:
            connections[topic] = writer.add_connection(topic, msgtype, typestore=TYPES)
        writer.write(connections[topic], log_time, TYPES.serialize_cdr(message, msgtype))
    writer.close()
    return path


def image(stamp_ns: int) -> object:
    sec, nanosec = divmod(stamp_ns, 1_000_000_000)
    header = TYPES.types['std_msgs/msg/Header'](
        stamp=TYPES.types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec),
        frame_id='camera')
    pixels = np.full((32, 32, 3), 90, np.uint8)
    return TYPES.types['sensor_msgs/msg/Image'](header=header, height=32, width=32,
                                                encoding='rgb8', is_bigendian=0, step=96,
                                                data=pixels.reshape(-1))


def test_bags_that_are_not_one_video_are_refused(tmp_path: Path) -> None:
    text = TYPES.types['std_msgs/msg/String'](data='hello')
    no_images = write_bag(tmp_path / 'strings', [('/chatter', 'std_msgs/msg/String', 1, text)])
    with pytest.raises(DataError, match=r"holds no sensor_msgs/Image or CompressedImage topic "
                                        r"\(it has \['/chatter'\]\)"):
        bag_timeline(no_images, CONFIG)
    # Header stamps going back (a looped recording) while log times go on.
    looped = write_bag(tmp_path / 'looped', [
        ('/cam', 'sensor_msgs/msg/Image', 1_000 + i, image(stamp))
        for i, stamp in enumerate([5_000_000_000, 6_000_000_000, 5_500_000_000])])
    with pytest.raises(DataError, match='goes back by 0.500 s; evaluation needs one pass'):
        bag_timeline(looped, CONFIG)
    with pytest.raises(DataError, match='does not exist'):
        bag_timeline(tmp_path / 'nothing', CONFIG)


def compressed(stamp_ns: int, data: bytes) -> object:
    sec, nanosec = divmod(stamp_ns, 1_000_000_000)
    header = TYPES.types['std_msgs/msg/Header'](
        stamp=TYPES.types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec),
        frame_id='camera')
    return TYPES.types['sensor_msgs/msg/CompressedImage'](
        header=header, format='jpeg', data=np.frombuffer(data, np.uint8))


def test_only_sampled_frames_are_decoded(tmp_path: Path) -> None:
    """A corrupt frame the sampler skips costs nothing; a sampled one is a bad frame."""
    import simplejpeg

    good = simplejpeg.encode_jpeg(np.full((48, 64, 3), 120, np.uint8), colorspace='RGB')
    stamps = [10_000_000_000 + i * 100_000_000 for i in range(10)]  # 10 fps for 1 s
    corrupt = {stamps[2], stamps[5]}  # at 2 fps the sampler takes frames 0 and 5
    bag = write_bag(tmp_path / 'corrupt', [
        ('/cam/compressed', 'sensor_msgs/msg/CompressedImage', stamp,
         compressed(stamp, b'not a jpeg' if stamp in corrupt else good)) for stamp in stamps])
    timeline = bag_timeline(bag, CONFIG)
    assert timeline.stats['sampled'] == 2
    assert timeline.stats['bad_frames'] == 1
    assert timeline.stamps_ns.tolist() == [stamps[0]]
