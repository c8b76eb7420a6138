"""Tests for malmm_ros.data.epic: timestamps, segment files, the anticipation protocol on the real
EK-100 validation split, and bad files whose errors must name file, line and column."""

from __future__ import annotations

import csv
import os
import pickle
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from malmm_ros.data.epic import (
    AnticipationSample,
    Segment,
    action_label_indices,
    action_vocabulary,
    anticipation_samples,
    format_timestamp,
    load_segments,
    load_tail_classes,
    load_unseen_participants,
    load_video_info,
    observation_times,
    observed_mask,
    parse_timestamp,
    samples_from_segments,
)
from malmm_ros.errors import DataError
from malmm_ros.labels import LabelMaps
from malmm_ros.metrics import anticipation_metrics, tail_action_mask
from support.epic_annotations import EpicAnnotations


def _epic_dir() -> Path:
    """$EPIC_ANNOTATIONS or $MALMM_EPIC_DIR, else shared/epic100 beside the repository."""
    env = os.environ.get('EPIC_ANNOTATIONS') or os.environ.get('MALMM_EPIC_DIR')
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / 'shared' / 'epic100'


@pytest.fixture(scope='module')
def epic_dir() -> Path:
    folder = _epic_dir()
    if not (folder / 'EPIC_100_validation.csv').is_file():
        pytest.skip(reason=f'EK-100 annotations not found in {folder} (set EPIC_ANNOTATIONS)')
    return folder


@pytest.fixture(scope='module')
def annotations(epic_dir: Path) -> EpicAnnotations:
    return EpicAnnotations.from_dir(epic_dir)


@pytest.fixture(scope='module')
def raw_rows(epic_dir: Path) -> list[dict[str, str]]:
    """The validation CSV as plain strings, for checks independent of the module."""
    with (epic_dir / 'EPIC_100_validation.csv').open(newline='') as handle:
        return list(csv.DictReader(handle))


def _decimal_seconds(text: str) -> Decimal:
    """Exact seconds of HH:MM:SS.ff, an independent parser for cross-checks."""
    hours, minutes, seconds = text.split(':')
    return int(hours) * 3600 + int(minutes) * 60 + Decimal(seconds)


# --- timestamps --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ('text', 'seconds'),
    [
        ('00:00:00.00', 0.0),
        ('00:00:01.56', 1.56),
        ('00:30:21.75', 1821.75),
        ('01:02:03.5', 3723.5),
        ('00:00:00.560', 0.56),
        ('00:00:02', 2.0),
        ('123:00:00.00', 442800.0),
        (' 00:00:07.10 ', 7.1),
    ],
)
def test_parse_timestamp(text: str, seconds: float) -> None:
    assert parse_timestamp(text) == pytest.approx(seconds, abs=1e-12)


@pytest.mark.parametrize(
    'text',
    ['-00:00:01.00', '00:60:00.00', '00:00:60.00', '1:2:3', '00:00:01.', '00:00:01,50',
     '00:00', 'abc', '', '\u0660\u0660:\u0660\u0660:\u0660\u0661', '00:00:01.5e3'],
)
def test_parse_timestamp_refuses(text: str) -> None:
    with pytest.raises(DataError, match='timestamp'):
        parse_timestamp(text)


def test_format_timestamp() -> None:
    assert format_timestamp(1821.75) == '00:30:21.75'
    assert format_timestamp(59.999) == '00:01:00.00'  # rounding carries into minutes
    assert format_timestamp(0.5604, decimals=3) == '00:00:00.560'
    assert format_timestamp(3723, decimals=0) == '01:02:03'
    for bad in (-0.01, float('nan'), float('inf')):
        with pytest.raises(ValueError, match='seconds must be finite and >= 0'):
            format_timestamp(bad)


# --- the real validation split -----------------------------------------------------------------


