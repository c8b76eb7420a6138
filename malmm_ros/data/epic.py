"""EPIC-KITCHENS-100 annotation files and the action anticipation protocol (no ROS imports).

Reads the official CSVs (segments, video info, tail classes, unseen participants) with strict
checks whose errors name the file, the CSV line and the column, and turns segments into
anticipation samples: a segment starting at ``ts`` is anticipated from the window
``[ts - tau_a - tau_o, ts - tau_a]``, clipped at the video start. A segment with
``ts - tau_a < 0`` cannot be observed at all; it stays in the sample list so that metrics keep it
in their denominators (see :func:`malmm_ros.metrics.anticipation_metrics`, argument ``observed``).

EK-100 also ships pickled pandas tables; they are never loaded because unpickling can run code.
Every pickle's content is published as a CSV with the same name, which is what this module reads.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from malmm_ros.errors import DataError
from malmm_ros.files import open_csv
from malmm_ros.labels import LabelMaps
from malmm_ros.protocol import DEFAULT_TAU_A, DEFAULT_TAU_O

__all__ = [
    'AnticipationSample',
    'Segment',
    'VideoInfo',
    'action_label_indices',
    'action_vocabulary',
    'anticipation_samples',
    'format_timestamp',
    'load_segments',
    'load_tail_classes',
    'load_unseen_participants',
    'load_video_info',
    'observation_times',
    'observed_mask',
    'parse_timestamp',
    'samples_from_segments',
]


TRAIN_FILE = 'EPIC_100_train.csv'
VALIDATION_FILE = 'EPIC_100_validation.csv'
TEST_TIMESTAMPS_FILE = 'EPIC_100_test_timestamps.csv'
VIDEO_INFO_FILE = 'EPIC_100_video_info.csv'
TAIL_VERBS_FILE = 'EPIC_100_tail_verbs.csv'
TAIL_NOUNS_FILE = 'EPIC_100_tail_nouns.csv'
UNSEEN_VALIDATION_FILE = 'EPIC_100_unseen_participant_ids_validation.csv'
UNSEEN_TEST_FILE = 'EPIC_100_unseen_participant_ids_test.csv'


# Sampling times within this many seconds of the window start still belong to the window, so
# that float rounding of ``end - i / fps`` never drops the first frame of an exact window.
_TIME_EPSILON = 1e-6

_PICKLE_SUFFIXES = ('.pkl', '.pickle')
_SEGMENT_COLUMNS = ('narration_id', 'participant_id', 'video_id', 'start_timestamp',
                    'stop_timestamp')
# HH:MM:SS with an optional fraction; ASCII digits only ([0-9], not \d, which takes any script).
_TIMESTAMP_RE = re.compile(r'([0-9]+):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?')
_INT_RE = re.compile(r'[+-]?[0-9]+')
_RESOLUTION_RE = re.compile(r'([0-9]+)x([0-9]+)')


# --- timestamps ---------------------------------------------------------------------------------


def parse_timestamp(text: str) -> float:
    """Seconds from an EK-100 timestamp ``HH:MM:SS.ff`` (also ``.fff`` or no fraction).

    DataError for anything else: signs, minutes or seconds of 60 or more, missing fields, garbage.
    """
    if not isinstance(text, str):
        raise DataError(f'expected a timestamp string HH:MM:SS.ff, got {text!r}')
    match = _TIMESTAMP_RE.fullmatch(text.strip())
    if match is None:
        raise DataError(f'expected a timestamp HH:MM:SS.ff, got {text!r}')
    hours, minutes, seconds, fraction = match.groups()
    if int(minutes) >= 60 or int(seconds) >= 60:
        raise DataError(f'timestamp {text!r} has minutes or seconds of 60 or more')
    whole = int(hours) * 3600 + int(minutes) * 60 + int(seconds)
    # float() of the decimal text rounds once, to the float nearest the exact time; adding the
    # fraction to the whole seconds would round twice (1 + 0.89 != 1.89).
    return float(f'{whole}.{fraction or 0}')


def format_timestamp(seconds: float, *, decimals: int = 2) -> str:
    """Format seconds as an EK-100 timestamp ``HH:MM:SS.ff`` (inverse of parse_timestamp)."""
    if not isinstance(decimals, int) or not 0 <= decimals <= 9:
        raise ValueError(f'decimals must be an int in 0..9, got {decimals!r}')
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f'seconds must be finite and >= 0, got {seconds!r}')
    scale = 10 ** decimals
    units = round(seconds * scale)  # integer arithmetic from here on: no 59.999 -> 60 carries
    whole, fraction = divmod(units, scale)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = f'{hours:02d}:{minutes:02d}:{secs:02d}'
    return f'{text}.{fraction:0{decimals}d}' if decimals else text


# --- records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One annotated action segment of an EK-100 split (times in seconds from the video start).

    ``verb_class`` and ``noun_class`` are None when the file has no class columns (test
    timestamps); ``start_frame`` and ``stop_frame`` are None when absent.
    """

    narration_id: str
    participant_id: str
    video_id: str
    start_s: float
    stop_s: float
    narration: str = ''
    verb_class: int | None = None
    noun_class: int | None = None
    start_frame: int | None = None
    stop_frame: int | None = None


