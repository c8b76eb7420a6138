"""The tiny EK-format fixture itself: its files are what the real dataset's readers expect."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import simplejpeg

from malmm_ros.data.bags import read_camera_frames
from malmm_ros.data.epic import load_video_info
from malmm_ros.data.extraction import find_frame_folders, find_video_files
from malmm_ros.labels import load_ek100_labels
from support.tiny_epic import (
    ANNOTATION_COLUMNS,
    EARLY_START_S,
    NOUN_CLASSES,
    SCENE_ACTIONS,
    VERB_CLASSES,
    TinyEpic,
    make_tiny_epic,
)

REAL_ANNOTATIONS = Path(__file__).resolve().parents[3] / 'shared' / 'epic100'


@pytest.fixture(scope='module')
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyEpic:
    return make_tiny_epic(tmp_path_factory.mktemp('epic'))  # the defaults others rely on


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline='', encoding='utf-8') as handle:
        return list(csv.DictReader(handle))


def test_annotation_columns_match_the_real_file(tiny: TinyEpic) -> None:
    with tiny.annotations_csv.open(newline='') as handle:
        header = next(csv.reader(handle))
    assert tuple(header) == ANNOTATION_COLUMNS
    real = REAL_ANNOTATIONS / 'EPIC_100_validation.csv'
    if not real.is_file():
        pytest.skip(f'{real} not present: compared with the built-in column list only')
    with real.open(newline='') as handle:
        assert tuple(next(csv.reader(handle))) == ANNOTATION_COLUMNS


def test_segments_follow_the_scenes(tiny: TinyEpic) -> None:
    rows = _rows(tiny.annotations_csv)
    assert rows == _rows(tiny.train_csv)
    assert len(rows) == len(tiny.segments) == 2 * 6  # early + one per 4 s scene, per video
    for row, segment in zip(rows, tiny.segments, strict=True):
        assert re.fullmatch(r'\d\d:\d\d:\d\d\.\d\d', row['start_timestamp'])
        assert re.fullmatch(r'\d\d:\d\d:\d\d\.\d\d\d', row['narration_timestamp'])
        h, m, s = row['start_timestamp'].split(':')
        assert int(h) * 3600 + int(m) * 60 + float(s) == pytest.approx(segment.start_s)
        assert int(row['start_frame']) == round(segment.start_s * tiny.fps) + 1
        verb, noun = int(row['verb_class']), int(row['noun_class'])
        assert (row['verb'], row['noun']) == (VERB_CLASSES[verb], NOUN_CLASSES[noun])
        assert row['narration_id'].startswith(row['video_id'] + '_')
        assert row['participant_id'] == row['video_id'].split('_')[0]
        if segment.start_s == EARLY_START_S:
            assert segment.start_s - 1.0 < 0  # nothing to observe at ta = 1 s
            continue
        # What is on screen 1 s before the action decides its class.
        photo = tiny.photo_at(segment.video_id, segment.start_s - 1.0)
        assert photo == segment.photo and SCENE_ACTIONS[photo] == (verb, noun)
    assert len({(s.verb_class, s.noun_class) for s in tiny.segments}) == len(SCENE_ACTIONS)


def test_side_files_load(tiny: TinyEpic) -> None:
    labels = load_ek100_labels(tiny.annotations_dir)
    assert [c.name for c in labels.verbs] == list(VERB_CLASSES)
    assert [c.name for c in labels.nouns] == list(NOUN_CLASSES)
    assert {v: info.fps for v, info in load_video_info(tiny.video_info_csv).items()} == {
        'P01_01': 30.0, 'P02_03': 30.0}
    unseen = _rows(tiny.annotations_dir / 'EPIC_100_unseen_participant_ids_validation.csv')
    assert unseen == [{'participant_id': 'P02'}]
    assert _rows(tiny.annotations_dir / 'EPIC_100_tail_verbs.csv') == [{'verb': '3'}]


def test_frames_videos_and_bags_hold_the_same_stream(tiny: TinyEpic) -> None:
    assert find_frame_folders(tiny.frames_root) == {
        v: tiny.frame_path(v, 0).parent for v in tiny.video_ids}
    assert find_video_files(tiny.videos_dir) == {v: tiny.video_path(v) for v in tiny.video_ids}
    video = 'P02_03'
    expected = [tiny.frame(video, i) for i in range(tiny.num_frames)]
    assert all(np.abs(a.astype(int) - b).mean() > 1 for a, b in
               zip(expected, expected[1:], strict=False))
    for i in (0, 119, 120, 599):
        jpeg = simplejpeg.decode_jpeg(tiny.frame_path(video, i).read_bytes(), colorspace='RGB')
        assert np.abs(jpeg.astype(int) - expected[i]).mean() < 4
    capture = cv2.VideoCapture(str(tiny.video_path(video)))
    assert capture.get(cv2.CAP_PROP_FPS) == tiny.fps
    decoded = []
    while (item := capture.read())[0]:
        decoded.append(cv2.cvtColor(item[1], cv2.COLOR_BGR2RGB))
    capture.release()
    assert len(decoded) == tiny.num_frames == 600
    assert max(np.abs(d.astype(int) - e).mean() for d, e in
               zip(decoded, expected, strict=True)) < 10
    frames = list(read_camera_frames(tiny.bags[video]))
    start = tiny.video_start_ns[video]
    assert [f.stamp_ns - start for f in frames] == [round(i * 1e9 / 30) for i in range(600)]
    for i in (0, 300, 599):
        np.testing.assert_array_equal(frames[i].image, expected[i])  # raw rgb8: exact


def test_seed_decides_the_scene_order(tmp_path: Path) -> None:
    one = make_tiny_epic(tmp_path / 'a', seconds=16.0, fps=5.0, seed=1, frames=False,
                         mp4=False, bags=False)
    again = make_tiny_epic(tmp_path / 'b', seconds=16.0, fps=5.0, seed=1, frames=False,
                           mp4=False, bags=False)
    other = make_tiny_epic(tmp_path / 'c', seconds=16.0, fps=5.0, seed=2, frames=False,
                           mp4=False, bags=False)
    assert one.scenes == again.scenes != other.scenes
    for scenes in one.scenes.values():  # each 4-scene cycle shows every photo once
        assert sorted(scenes) == sorted(SCENE_ACTIONS)
    assert not (tmp_path / 'a' / 'frames').exists() and one.bags == {}