def test_validation_counts_match_reference(annotations: EpicAnnotations) -> None:
    # REFERENCE.md: 9,668 segments, 138 videos, 78 verbs / 211 nouns / 1,352 actions present.
    segments = annotations.validation
    assert segments is not None
    assert len(segments) == 9668
    assert len({s.video_id for s in segments}) == 138
    assert len({s.verb_class for s in segments}) == 78
    assert len({s.noun_class for s in segments}) == 211
    assert len(action_vocabulary(segments)) == 1352
    # 1,065 segments from the unseen participants P18 and P32.
    assert annotations.unseen_validation == frozenset({'P18', 'P32'})
    unseen = [s for s in segments if s.participant_id in annotations.unseen_validation]
    assert len(unseen) == 1065


def test_validation_fields_match_the_raw_file(
    annotations: EpicAnnotations, raw_rows: list[dict[str, str]]
) -> None:
    segments = annotations.validation
    assert segments is not None and len(segments) == len(raw_rows)
    for segment, row in zip(segments, raw_rows, strict=True):
        assert segment.narration_id == row['narration_id']
        assert segment.video_id == row['video_id']
        assert segment.participant_id == row['participant_id']
        assert segment.narration == row['narration']
        assert segment.verb_class == int(row['verb_class'])
        assert segment.noun_class == int(row['noun_class'])
        assert segment.start_frame == int(row['start_frame'])
        assert segment.stop_frame == int(row['stop_frame'])
        assert Decimal(repr(segment.start_s)) == _decimal_seconds(row['start_timestamp'])
        assert Decimal(repr(segment.stop_s)) == _decimal_seconds(row['stop_timestamp'])
    first = segments[0]
    assert first == Segment('P01_11_0', 'P01', 'P01_11', 0.0, 1.89, 'take plate', 0, 2, 1, 113)


def test_validation_timestamps_round_trip(raw_rows: list[dict[str, str]]) -> None:
    for row in raw_rows:
        for column in ('start_timestamp', 'stop_timestamp'):
            assert format_timestamp(parse_timestamp(row[column])) == row[column]


def test_validation_frames_count_at_60_fps(
    annotations: EpicAnnotations,
) -> None:
    # The frame numbers of the validation file count at 60 per second whatever the video's own
    # fps (29.97, 47.95, 59.94 and 90 fps videos alike), not at the fps of video_info.
    assert annotations.video_info is not None and annotations.validation is not None
    fps_seen = set()
    for segment in annotations.validation:
        assert segment.start_frame is not None
        assert abs(segment.start_frame - segment.start_s * 60) <= 1.5, segment
        fps_seen.add(round(annotations.video_info[segment.video_id].fps, 2))
    assert fps_seen == {29.97, 47.95, 59.94, 90.0}


def test_anticipation_windows_on_validation(
    epic_dir: Path, raw_rows: list[dict[str, str]]
) -> None:
    samples = anticipation_samples(epic_dir / 'EPIC_100_validation.csv', num_verbs=97,
                                   num_nouns=300)
    assert len(samples) == 9668
    assert [s.narration_id for s in samples] == [r['narration_id'] for r in raw_rows]
    # Independent counts from exact decimal start times: no observation when ts - 1 < 0,
    # clipped when ts - 1 >= 0 but ts - 11 < 0.
    starts = [_decimal_seconds(r['start_timestamp']) for r in raw_rows]
    no_observation = sum(ts - 1 < 0 for ts in starts)
    clipped = sum(ts - 1 >= 0 and ts - 11 < 0 for ts in starts)
    assert (no_observation, clipped) == (27, 466)  # measured on this file
    assert sum(not s.observable for s in samples) == no_observation
    assert sum(s.clipped for s in samples) == clipped
    assert observed_mask(samples).sum() == 9668 - 27
    for sample in samples:
        if not sample.observable:
            assert sample.start_s - 1 < 0
            assert sample.observe_start_s is None and sample.observe_end_s is None
            assert not sample.clipped and sample.window_s == 0.0
            assert observation_times(sample, 1.0).size == 0
            continue
        assert sample.observe_end_s == sample.start_s - 1.0
        times = observation_times(sample, 1.0)
        assert times[-1] == sample.observe_end_s
        assert times[0] >= sample.observe_start_s
        assert np.all(np.diff(times) > 0)
        if sample.clipped:
            assert sample.observe_start_s == 0.0
            assert sample.start_s - 1 - 10 < 0
            assert times.size == int(sample.observe_end_s) + 1  # whole seconds back to 0
        else:
            assert sample.observe_start_s == pytest.approx(sample.start_s - 11.0)
            assert sample.window_s == pytest.approx(10.0)
            assert times.size == 11