@dataclass(frozen=True)
class AnticipationSample:
    """The action starting at ``start_s`` and the window a model may observe to anticipate it.

    The window is ``[observe_start_s, observe_end_s]`` = ``[start_s - tau_a - tau_o, start_s -
    tau_a]`` clipped at 0 (the video start). Both ends are None when ``start_s - tau_a < 0``: no
    frame precedes the anticipation point; the sample is kept so metrics count it as a miss.
    """

    narration_id: str
    video_id: str
    participant_id: str
    verb_class: int | None
    noun_class: int | None
    start_s: float
    observe_start_s: float | None
    observe_end_s: float | None
    tau_a: float = DEFAULT_TAU_A
    tau_o: float = DEFAULT_TAU_O

    @property
    def observable(self) -> bool:
        """True when at least the instant ``start_s - tau_a`` lies inside the video."""
        return self.observe_end_s is not None

    @property
    def clipped(self) -> bool:
        """True when the video start cut the window short (it then starts at 0)."""
        return self.observable and self.start_s - self.tau_a - self.tau_o < 0

    @property
    def window_s(self) -> float:
        """Observed window length in seconds (0 for an unobservable sample)."""
        if self.observe_end_s is None or self.observe_start_s is None:
            return 0.0
        return self.observe_end_s - self.observe_start_s


@dataclass(frozen=True)
class VideoInfo:
    """One row of EPIC_100_video_info.csv."""

    video_id: str
    duration_s: float
    fps: float
    width: int
    height: int


class _Labelled(Protocol):
    """Anything with EK-100 verb and noun classes (Segment, AnticipationSample)."""

    @property
    def verb_class(self) -> int | None: ...

    @property
    def noun_class(self) -> int | None: ...


# --- CSV plumbing ------------------------------------------------------------------------------


def _refuse_pickle(path: Path) -> None:
    """Refuse pickles before touching the file: unpickling untrusted data can run code."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise DataError(
            f'{path}: pickle files are never loaded (unpickling can run arbitrary code); use '
            f'{path.with_suffix(".csv")} instead (EK-100 ships each pickle\'s content as a CSV '
            'with the same name)'
        )


@dataclass(frozen=True)
class _Table:
    """A whole CSV file in memory: header cells, the header's line and (line, cells) rows."""

    what: str
    header: tuple[str, ...]
    header_line: int
    rows: tuple[tuple[int, tuple[str, ...]], ...]

    def column(self, name: str) -> int | None:
        return self.header.index(name) if name in self.header else None

    def require(self, *names: str) -> dict[str, int]:
        """Indices of required columns; DataError naming the first missing one."""
        missing = [name for name in names if name not in self.header]
        if missing:
            raise DataError(
                f"{self.what}, line {self.header_line}: missing column '{missing[0]}' "
                f'(header has {", ".join(repr(c) for c in self.header)})'
            )
        return {name: self.header.index(name) for name in names}

    def fail(self, line: int, column: str, message: str) -> DataError:
        return DataError(f"{self.what}, line {line}, column '{column}': {message}")


