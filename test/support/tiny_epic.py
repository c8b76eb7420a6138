"""A tiny EPIC-KITCHENS-100-format dataset made by the tests: frames, MP4s, CSVs, rosbags.

    from support.tiny_epic import make_tiny_epic
    tiny = make_tiny_epic(tmp_path)          # 2 videos x 20 s at 30 fps, about 2 s to write

Each video is a camera panning over real photos (scikit-image samples), one photo per
4-second scene, in a seeded order. Every scene holds one action segment starting 2.5 s into
it, and the photo decides its class (coffee -> wash spoon, chelsea -> open cupboard, astronaut
-> take plate, rocket -> put lid): with the anticipation time ta = 1 s the observed frames up to
ts - ta show that photo, so a model can learn to anticipate it. Each video also starts with an
"early" segment at 0.50 s, which has no observation at ta = 1 s (ts - ta < 0).

Written, under `root`:
- frames/<participant>/rgb_frames/<video_id>/frame_0000000001.jpg  (official layout; frame i,
  1-based, is at (i - 1) / fps). Real EK-100 frames are numbered at 60 fps, which
  malmm-extract assumes by default; pass it `--video-info` (or `--fps`) for these.
- videos/<video_id>.MP4  (mp4v; the same frames, lossy)
- annotations/EPIC_100_validation.csv and EPIC_100_train.csv (identical rows; every column
  of the real files, HH:MM:SS.ff times), EPIC_100_video_info.csv, EPIC_100_verb_classes.csv,
  EPIC_100_noun_classes.csv (the first real EK-100 classes, so ids and names are real),
  EPIC_100_tail_verbs.csv, EPIC_100_tail_nouns.csv,
  EPIC_100_unseen_participant_ids_validation.csv (the last video's participant)
- bags/<video_id>/  rosbag2 of raw rgb8 Images (or JPEG CompressedImages) stamped
  video_start_ns[video_id] + frame time; `TinyEpic.frame()` regenerates any frame exactly.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from skimage import data as skdata

from malmm_ros.data.bags import write_camera_bag

__all__ = ['ANNOTATION_COLUMNS', 'NOUN_CLASSES', 'SCENE_ACTIONS', 'SCENE_SECONDS', 'TinyEpic',
           'TinySegment', 'VERB_CLASSES', 'make_tiny_epic']

# The columns of EPIC_100_validation.csv / EPIC_100_train.csv, in order.
ANNOTATION_COLUMNS = ('narration_id', 'participant_id', 'video_id', 'narration_timestamp',
                      'start_timestamp', 'stop_timestamp', 'start_frame', 'stop_frame',
                      'narration', 'verb', 'verb_class', 'noun', 'noun_class', 'all_nouns',
                      'all_noun_classes')
# The first EK-100 classes (ids and keys as in EPIC_100_{verb,noun}_classes.csv).
VERB_CLASSES = ('take', 'put', 'wash', 'open', 'close')
NOUN_CLASSES = ('tap', 'spoon', 'plate', 'cupboard', 'knife', 'pan', 'lid', 'bowl')
# photo -> (verb_class, noun_class) of the action that follows while it is on screen.
SCENE_ACTIONS = {'coffee': (2, 1), 'chelsea': (3, 3), 'astronaut': (0, 2), 'rocket': (1, 6)}
SCENE_SECONDS = 4.0
ACTION_OFFSET_S = 2.5  # a scene's action starts this long after the scene does
ACTION_LENGTH_S = 1.0
EARLY_START_S = 0.5  # the early segment: ts - ta < 0 for ta = 1 s
TAIL_VERBS = (3,)  # 'open' is declared a tail class, for tail metrics
TAIL_NOUNS = (6,)  # 'lid'
START_NS = 1_700_000_000_000_000_000  # a plausible camera clock (2023-11-14)


@dataclass(frozen=True)
class TinySegment:
    """One annotated action of the tiny dataset (times in seconds from the video start)."""

    narration_id: str
    video_id: str
    participant_id: str
    start_s: float
    stop_s: float
    verb_class: int
    noun_class: int
    photo: str  # the photo on screen at start_s - 1 s ('' for the early segment's none)

    @property
    def action(self) -> str:
        return f'{VERB_CLASSES[self.verb_class]} {NOUN_CLASSES[self.noun_class]}'


@dataclass
class TinyEpic:
    """Paths and ground truth of a dataset written by `make_tiny_epic`."""

    root: Path
    video_ids: tuple[str, ...]
    seconds: float
    fps: float
    size: tuple[int, int]  # frame (height, width)
    frames_root: Path  # <root>/frames: pass as malmm-extract --frames-root
    videos_dir: Path  # <root>/videos: <video_id>.MP4
    annotations_dir: Path
    annotations_csv: Path  # EPIC_100_validation.csv
    train_csv: Path  # EPIC_100_train.csv (same rows)
    video_info_csv: Path
    verb_classes_csv: Path
    noun_classes_csv: Path
    bags: dict[str, Path] = field(default_factory=dict)
    video_start_ns: dict[str, int] = field(default_factory=dict)  # bag stamp of frame 0
    scenes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # photo of each scene
    segments: list[TinySegment] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        """Frames per video."""
        return int(round(self.seconds * self.fps))

    def frame_time(self, index: int) -> float:
        """Seconds from the video start of 0-based frame `index` (file frame_{index+1})."""
        return index / self.fps

    def frame_path(self, video_id: str, index: int) -> Path:
        """The JPEG of 0-based frame `index`."""
        participant = video_id.split('_')[0]
        return (self.frames_root / participant / 'rgb_frames' / video_id
                / f'frame_{index + 1:010d}.jpg')

    def video_path(self, video_id: str) -> Path:
        return self.videos_dir / f'{video_id}.MP4'

    def photo_at(self, video_id: str, time_s: float) -> str:
        """The photo on screen at `time_s`."""
        scenes = self.scenes[video_id]
        return scenes[min(int(time_s // SCENE_SECONDS), len(scenes) - 1)]

    def frame(self, video_id: str, index: int) -> np.ndarray:
        """0-based frame `index` of `video_id`, exactly as the bag holds it (RGB uint8)."""
        return _render(self.scenes[video_id], self.size, index / self.fps)

    def segments_of(self, video_id: str) -> list[TinySegment]:
        return [s for s in self.segments if s.video_id == video_id]


@cache
def _photo(name: str, size: tuple[int, int]) -> np.ndarray:
    """scikit-image photo `name` scaled to cover 2x a `size` frame, so the window can pan."""
    image = getattr(skdata, name)()[..., :3]
    height, width = size
    scale = 2.0 * max(height / image.shape[0], width / image.shape[1])
    new = (max(width + 1, round(image.shape[1] * scale)),
           max(height + 1, round(image.shape[0] * scale)))
    return np.ascontiguousarray(cv2.resize(image, new, interpolation=cv2.INTER_AREA))


def _render(scenes: tuple[str, ...], size: tuple[int, int], time_s: float) -> np.ndarray:
    """The frame at `time_s`: a window panning diagonally across the current scene's photo.

    Sub-pixel window positions (bilinear) make consecutive frames differ at any frame rate.
    """
    scene = min(int(time_s // SCENE_SECONDS), len(scenes) - 1)
    photo = _photo(scenes[scene], size)
    phase = (time_s - scene * SCENE_SECONDS) / SCENE_SECONDS  # 0..1 within the scene
    height, width = size
    centre = ((width - 1) / 2 + phase * (photo.shape[1] - width - 1),
              (height - 1) / 2 + phase * (photo.shape[0] - height - 1))
    return np.ascontiguousarray(cv2.getRectSubPix(photo, (width, height), centre))


def _hms(seconds: float, decimals: int) -> str:
    """HH:MM:SS.ff (decimals=2) or HH:MM:SS.fff (3), as EK-100 writes times."""
    scale = 10 ** decimals
    total = int(round(seconds * scale))
    whole, fraction = divmod(total, scale)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f'{hours:02d}:{minutes:02d}:{secs:02d}.{fraction:0{decimals}d}'


def _segments(video_id: str, scenes: tuple[str, ...], seconds: float) -> list[TinySegment]:
    participant = video_id.split('_')[0]
    first = SCENE_ACTIONS[scenes[0]]
    timed = [(EARLY_START_S, '', first)]  # too early to anticipate with ta = 1 s
    for index, photo in enumerate(scenes):
        start = index * SCENE_SECONDS + ACTION_OFFSET_S
        if start + ACTION_LENGTH_S <= seconds:
            timed.append((start, photo, SCENE_ACTIONS[photo]))
    return [TinySegment(f'{video_id}_{n}', video_id, participant, round(start, 2),
                        round(start + ACTION_LENGTH_S, 2), verb, noun, photo)
            for n, (start, photo, (verb, noun)) in enumerate(timed)]


def _write_csv(path: Path, header: tuple[str, ...] | list[str], rows: list[list[object]]
               ) -> Path:
    with path.open('w', encoding='utf-8', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _annotation_rows(segments: list[TinySegment], fps: float) -> list[list[object]]:
    rows = []
    for s in segments:
        verb, noun = VERB_CLASSES[s.verb_class], NOUN_CLASSES[s.noun_class]
        rows.append([s.narration_id, s.participant_id, s.video_id, _hms(s.start_s + 0.1, 3),
                     _hms(s.start_s, 2), _hms(s.stop_s, 2), int(round(s.start_s * fps)) + 1,
                     int(round(s.stop_s * fps)) + 1, f'{verb} {noun}', verb, s.verb_class,
                     noun, s.noun_class, f"['{noun}']", f'[{s.noun_class}]'])
    return rows


def _write_mp4(path: Path, frames: list[np.ndarray], fps: float) -> None:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'mp4v'), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f'OpenCV cannot write mp4v video {path}')
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def make_tiny_epic(root: Path, *, videos: tuple[str, ...] = ('P01_01', 'P02_03'),
                   seconds: float = 20.0, fps: float = 30.0, seed: int = 0,
                   size: tuple[int, int] = (96, 128), frames: bool = True, mp4: bool = True,
                   bags: bool = True, bag_compressed: bool = False,
                   bag_storage: str = 'sqlite3') -> TinyEpic:
    """Write the tiny dataset under `root` (created) and return its paths and ground truth.

    `frames`, `mp4` and `bags` switch the three video forms off for tests that need fewer.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    ann = root / 'annotations'
    tiny = TinyEpic(
        root=root, video_ids=tuple(videos), seconds=float(seconds), fps=float(fps),
        size=size, frames_root=root / 'frames', videos_dir=root / 'videos',
        annotations_dir=ann, annotations_csv=ann / 'EPIC_100_validation.csv',
        train_csv=ann / 'EPIC_100_train.csv', video_info_csv=ann / 'EPIC_100_video_info.csv',
        verb_classes_csv=ann / 'EPIC_100_verb_classes.csv',
        noun_classes_csv=ann / 'EPIC_100_noun_classes.csv')
    ann.mkdir(parents=True, exist_ok=True)
    photos = tuple(SCENE_ACTIONS)
    num_scenes = math.ceil(seconds / SCENE_SECONDS)
    for number, video_id in enumerate(videos):
        # Every photo once per cycle, each cycle in a seeded order.
        cycles = [photos[i] for _ in range(-(-num_scenes // len(photos)))
                  for i in rng.permutation(len(photos))]
        tiny.scenes[video_id] = tuple(cycles[:num_scenes])
        tiny.video_start_ns[video_id] = START_NS + number * 3_600_000_000_000
        tiny.segments += _segments(video_id, tiny.scenes[video_id], seconds)

        rendered = [tiny.frame(video_id, i) for i in range(tiny.num_frames)]
        if frames:
            folder = tiny.frame_path(video_id, 0).parent
            folder.mkdir(parents=True, exist_ok=True)
            for index, image in enumerate(rendered):
                tiny.frame_path(video_id, index).write_bytes(
                    simplejpeg.encode_jpeg(image, quality=90, colorspace='RGB'))
        if mp4:
            tiny.videos_dir.mkdir(parents=True, exist_ok=True)
            _write_mp4(tiny.video_path(video_id), rendered, fps)
        if bags:
            path = root / 'bags' / video_id
            path.parent.mkdir(parents=True, exist_ok=True)
            start = tiny.video_start_ns[video_id]
            write_camera_bag(path, ((image, start + int(round(i * 1e9 / fps)))
                                    for i, image in enumerate(rendered)),
                             compressed=bag_compressed, storage=bag_storage)
            tiny.bags[video_id] = path

    rows = _annotation_rows(tiny.segments, fps)
    _write_csv(tiny.annotations_csv, ANNOTATION_COLUMNS, rows)
    _write_csv(tiny.train_csv, ANNOTATION_COLUMNS, rows)
    _write_csv(tiny.video_info_csv, ('video_id', 'duration', 'fps', 'resolution'),
               [[v, f'{seconds:.6f}', repr(float(fps)), f'{size[1]}x{size[0]}'] for v in videos])
    for path, names in ((tiny.verb_classes_csv, VERB_CLASSES),
                        (tiny.noun_classes_csv, NOUN_CLASSES)):
        _write_csv(path, ('id', 'key', 'instances', 'category'),
                   [[i, name, f"['{name}']", name] for i, name in enumerate(names)])
    _write_csv(ann / 'EPIC_100_tail_verbs.csv', ('verb',), [[v] for v in TAIL_VERBS])
    _write_csv(ann / 'EPIC_100_tail_nouns.csv', ('noun',), [[n] for n in TAIL_NOUNS])
    _write_csv(ann / 'EPIC_100_unseen_participant_ids_validation.csv', ('participant_id',),
               [[videos[-1].split('_')[0]]])
    return tiny