def test_tail_classes_and_counts(annotations: EpicAnnotations, epic_dir: Path) -> None:
    assert annotations.tail_verbs is not None and annotations.tail_nouns is not None
    # The tail files list 86 verbs and 228 nouns (one id a line below the header).
    for name, loaded in (('verbs', annotations.tail_verbs), ('nouns', annotations.tail_nouns)):
        lines = (epic_dir / f'EPIC_100_tail_{name}.csv').read_text().split()
        assert loaded == frozenset(int(x) for x in lines[1:])
    assert (len(annotations.tail_verbs), len(annotations.tail_nouns)) == (86, 228)
    segments = annotations.validation
    assert segments is not None
    tail_verb = [s for s in segments if s.verb_class in annotations.tail_verbs]
    tail_noun = [s for s in segments if s.noun_class in annotations.tail_nouns]
    mask = tail_action_mask([s.verb_class for s in segments], [s.noun_class for s in segments],
                            annotations.tail_verbs, annotations.tail_nouns)
    tail_action = [s for s, tail in zip(segments, mask, strict=True) if tail]
    # Measured on the validation file: segments and classes present in each tail subset.
    assert (len(tail_verb), len(tail_noun), len(tail_action)) == (1760, 1900, 3105)
    assert len({s.verb_class for s in tail_verb}) == 67
    assert len({s.noun_class for s in tail_noun}) == 146
    assert len(action_vocabulary(tail_action)) == 998


def test_metrics_report_on_validation_with_oracle_scores(annotations: EpicAnnotations) -> None:
    # One-hot scores on the truth: every observable sample is a hit, the 27 unobservable ones are
    # misses that stay in the denominators; subset counts come from the real files.
    assert annotations.validation is not None and annotations.tail_verbs is not None
    samples = samples_from_segments(annotations.validation)
    maps = annotations.labels_with_actions(include_validation=True)
    verbs = np.array([s.verb_class for s in samples])
    nouns = np.array([s.noun_class for s in samples])
    actions = action_label_indices(samples, maps)
    assert (actions >= 0).all() and maps.num_actions == 1352
    unseen = np.array([s.participant_id in annotations.unseen_validation for s in samples])
    report = anticipation_metrics(
        np.eye(maps.num_verbs)[verbs], np.eye(maps.num_nouns)[nouns],
        np.eye(maps.num_actions)[actions], verbs, nouns, actions,
        subsets={'unseen': unseen}, tail_verbs=annotations.tail_verbs,
        tail_nouns=annotations.tail_nouns, observed=observed_mask(samples),
    )
    assert report['overall']['verb']['top5_accuracy'] == pytest.approx(1 - 27 / 9668)
    assert report['overall']['action']['classes'] == 1352
    assert report['unseen']['noun']['count'] == 1065
    tail = report['tail']
    assert [tail[t]['count'] for t in ('verb', 'noun', 'action')] == [1760, 1900, 3105]
    assert [tail[t]['classes'] for t in ('verb', 'noun', 'action')] == [67, 146, 998]
    assert 0.9 < report['overall']['noun']['mean_top5_recall'] < 1.0