def _read_table(path: Path, what: str) -> _Table:
    """Read a CSV file with a header line; blank lines are skipped, ragged rows refused."""
    _refuse_pickle(path)
    with open_csv(path, what) as handle:
        reader = csv.reader(handle)
        try:
            header: list[str] | None = None
            header_line = 0
            rows: list[tuple[int, tuple[str, ...]]] = []
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue  # blank line, e.g. a trailing newline
                if header is None:
                    header, header_line = [cell.strip() for cell in cells], reader.line_num
                    continue
                if len(cells) != len(header):
                    raise DataError(
                        f'{what}, line {reader.line_num}: {len(cells)} fields but the header '
                        f'(line {header_line}) has {len(header)}'
                    )
                rows.append((reader.line_num, tuple(cells)))
        except csv.Error as exc:
            raise DataError(f'{what}, line {reader.line_num}: malformed CSV: {exc}') from None
    if header is None:
        raise DataError(f'{what} is empty (expected a header line)')
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(f"{what}, line {header_line}: column '{duplicates[0]}' appears twice")
    return _Table(what, tuple(header), header_line, tuple(rows))


def _parse_int(table: _Table, line: int, column: str, text: str, *, limit: int | None) -> int:
    """A non-negative integer cell, below ``limit`` when given."""
    text = text.strip()
    if not _INT_RE.fullmatch(text):
        raise table.fail(line, column, f'expected an integer, got {text!r}')
    value = int(text)
    if value < 0:
        raise table.fail(line, column, f'expected a value >= 0, got {value}')
    if limit is not None and value >= limit:
        raise table.fail(line, column, f'class id {value} is out of range 0..{limit - 1}')
    return value


def _parse_float(table: _Table, line: int, column: str, text: str) -> float:
    """A finite, positive float cell."""
    try:
        value = float(text.strip())
    except ValueError:
        raise table.fail(line, column, f'expected a number, got {text.strip()!r}') from None
    if not math.isfinite(value) or value <= 0:
        raise table.fail(line, column, f'expected a finite number > 0, got {text.strip()!r}')
    return value


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f'{name} must be a positive int or None, got {value!r}')


# --- segments ----------------------------------------------------------------------------------


def load_segments(
    csv_path: str | os.PathLike[str],
    *,
    num_verbs: int | None = None,
    num_nouns: int | None = None,
) -> list[Segment]:
    """Read an EK-100 segment CSV (train, validation or test timestamps) in file order.

    Required columns: narration_id, participant_id, video_id, start_timestamp, stop_timestamp.
    verb_class and noun_class are optional as a pair; their ids are checked against num_verbs and
    num_nouns when given. narration, start_frame and stop_frame are read when present. Errors name
    the file, the CSV line and the column. Pickles (.pkl) are refused, never unpickled.
    """
    _check_limit('num_verbs', num_verbs)
    _check_limit('num_nouns', num_nouns)
    path = Path(csv_path)
    table = _read_table(path, f'annotation file {path}')
    columns = table.require(*_SEGMENT_COLUMNS)
    verb_col, noun_col = table.column('verb_class'), table.column('noun_class')
    if (verb_col is None) != (noun_col is None):
        table.require('verb_class', 'noun_class')  # raises, naming the missing one
    narration_col = table.column('narration')
    frame_cols = {name: table.column(name) for name in ('start_frame', 'stop_frame')}
    if not table.rows:
        raise DataError(f'{table.what} has a header but no segments')

    segments: list[Segment] = []
    first_line: dict[str, int] = {}
    for line, cells in table.rows:
        text = {name: cells[index].strip() for name, index in columns.items()}
        for name in ('narration_id', 'participant_id', 'video_id'):
            if not text[name]:
                raise table.fail(line, name, 'empty value')
        narration_id = text['narration_id']
        if narration_id in first_line:
            raise table.fail(
                line, 'narration_id',
                f'duplicate narration_id {narration_id!r} '
                f'(first on line {first_line[narration_id]})',
            )
        first_line[narration_id] = line
        times = {}
        for name in ('start_timestamp', 'stop_timestamp'):
            try:
                times[name] = parse_timestamp(text[name])
            except DataError as exc:
                raise table.fail(line, name, str(exc)) from None
        if times['stop_timestamp'] < times['start_timestamp']:
            raise table.fail(
                line, 'stop_timestamp',
                f'stop {text["stop_timestamp"]} is before start {text["start_timestamp"]}',
            )
        frames: dict[str, int | None] = {}
        for name, index in frame_cols.items():
            raw = cells[index].strip() if index is not None else ''
            frames[name] = _parse_int(table, line, name, raw, limit=None) if raw else None
        start_frame, stop_frame = frames['start_frame'], frames['stop_frame']
        if start_frame is not None and stop_frame is not None and stop_frame < start_frame:
            raise table.fail(
                line, 'stop_frame', f'stop frame {stop_frame} is before start frame {start_frame}'
            )
        verb = noun = None
        if verb_col is not None and noun_col is not None:
            verb = _parse_int(table, line, 'verb_class', cells[verb_col], limit=num_verbs)
            noun = _parse_int(table, line, 'noun_class', cells[noun_col], limit=num_nouns)
        segments.append(
            Segment(
                narration_id=narration_id,
                participant_id=text['participant_id'],
                video_id=text['video_id'],
                start_s=times['start_timestamp'],
                stop_s=times['stop_timestamp'],
                narration=cells[narration_col].strip() if narration_col is not None else '',
                verb_class=verb,
                noun_class=noun,
                start_frame=start_frame,
                stop_frame=stop_frame,
            )
        )
    return segments