def test_from_dir_on_real_folder(annotations: EpicAnnotations) -> None:
    assert annotations.labels.num_verbs == 97 and annotations.labels.num_nouns == 300
    assert annotations.train is None  # not in this copy
    assert annotations.test_timestamps is None and annotations.unseen_test is None
    assert annotations.video_info is not None and len(annotations.video_info) == 700
    info = annotations.video_info['P01_01']
    assert (info.width, info.height) == (1920, 1080)
    assert info.fps == pytest.approx(59.94, abs=0.01)
    assert info.duration_s == pytest.approx(1652.152817)
    with pytest.raises(DataError, match='no EPIC_100_train.csv to build the action vocabulary'):
        annotations.action_vocabulary()


# --- protocol on small synthetic segments ------------------------------------------------------


def _segment(narration_id: str, start: float, verb: int = 0, noun: int = 0) -> Segment:
    return Segment(narration_id, 'P01', 'P01_01', start, start + 1.0, '', verb, noun)


def test_windows_and_observation_times() -> None:
    segments = [_segment(name, start) for name, start in
                (('a', 0.5), ('b', 1.0), ('c', 5.0), ('d', 11.0), ('e', 20.25))]
    a, b, c, d, e = samples_from_segments(segments)
    assert not a.observable and a.observe_start_s is None and a.observe_end_s is None
    # ts - ta = 0 exactly: a one-instant window at the video start, cut short by it.
    assert (b.observe_start_s, b.observe_end_s, b.clipped) == (0.0, 0.0, True)
    assert observation_times(b, 1.0).tolist() == [0.0]
    assert (c.observe_start_s, c.observe_end_s, c.clipped) == (0.0, 4.0, True)
    assert observation_times(c, 1.0).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert observation_times(c, 4.0).tolist() == [i / 4 for i in range(17)]
    # 11 - 1 - 10 = 0 is not < 0: a full window that happens to start at 0.
    assert (d.observe_start_s, d.observe_end_s, d.clipped) == (0.0, 10.0, False)
    assert observation_times(d, 1.0).tolist() == [float(i) for i in range(11)]
    assert (e.observe_start_s, e.observe_end_s) == (9.25, 19.25)
    times = observation_times(e, 3.0)
    assert times.size == 31 and times[-1] == 19.25 and times[0] == pytest.approx(9.25)
    assert times[0] >= 9.25 and times.dtype == np.float64
    # At 0.3 fps the step is 3.33 s: 19.25, 15.92, 12.58, 9.25 (the last within the epsilon).
    assert observation_times(e, 0.3) == pytest.approx([9.25, 9.25 + 10 / 3, 9.25 + 20 / 3, 19.25])


def test_tau_options() -> None:
    (sample,) = samples_from_segments([_segment('x', 3.5)], tau_a=0.0, tau_o=2.0)
    assert (sample.observe_start_s, sample.observe_end_s) == (1.5, 3.5)
    assert (sample.tau_a, sample.tau_o) == (0.0, 2.0)
    for kwargs, message in (
        ({'tau_a': -1.0}, 'tau_a'), ({'tau_o': 0.0}, 'tau_o'), ({'tau_o': float('nan')}, 'tau_o'),
    ):
        with pytest.raises(ValueError, match=message):
            samples_from_segments([], **kwargs)
    with pytest.raises(ValueError, match='sample_fps must be a finite number > 0'):
        observation_times(sample, 0.0)


def test_action_vocabulary_and_indices() -> None:
    train = [_segment('a', 5, 3, 7), _segment('b', 6, 1, 2), _segment('c', 7, 3, 7)]
    validation = [_segment('d', 8, 0, 9), _segment('e', 9, 1, 2)]
    assert action_vocabulary(train) == [(1, 2), (3, 7)]
    assert action_vocabulary(train, validation) == [(0, 9), (1, 2), (3, 7)]
    maps = LabelMaps.placeholder(4, 10).with_actions(action_vocabulary(train))
    assert [a.id for a in maps.actions] == [1002, 3007]
    assert action_label_indices(validation + train, maps).tolist() == [-1, 0, 1, 0, 1]
    assert action_label_indices(train, [(3, 7)]).tolist() == [0, -1, 0]
    unlabelled = Segment('t', 'P01', 'P01_01', 1.0, 2.0)
    with pytest.raises(DataError, match='no verb/noun classes'):
        action_vocabulary([unlabelled])
    assert tail_action_mask([3, 0, 0], [7, 7, 1], {3}, {7}).tolist() == [True, True, False]


def test_sample_record_is_frozen() -> None:
    (sample,) = samples_from_segments([_segment('x', 3.0)])
    assert isinstance(sample, AnticipationSample)
    with pytest.raises(AttributeError):
        sample.start_s = 1.0  # type: ignore[misc]


# --- files written by the tests ----------------------------------------------------------------

HEADER = ('narration_id,participant_id,video_id,narration_timestamp,start_timestamp,'
          'stop_timestamp,start_frame,stop_frame,narration,verb,verb_class,noun,noun_class')
GOOD_ROWS = [
    'P01_01_0,P01,P01_01,00:00:01.000,00:00:00.50,00:00:02.00,30,120,open tap,open,3,tap,0',
    'P01_01_1,P01,P01_01,00:00:03.000,00:00:02.50,00:00:04.25,150,255,"take cup, blue",take,0,'
    'cup,13',
]


def _write(tmp_path: Path, name: str, *lines: str) -> Path:
    path = tmp_path / name
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return path


def test_load_segments_small_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'EPIC_100_validation.csv', HEADER, *GOOD_ROWS, '')
    first, second = load_segments(path, num_verbs=97, num_nouns=300)
    assert first == Segment('P01_01_0', 'P01', 'P01_01', 0.5, 2.0, 'open tap', 3, 0, 30, 120)
    assert second.narration == 'take cup, blue' and second.stop_s == 4.25


def test_load_segments_without_classes(tmp_path: Path) -> None:
    # Like EPIC_100_test_timestamps.csv: no class columns, so classes are None.
    path = _write(
        tmp_path, 'EPIC_100_test_timestamps.csv',
        'narration_id,participant_id,video_id,start_timestamp,stop_timestamp,start_frame,'
        'stop_frame',
        'P01_101_0,P01,P01_101,00:00:00.00,00:00:02.00,1,120',
        'P01_101_1,P01,P01_101,00:00:12.00,00:00:13.00,720,780',
    )
    segments = load_segments(path)
    assert [s.verb_class for s in segments] == [None, None]
    assert segments[0].narration == ''
    samples = samples_from_segments(segments)
    assert samples[0].verb_class is None and not samples[0].observable
    assert samples[1].observe_start_s == pytest.approx(1.0)


def _row(**changes: str) -> str:
    """GOOD_ROWS[0] with some columns replaced (by header name)."""
    names = HEADER.split(',')
    values = dict(zip(names, next(csv.reader([GOOD_ROWS[0]])), strict=True))
    values.update(changes)
    return ','.join(values[name] for name in names)