# --- anticipation protocol ---------------------------------------------------------------------


def _check_taus(tau_a: float, tau_o: float) -> None:
    for name, value in (('tau_a', tau_a), ('tau_o', tau_o)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value
        ):
            raise ValueError(f'{name} must be a finite number, got {value!r}')
    if tau_a < 0:
        raise ValueError(f'tau_a (anticipation time) must be >= 0, got {tau_a}')
    if tau_o <= 0:
        raise ValueError(f'tau_o (observed window) must be > 0, got {tau_o}')


def samples_from_segments(
    segments: Iterable[Segment], tau_a: float = DEFAULT_TAU_A, tau_o: float = DEFAULT_TAU_O
) -> list[AnticipationSample]:
    """One anticipation sample per segment, in order (see :class:`AnticipationSample`)."""
    _check_taus(tau_a, tau_o)
    samples = []
    for segment in segments:
        end = segment.start_s - tau_a
        observable = end >= 0
        samples.append(
            AnticipationSample(
                narration_id=segment.narration_id,
                video_id=segment.video_id,
                participant_id=segment.participant_id,
                verb_class=segment.verb_class,
                noun_class=segment.noun_class,
                start_s=segment.start_s,
                observe_start_s=max(0.0, end - tau_o) if observable else None,
                observe_end_s=end if observable else None,
                tau_a=float(tau_a),
                tau_o=float(tau_o),
            )
        )
    return samples


def anticipation_samples(
    csv_path: str | os.PathLike[str],
    tau_a: float = DEFAULT_TAU_A,
    tau_o: float = DEFAULT_TAU_O,
    **load_kwargs: int | None,
) -> list[AnticipationSample]:
    """Load a segment CSV and return one anticipation sample per segment, in file order.

    ``load_kwargs`` go to :func:`load_segments` (num_verbs, num_nouns).
    """
    _check_taus(tau_a, tau_o)
    return samples_from_segments(load_segments(csv_path, **load_kwargs), tau_a, tau_o)


def observation_times(sample: AnticipationSample, sample_fps: float) -> np.ndarray:
    """Times (seconds, float64, ascending) at which a streaming model samples the window.

    The last time is exactly ``observe_end_s`` (the anticipation point); earlier ones go back in
    steps of ``1 / sample_fps`` while they are >= ``observe_start_s`` (with a 1e-6 s tolerance, the
    earliest then being raised to ``observe_start_s``). Both ends are included, so an unclipped
    10 s window at 1 fps gives 11 times. Empty for an unobservable sample. Training and
    evaluation feed the memory the frames at exactly these times.
    """
    if isinstance(sample_fps, bool) or not isinstance(sample_fps, (int, float)) or not (
        math.isfinite(sample_fps) and sample_fps > 0
    ):
        raise ValueError(f'sample_fps must be a finite number > 0, got {sample_fps!r}')
    if sample.observe_end_s is None or sample.observe_start_s is None:
        return np.empty(0, dtype=np.float64)
    step = 1.0 / sample_fps
    span = sample.observe_end_s - sample.observe_start_s
    count = math.floor((span + _TIME_EPSILON) / step) + 1
    times = sample.observe_end_s - np.arange(count - 1, -1, -1, dtype=np.float64) * step
    return np.maximum(times, sample.observe_start_s)


def observed_mask(samples: Sequence[AnticipationSample]) -> np.ndarray:
    """Bool [N]: which samples have an observation; pass it as ``observed`` to the metrics."""
    return np.fromiter((s.observable for s in samples), dtype=bool, count=len(samples))


# --- actions and subsets -----------------------------------------------------------------------