@pytest.mark.parametrize(
    ('lines', 'kwargs', 'line', 'column', 'message'),
    [
        ([HEADER, _row(start_timestamp='0:00:0x')], {}, 2, 'start_timestamp', 'HH:MM:SS.ff'),
        ([HEADER, GOOD_ROWS[1], _row(stop_timestamp='00:61:00.00')], {}, 3, 'stop_timestamp',
         'minutes or seconds of 60'),
        ([HEADER, _row(stop_timestamp='00:00:00.40')], {}, 2, 'stop_timestamp',
         'stop 00:00:00.40 is before start 00:00:00.50'),
        ([HEADER, _row(verb_class='3.0')], {}, 2, 'verb_class', "expected an integer, got '3.0'"),
        ([HEADER, _row(verb_class='')], {}, 2, 'verb_class', "expected an integer, got ''"),
        ([HEADER, _row(noun_class='-1')], {}, 2, 'noun_class', 'expected a value >= 0'),
        ([HEADER, _row(noun_class='300')], {'num_nouns': 300}, 2, 'noun_class',
         r'class id 300 is out of range 0..299'),
        ([HEADER, _row(verb_class='97')], {'num_verbs': 97}, 2, 'verb_class',
         r'out of range 0..96'),
        ([HEADER, _row(), _row()], {}, 3, 'narration_id',
         r"duplicate narration_id 'P01_01_0' \(first on line 2\)"),
        ([HEADER, _row(video_id=' ')], {}, 2, 'video_id', 'empty value'),
        ([HEADER, _row(start_frame='abc')], {}, 2, 'start_frame', 'expected an integer'),
        ([HEADER, _row(stop_frame='10')], {}, 2, 'stop_frame', 'before start frame 30'),
    ],
)
def test_bad_segment_files_name_file_line_and_column(
    tmp_path: Path, lines: list[str], kwargs: dict, line: int, column: str, message: str
) -> None:
    path = _write(tmp_path, 'bad.csv', *lines)
    with pytest.raises(DataError, match=message) as info:
        load_segments(path, **kwargs)
    assert str(info.value).startswith(f"annotation file {path}, line {line}, column '{column}':")


def test_bad_segment_file_structure(tmp_path: Path) -> None:
    cases = [
        (['narration_id,participant_id,video_id,start_timestamp', 'a,P01,P01_01,00:00:01.00'],
         r"bad.csv, line 1: missing column 'stop_timestamp'"),
        ([HEADER.replace(',noun_class', ',noun_id'), GOOD_ROWS[0]],
         r"bad.csv, line 1: missing column 'noun_class'"),
        ([HEADER, GOOD_ROWS[0] + ',extra'], r'bad.csv, line 2: 14 fields but the header'),
        ([HEADER], 'bad.csv has a header but no segments'),
        (['', '  '], r'bad.csv is empty \(expected a header line\)'),
        ([HEADER + ',video_id', GOOD_ROWS[0] + ',x'], "column 'video_id' appears twice"),
    ]
    for lines, message in cases:
        path = _write(tmp_path, 'bad.csv', *lines)
        with pytest.raises(DataError, match=message):
            load_segments(path)
    with pytest.raises(DataError, match='missing.csv not found'):
        load_segments(tmp_path / 'missing.csv')
    (tmp_path / 'latin1.csv').write_bytes(HEADER.encode() + b'\n' + b'\xe9\n')
    with pytest.raises(DataError, match='latin1.csv is not valid UTF-8'):
        load_segments(tmp_path / 'latin1.csv')
    with pytest.raises(ValueError, match='num_verbs must be a positive int'):
        load_segments(tmp_path / 'bad.csv', num_verbs=0)


class _Payload:
    """Unpickling this creates a marker file: proof that the loader never unpickles."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_pickles_are_refused_unread(tmp_path: Path) -> None:
    marker = tmp_path / 'unpickled'
    for name in ('EPIC_100_validation.pkl', 'EPIC_100_train.PICKLE'):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(_Payload(marker)))
        with pytest.raises(DataError, match='pickle files are never loaded') as info:
            anticipation_samples(path)
        assert str(path.with_suffix('.csv')) in str(info.value)
        assert 'ships each pickle' in str(info.value)
    with pytest.raises(DataError, match='never loaded'):
        load_video_info(tmp_path / 'EPIC_100_video_info.pkl')
    assert not marker.exists()


def test_other_annotation_files(tmp_path: Path) -> None:
    info = _write(tmp_path, 'info.csv', 'video_id,duration,fps,resolution',
                  'P01_01,12.5,59.94,1920x1080', 'P01_02,3,50,456x256')
    videos = load_video_info(info)
    assert videos['P01_02'].fps == 50.0 and videos['P01_02'].width == 456
    tail = _write(tmp_path, 'tail.csv', 'verb', '10', '12', '10')
    assert load_tail_classes(tail) == frozenset({10, 12})
    unseen = _write(tmp_path, 'unseen.csv', 'participant_id', 'P18', 'P32')
    assert load_unseen_participants(unseen) == frozenset({'P18', 'P32'})

    bad_files = [
        (load_video_info, ['video_id,duration,fps,resolution', 'P01_01,12.5,59.94,1920X1080'],
         r"line 2, column 'resolution': expected WIDTHxHEIGHT"),
        (load_video_info, ['video_id,duration,fps,resolution', 'P01_01,12.5,0,1x1'],
         r"line 2, column 'fps': expected a finite number > 0"),
        (load_video_info, ['video_id,duration,fps,resolution', 'P01_01,1,1,1x1', 'P01_01,1,1,1x1'],
         r"line 3, column 'video_id': duplicate video_id"),
        (load_video_info, ['video_id,duration,fps'], "missing column 'resolution'"),
        (load_tail_classes, ['noun', '56', 'x59'], r"line 3, column 'noun': expected an integer"),
        (load_tail_classes, ['verb,noun', '1,2'], 'expected one named column'),
        (load_unseen_participants, ['participant_id,split', 'P18,val', ',val'],
         r"line 3, column 'participant_id': empty value"),
        (load_unseen_participants, ['participant', 'P18'], "missing column 'participant_id'"),
    ]
    for loader, lines, message in bad_files:
        path = _write(tmp_path, 'bad_file.csv', *lines)
        with pytest.raises(DataError, match=message) as caught:
            loader(path)
        assert str(path) in str(caught.value)
    with pytest.raises(DataError, match=r"line 2, column 'verb': class id 97 is out of range"):
        load_tail_classes(_write(tmp_path, 't.csv', 'verb', '97'), num_classes=97)


def test_from_dir_small_folder(tmp_path: Path) -> None:
    _write(tmp_path, 'EPIC_100_verb_classes.csv', 'id,key', '0,take', '1,put', '2,open', '3,wash')
    with pytest.raises(DataError, match='EPIC_100_noun_classes.csv not found'):
        EpicAnnotations.from_dir(tmp_path)
    _write(tmp_path, 'EPIC_100_noun_classes.csv', 'id,key', *(f'{i},n{i}' for i in range(20)))
    bare = EpicAnnotations.from_dir(tmp_path)
    assert bare.validation is None and bare.train is None and bare.tail_verbs is None
    assert bare.video_info is None and bare.unseen_validation is None

    _write(tmp_path, 'EPIC_100_train.csv', HEADER, _row(verb_class='2', noun_class='5'),
           _row(narration_id='P01_01_9', verb_class='1', noun_class='3'))
    _write(tmp_path, 'EPIC_100_validation.csv', HEADER, _row(verb_class='3', noun_class='13'))
    _write(tmp_path, 'EPIC_100_tail_verbs.csv', 'verb', '3')
    _write(tmp_path, 'EPIC_100_tail_nouns.csv', 'noun', '13')
    _write(tmp_path, 'EPIC_100_unseen_participant_ids_test.csv', 'participant_id', 'P37')
    loaded = EpicAnnotations.from_dir(tmp_path)
    assert loaded.train is not None and len(loaded.train) == 2
    assert loaded.unseen_test == frozenset({'P37'})
    assert loaded.action_vocabulary() == [(1, 3), (2, 5)]
    assert loaded.action_vocabulary(include_validation=True) == [(1, 3), (2, 5), (3, 13)]
    maps = loaded.labels_with_actions()
    assert [(a.id, a.name) for a in maps.actions] == [(1003, 'put n3'), (2005, 'open n5')]

    # Class ids beyond the class files are errors naming the file, line and column.
    _write(tmp_path, 'EPIC_100_validation.csv', HEADER, _row(verb_class='4'))
    with pytest.raises(DataError, match=r"EPIC_100_validation.csv, line 2, column 'verb_class'"):
        EpicAnnotations.from_dir(tmp_path)