def _pair(record: _Labelled, where: str) -> tuple[int, int]:
    verb, noun = record.verb_class, record.noun_class
    if verb is None or noun is None:
        raise DataError(f'{where} has no verb/noun classes (test timestamps carry no labels)')
    return verb, noun


def action_vocabulary(
    segments: Iterable[_Labelled], *more: Iterable[_Labelled]
) -> list[tuple[int, int]]:
    """Sorted unique (verb, noun) pairs of the given lists (e.g. train, optionally validation).

    Sorted pairs are also sorted by the official action id ``verb * 1000 + noun``, so the list
    matches the order of :meth:`LabelMaps.with_actions`.
    """
    pairs: set[tuple[int, int]] = set()
    for which, records in enumerate((segments, *more)):
        for index, record in enumerate(records):
            pairs.add(_pair(record, f'segment {index} of list {which}'))
    return sorted(pairs)


def action_label_indices(
    records: Sequence[_Labelled], actions: LabelMaps | Sequence[tuple[int, int]]
) -> np.ndarray:
    """Int64 [N]: each record's column in the action scores, -1 when its action is not scored.

    ``actions`` is the action vocabulary (label maps with actions, or (verb, noun) pairs in column
    order). A -1 label counts as a miss in :mod:`malmm_ros.metrics`.
    """
    if isinstance(actions, LabelMaps):
        pairs = [(a.verb_id, a.noun_id) for a in actions.actions]
    else:
        pairs = [(int(v), int(n)) for v, n in actions]
    column = {pair: index for index, pair in enumerate(pairs)}
    return np.fromiter(
        (column.get(_pair(r, f'record {i}'), -1) for i, r in enumerate(records)),
        dtype=np.int64,
        count=len(records),
    )


# --- other annotation files --------------------------------------------------------------------


def load_video_info(csv_path: str | os.PathLike[str]) -> dict[str, VideoInfo]:
    """Read EPIC_100_video_info.csv (video_id, duration, fps, resolution "WxH") by video id."""
    path = Path(csv_path)
    table = _read_table(path, f'video info file {path}')
    columns = table.require('video_id', 'duration', 'fps', 'resolution')
    videos: dict[str, VideoInfo] = {}
    for line, cells in table.rows:
        video_id = cells[columns['video_id']].strip()
        if not video_id:
            raise table.fail(line, 'video_id', 'empty value')
        if video_id in videos:
            raise table.fail(line, 'video_id', f'duplicate video_id {video_id!r}')
        resolution = cells[columns['resolution']].strip()
        match = _RESOLUTION_RE.fullmatch(resolution)
        if match is None or 0 in (int(match[1]), int(match[2])):
            raise table.fail(line, 'resolution', f'expected WIDTHxHEIGHT, got {resolution!r}')
        videos[video_id] = VideoInfo(
            video_id=video_id,
            duration_s=_parse_float(table, line, 'duration', cells[columns['duration']]),
            fps=_parse_float(table, line, 'fps', cells[columns['fps']]),
            width=int(match[1]),
            height=int(match[2]),
        )
    if not videos:
        raise DataError(f'{table.what} has a header but no videos')
    return videos


def load_tail_classes(
    csv_path: str | os.PathLike[str], *, num_classes: int | None = None
) -> frozenset[int]:
    """Read EPIC_100_tail_verbs.csv or _nouns.csv: one column (header "verb" or "noun") of ids."""
    _check_limit('num_classes', num_classes)
    path = Path(csv_path)
    table = _read_table(path, f'tail class file {path}')
    if len(table.header) != 1 or not table.header[0]:
        raise DataError(
            f'{table.what}, line {table.header_line}: expected one named column, got '
            f'{", ".join(repr(c) for c in table.header)}'
        )
    column = table.header[0]
    return frozenset(
        _parse_int(table, line, column, cells[0], limit=num_classes) for line, cells in table.rows
    )


def load_unseen_participants(csv_path: str | os.PathLike[str]) -> frozenset[str]:
    """Read EPIC_100_unseen_participant_ids_*.csv (column participant_id)."""
    path = Path(csv_path)
    table = _read_table(path, f'unseen participants file {path}')
    index = table.require('participant_id')['participant_id']
    ids = set()
    for line, cells in table.rows:
        value = cells[index].strip()
        if not value:
            raise table.fail(line, 'participant_id', 'empty value')
        ids.add(value)
    return frozenset(ids)
