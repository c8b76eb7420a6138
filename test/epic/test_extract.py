"""malmm-extract and the per-video feature files, on a tiny EK-format dataset with the real
encoder (ONNX Runtime; one test with the torch backend)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import simplejpeg
from safetensors.numpy import load_file, save_file

from malmm_ros.cli import extract as extract_cli
from malmm_ros.data.extraction import (
    SUMMARY_FILE,
    SampleGrid,
    extract_frames_dir,
    extract_video_file,
    find_frame_folders,
)
from malmm_ros.data.features import (
    FeatureStore,
    FeatureWriter,
    open_video_features,
    write_video_features,
)
from malmm_ros.errors import DataError
from malmm_ros.imaging import resize_and_crop
from malmm_ros.runtime import EncoderRunner, create_encoder
from support.tiny_epic import TinyEpic, make_tiny_epic

SCRIPT = Path(sys.executable).with_name('malmm-extract')
SECONDS, FPS = 6.0, 30.0
# fp16 storage: about 3 significant digits; tokens are ReLU6 outputs in [0, 6].
FP16_TOL = {'rtol': 2e-3, 'atol': 2e-3}


pytestmark = pytest.mark.usefixtures('single_thread')  # test/conftest.py


@pytest.fixture(scope='module')
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyEpic:
    return make_tiny_epic(tmp_path_factory.mktemp('epic'), seconds=SECONDS, fps=FPS,
                          bags=False)


@pytest.fixture(scope='module')
def encoder() -> EncoderRunner:
    return create_encoder('onnxruntime', threads=1)


def _encode_direct(encoder: EncoderRunner, images: list[np.ndarray]) -> np.ndarray:
    """Tokens of each image encoded alone, the way the node encodes a frame."""
    return np.concatenate([encoder.run(resize_and_crop(image)[None]) for image in images])


def _jpeg(path: Path) -> np.ndarray:
    return simplejpeg.decode_jpeg(path.read_bytes(), colorspace='RGB')


def _cli(*args: str) -> tuple[int, str, str]:
    """Run malmm-extract in-process (fast); returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = extract_cli.main([*args, '--threads', '1', '--quiet'])
    return code, out.getvalue(), err.getvalue()


def _stat(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_ino, info.st_mtime_ns


# --------------------------------------------------------------------------------------------
# The sampling rule
# --------------------------------------------------------------------------------------------


def _brute_force(n: int, fps: Fraction, sample_fps: Fraction) -> list[int]:
    """For each t_k = k / sample_fps <= the last frame's time, the latest frame at or before."""
    last = Fraction(n - 1) / fps
    picked, k = set(), 0
    while Fraction(k) / sample_fps <= last:
        t = Fraction(k) / sample_fps
        picked.add(max(j for j in range(n) if Fraction(j) / fps <= t))
        k += 1
    return sorted(picked)


@pytest.mark.parametrize(('fps', 'sample_fps', 'n'), [
    (Fraction(30), Fraction(4), 600),
    (Fraction(30), Fraction(1), 601),
    (Fraction(30000, 1001), Fraction(1), 1000),
    (Fraction(60000, 1001), Fraction(4), 2500),
    (Fraction(25), Fraction(3), 100),
    (Fraction(50), Fraction(1, 2), 251),
    (Fraction(30), Fraction(15, 2), 61),
    (Fraction(30), Fraction(60), 90),  # faster than the video: each frame once
    (Fraction(24), Fraction(1), 1),
])
def test_sampling_rule(fps: Fraction, sample_fps: Fraction, n: int) -> None:
    grid = SampleGrid(float(fps), float(sample_fps))
    expected = _brute_force(n, fps, sample_fps)
    assert grid.indices(n).tolist() == expected
    # Streamed (video files): a frame whose sampling time lies after it counts only if a later
    # frame exists.
    select = grid.selector()
    decisions = [select(j) for j in range(n)]
    streamed = [j for j, d in enumerate(decisions) if d is True or (d is False and j < n - 1)]
    assert streamed == expected


def test_sample_fps_zero_takes_every_frame() -> None:
    assert SampleGrid(30.0, 0.0).indices(7).tolist() == list(range(7))
    with pytest.raises(DataError, match='sample_fps'):
        SampleGrid(30.0, -1.0)
    with pytest.raises(DataError, match='fps'):
        SampleGrid(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def test_frames_features_equal_direct_encoding(
        tiny: TinyEpic, encoder: EncoderRunner, tmp_path: Path) -> None:
    video = 'P01_01'
    out = tmp_path / f'{video}.safetensors'
    result = extract_frames_dir(video, tiny.frame_path(video, 0).parent, out, encoder,
                                fps=FPS, sample_fps=2.0, batch_size=5, progress=False)
    frames = np.arange(0, tiny.num_frames, 15)  # t_k = k / 2 s: every 15th frame at 30 fps
    assert result.status == 'extracted' and result.frames_encoded == len(frames) == 12
    features = open_video_features(out)
    assert len(features) == 12 and features.video_id == video
    np.testing.assert_array_equal(features.times_s, frames / FPS)
    direct = _encode_direct(encoder, [_jpeg(tiny.frame_path(video, int(j))) for j in frames])
    stored = features.tokens(range(12))
    assert stored.dtype == np.float32 and stored.shape == (12, 49, 1280)
    np.testing.assert_allclose(stored, direct, **FP16_TOL)
    assert np.abs(stored[0] - stored[1]).max() > 0.1  # different frames, different tokens
    meta = features.metadata
    assert meta['backend'] == encoder.name == 'onnxruntime-cpu'
    assert (meta['sample_fps'], meta['source'], meta['native_fps']) == (2.0, 'frames', FPS)
    assert (meta['frames_total'], meta['frames_sampled'], meta['frames_skipped']) == (180, 12, 0)
    assert meta['complete'] is True and meta['format'] == 'malmm_ros/features/v1'


def test_mp4_features_match_decoded_frames(
        tiny: TinyEpic, encoder: EncoderRunner, tmp_path: Path) -> None:
    video = 'P02_03'
    out = tmp_path / f'{video}.safetensors'
    result = extract_video_file(video, tiny.video_path(video), out, encoder, sample_fps=1.5,
                                batch_size=4, progress=False)
    # t_k = k / 1.5 s up to 179 / 30 s: k = 0..8, frames floor(20 k).
    frames = np.arange(9) * 20
    assert (result.frames_total, result.frames_sampled, result.frames_encoded) == (180, 9, 9)
    features = open_video_features(out)
    np.testing.assert_allclose(features.times_s, frames / FPS, rtol=0, atol=1e-12)
    assert features.metadata['source'] == 'video' and features.metadata['native_fps'] == FPS
    # An independent decode of the whole MP4 with cv2.VideoCapture.read().
    capture = cv2.VideoCapture(str(tiny.video_path(video)))
    decoded = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        decoded.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    assert len(decoded) == 180
    direct = _encode_direct(encoder, [decoded[j] for j in frames])
    np.testing.assert_allclose(features.tokens(range(9)), direct, **FP16_TOL)
    # The MP4 is lossy, but each feature frame is still nearest to the same JPEG frame's.
    jpeg = _encode_direct(encoder, [_jpeg(tiny.frame_path(video, int(j))) for j in frames])
    mp4 = features.tokens(range(9)).reshape(9, -1)
    distances = np.linalg.norm(mp4[:, None] - jpeg.reshape(9, -1)[None], axis=2)
    assert distances.argmin(axis=1).tolist() == list(range(9))


def test_torch_backend_matches_its_own_encoder(tiny: TinyEpic, tmp_path: Path) -> None:
    torch_encoder = create_encoder('torch', threads=1)
    out = tmp_path / 'feat'
    code, _, err = _cli('--frames-root', str(tiny.frames_root), '--video-info',
                        str(tiny.video_info_csv), '--out', str(out), '--sample-fps', '0.5',
                        '--backend', 'torch', '--video-id', 'P01_01')
    assert code == 0, err
    features = FeatureStore(out).open('P01_01')
    assert features.metadata['backend'] == 'torch-cpu-float32'
    np.testing.assert_array_equal(features.times_s, [0.0, 2.0, 4.0])
    direct = _encode_direct(torch_encoder,
                            [_jpeg(tiny.frame_path('P01_01', j)) for j in (0, 60, 120)])
    np.testing.assert_allclose(features.tokens([0, 1, 2]), direct, **FP16_TOL)
    # The ONNX Runtime encoder gives other features: a run with it redoes the video.
    before = _stat(out / 'P01_01.safetensors')
    code, _, err = _cli('--frames-root', str(tiny.frames_root), '--video-info',
                        str(tiny.video_info_csv), '--out', str(out), '--sample-fps', '0.5',
                        '--backend', 'onnxruntime', '--video-id', 'P01_01')
    assert code == 0, err
    assert _stat(out / 'P01_01.safetensors') != before
    assert FeatureStore(out).open('P01_01').metadata['backend'] == 'onnxruntime-cpu'


def _copy_video(tiny: TinyEpic, video: str, root: Path) -> Path:
    """The video's frames in the simple layout <root>/<video_id>/frame_*.jpg."""
    folder = root / video
    shutil.copytree(tiny.frame_path(video, 0).parent, folder)
    return folder


def test_corrupt_and_missing_frames_are_skipped_and_counted(
        tiny: TinyEpic, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / 'frames'
    folder = _copy_video(tiny, 'P01_01', root)
    # Sampled at 1 fps: frames 1, 31, 61, ... (1-based). Break two of them and one unsampled.
    data = (folder / 'frame_0000000031.jpg').read_bytes()
    (folder / 'frame_0000000031.jpg').write_bytes(data[:len(data) // 2])  # truncated scan
    (folder / 'frame_0000000091.jpg').unlink()  # missing
    (folder / 'frame_0000000092.jpg').write_bytes(b'not a jpeg')  # not sampled: no effect
    out = tmp_path / 'feat'
    code, stdout, err = _cli('--frames-root', str(root), '--fps', '30', '--out', str(out),
                             '--sample-fps', '1')
    assert code == 0, err
    logged = caplog.text
    assert 'skipped 2 of 6 sampled frames (1 missing, 1 corrupt)' in logged
    assert 'frame_0000000031.jpg (corrupt' in logged and 'frame_0000000091.jpg (missing' in logged
    features = FeatureStore(out).open('P01_01')
    np.testing.assert_array_equal(features.times_s, [0.0, 2.0, 4.0, 5.0])
    meta = features.metadata
    assert (meta['frames_sampled'], meta['frames_skipped'], meta['frames_missing'],
            meta['frames_corrupt'], meta['num_frames']) == (6, 2, 1, 1, 4)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    row = summary['videos'][0]
    assert (row['frames_encoded'], row['frames_missing'], row['frames_corrupt'],
            row['frames_skipped']) == (4, 1, 1, 2)
    assert summary['totals']['frames_skipped'] == 2
    assert 'P01_01' in stdout and 'extracted' in stdout


def test_video_without_usable_frames_fails_alone(tiny: TinyEpic, tmp_path: Path) -> None:
    root = tmp_path / 'frames'
    _copy_video(tiny, 'P01_01', root)
    broken = root / 'P09_01'
    broken.mkdir()
    (broken / 'frame_0000000001.jpg').write_bytes(b'\xff\xd8garbage')
    out = tmp_path / 'feat'
    code, _, err = _cli('--frames-root', str(root), '--fps', '30', '--out', str(out),
                        '--sample-fps', '1')
    assert code == 1
    assert 'ERROR: P09_01' in err and 'none of the 1 sampled frames' in err
    assert FeatureStore(out).video_ids() == ['P01_01']  # the good video is done anyway
    statuses = {r['video_id']: r['status']
                for r in json.loads((out / SUMMARY_FILE).read_text())['videos']}
    assert statuses == {'P01_01': 'extracted', 'P09_01': 'failed'}


def test_damaged_mp4_files(tiny: TinyEpic, tmp_path: Path,
                           caplog: pytest.LogCaptureFixture) -> None:
    videos = tmp_path / 'videos'
    videos.mkdir()
    data = tiny.video_path('P01_01').read_bytes()
    (videos / 'P01_01.MP4').write_bytes(data[:len(data) // 2])  # index lost: unreadable
    damaged = bytearray(tiny.video_path('P02_03').read_bytes())
    damaged[len(damaged) // 3:len(damaged) // 3 + 2000] = bytes(2000)  # a damaged stretch
    (videos / 'P02_03.mp4').write_bytes(bytes(damaged))
    out = tmp_path / 'feat'
    code, _, err = _cli('--videos', str(videos), '--out', str(out), '--sample-fps', '2')
    assert code == 1 and 'ERROR: P01_01: OpenCV cannot open video' in err
    summary = {r['video_id']: r for r in json.loads((out / SUMMARY_FILE).read_text())['videos']}
    assert summary['P01_01']['status'] == 'failed'
    # The damaged video yields what it can: fewer frames, a warning, a valid file.
    row = summary['P02_03']
    assert row['status'] == 'extracted' and 0 < row['frames_total'] < 180
    assert 'the container announced 180' in caplog.text
    features = FeatureStore(out).open('P02_03')
    assert len(features) == row['frames_encoded'] > 0
    assert features.times_s[-1] <= (row['frames_total'] - 1) / FPS


@pytest.mark.slow  # three extraction runs
def test_resume_skips_finished_videos_and_redoes_the_rest(tiny: TinyEpic, tmp_path: Path
                                                          ) -> None:
    out = tmp_path / 'feat'
    args = ('--frames-root', str(tiny.frames_root), '--video-info', str(tiny.video_info_csv),
            '--out', str(out), '--sample-fps', '1')
    assert _cli(*args)[0] == 0
    first, second = out / 'P01_01.safetensors', out / 'P02_03.safetensors'
    stats = {p: _stat(p) for p in (first, second)}

    code, stdout, _ = _cli(*args)
    assert code == 0 and stdout.count('existing') == 2
    assert {p: _stat(p) for p in (first, second)} == stats  # untouched
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert [r['status'] for r in summary['videos']] == ['existing', 'existing']
    assert summary['videos'][0]['frames_encoded'] == 6  # counts come from the file

    second.unlink()
    first.write_bytes(first.read_bytes()[:-1000])  # truncated: redone, not trusted
    assert _cli(*args)[0] == 0
    assert _stat(first) != stats[first] and second.is_file()
    assert len(FeatureStore(out).open('P01_01')) == 6

    stats = {p: _stat(p) for p in (first, second)}
    assert _cli(*args, '--sample-fps', '2')[0] == 0  # another rate: both redone
    assert all(_stat(p) != stats[p] for p in (first, second))
    stats = {p: _stat(p) for p in (first, second)}
    assert _cli(*args[:-2], '--sample-fps', '2', '--overwrite')[0] == 0
    assert all(_stat(p) != stats[p] for p in (first, second))
    assert not list(out.glob('*.partial'))


class _CrashingEncoder:
    """The real encoder, interrupted on its second call (Ctrl-C in the middle of a video)."""

    def __init__(self, encoder: EncoderRunner) -> None:
        self.inner, self.name, self.calls = encoder, encoder.name, 0

    def run(self, frames: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return self.inner.run(frames)


def test_interrupted_video_leaves_no_file(
        tiny: TinyEpic, encoder: EncoderRunner, tmp_path: Path) -> None:
    out = tmp_path / 'P01_01.safetensors'
    folder = tiny.frame_path('P01_01', 0).parent
    with pytest.raises(KeyboardInterrupt):
        extract_frames_dir('P01_01', folder, out, _CrashingEncoder(encoder), fps=FPS,
                           sample_fps=2.0, batch_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its .partial
    extract_frames_dir('P01_01', folder, out, encoder, fps=FPS, sample_fps=2.0,
                       progress=False)
    assert len(open_video_features(out)) == 12


def test_both_frame_layouts_are_found(tiny: TinyEpic, tmp_path: Path) -> None:
    assert find_frame_folders(tiny.frames_root) == {
        v: tiny.frame_path(v, 0).parent for v in tiny.video_ids}
    simple = tmp_path / 'simple'
    _copy_video(tiny, 'P02_03', simple)
    (simple / 'notes').mkdir()  # a folder without frames is not a video
    assert list(find_frame_folders(simple)) == ['P02_03']
    archives = tmp_path / 'archives' / 'P01' / 'rgb_frames'
    archives.mkdir(parents=True)
    (archives / 'P01_01.tar').write_bytes(b'')
    with pytest.raises(DataError, match=r'\.tar archive.*extract them first'):
        find_frame_folders(tmp_path / 'archives')


# --------------------------------------------------------------------------------------------
# Feature files
# --------------------------------------------------------------------------------------------


def _random_features(path: Path, count: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    times = np.cumsum(rng.uniform(0.1, 0.5, count))
    tokens = rng.uniform(0, 6, (count, 49, 1280)).astype(np.float32)
    write_video_features(path, 'P05_07', times, tokens, metadata={'backend': 'test'})
    return times, tokens


def test_round_trip_and_lazy_reads(tmp_path: Path) -> None:
    path = tmp_path / 'P05_07.safetensors'
    times, tokens = _random_features(path)
    plain = load_file(str(path))  # a standard safetensors file for any reader
    assert plain['tokens'].dtype == np.float16 and plain['times_s'].dtype == np.float64
    np.testing.assert_array_equal(plain['tokens'], tokens.astype(np.float16))
    features = open_video_features(path)
    np.testing.assert_array_equal(features.times_s, times)
    order = [5, 0, 5, 3, 2]
    np.testing.assert_array_equal(features.tokens(order),
                                  tokens.astype(np.float16).astype(np.float32)[order])
    assert features.tokens([]).shape == (0, 49, 1280)
    with pytest.raises(IndexError, match='out of range'):
        features.tokens([-1])  # "no frame yet" is never read as the last frame
    with pytest.raises(IndexError, match='out of range'):
        features.tokens([6])


def test_indices_at_never_returns_a_future_frame(tmp_path: Path) -> None:
    path = tmp_path / 'P05_07.safetensors'
    times, _ = _random_features(path, count=40)
    features = open_video_features(path)
    queries = np.concatenate([np.random.default_rng(2).uniform(-1, times[-1] + 1, 500), times,
                              times - 1e-3, times + 1e-3, [-np.inf, np.inf]])
    found = features.indices_at(queries)
    for query, index in zip(queries, found, strict=True):
        if query < times[0]:
            assert index == -1
        else:
            assert times[index] <= query + 1e-6  # at or before the requested time
            assert index == len(times) - 1 or times[index + 1] > query  # and the latest
    # A time computed with float rounding just below a frame's time still finds that frame.
    assert features.indices_at(times[3] - 1e-12) == 3
    assert features.indices_at(times[3] - 1e-3) == 2


def test_writer_refuses_bad_input(tmp_path: Path) -> None:
    path = tmp_path / 'P01_01.safetensors'
    good = np.zeros((2, 49, 1280), np.float32)
    with pytest.raises(DataError, match='strictly ascending'):
        write_video_features(path, 'P01_01', [1.0, 1.0], good, metadata={})
    with pytest.raises(DataError, match=r'\[T, P, C\]'):
        write_video_features(path, 'P01_01', [0.0, 1.0, 2.0], good, metadata={})
    with pytest.raises(DataError, match='float16 range'):
        write_video_features(path, 'P01_01', [0.0, 1.0], good + 1e6, metadata={})
    with pytest.raises(DataError, match='set by the writer'):
        write_video_features(path, 'P01_01', [0.0, 1.0], good, metadata={'video_id': 'x'})
    with pytest.raises(DataError, match='video_id'):
        write_video_features(path, '../evil', [0.0, 1.0], good, metadata={})
    with FeatureWriter(path, 'P01_01') as writer:
        writer.append([0.0], good[:1])
        with pytest.raises(DataError, match='not after the previous'):
            writer.append([0.0], good[:1])
        with pytest.raises(DataError, match='per frame'):
            writer.append([1.0], np.zeros((1, 10, 1280)))
    assert list(tmp_path.iterdir()) == []  # nothing committed, nothing left


@pytest.mark.parametrize('case', ['truncated', 'foreign', 'garbage', 'other_format', 'empty'])
def test_bad_feature_files_name_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / 'P05_07.safetensors'
    if case == 'truncated':
        _random_features(path)
        path.write_bytes(path.read_bytes()[:-5000])
    elif case == 'foreign':  # a valid safetensors file of someone else's
        save_file({'weight': np.zeros((3, 3), np.float32)}, str(path))
    elif case == 'garbage':
        path.write_bytes(os.urandom(3000))
    elif case == 'other_format':
        save_file({'tokens': np.zeros((1, 49, 1280), np.float16),
                   'times_s': np.zeros(1, np.float64)}, str(path),
                  metadata={'malmm_ros': json.dumps({'format': 'malmm_ros/checkpoint/v1'})})
    else:
        path.write_bytes(b'')
    with pytest.raises(DataError) as info:
        open_video_features(path)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match='P05_07'):
        FeatureStore(tmp_path).open('P05_07')


def test_feature_store(tmp_path: Path) -> None:
    _random_features(tmp_path / 'P05_07.safetensors')
    (tmp_path / 'P05_08.safetensors.partial').write_bytes(b'half')  # an interrupted write
    shutil.copy(tmp_path / 'P05_07.safetensors', tmp_path / 'P05_09.safetensors')
    store = FeatureStore(tmp_path)
    assert store.video_ids() == ['P05_07', 'P05_09']
    assert store.open('P05_07') is store.open('P05_07')  # cached
    assert store.metadata('P05_07')['backend'] == 'test'
    assert store.path('P05_07') == tmp_path / 'P05_07.safetensors'
    with pytest.raises(DataError, match="holds video 'P05_07', not 'P05_09'"):
        store.open('P05_09')
    with pytest.raises(DataError, match='no features for video .P05_08.*malmm-extract'):
        store.open('P05_08')
    with pytest.raises(DataError, match='does not exist'):
        FeatureStore(tmp_path / 'nowhere')


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # the malmm-extract process
def test_console_script_runs(tiny: TinyEpic, tmp_path: Path) -> None:
    assert SCRIPT.exists(), f'{SCRIPT} missing: pip install -e . first'
    out = tmp_path / 'feat'
    result = subprocess.run(
        [str(SCRIPT), '--videos', str(tiny.videos_dir), '--out', str(out), '--sample-fps',
         '0.5', '--video-id', 'P01_01', '--threads', '1'],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f'1 of 1 videos ready in {out}' in result.stdout
    assert len(FeatureStore(out).open('P01_01')) == 3


@pytest.mark.parametrize(('case', 'message'), [
    ('missing_root', 'frames root .*nowhere is not a folder'),
    ('no_videos', 'no videos found under --frames-root'),
    ('no_mp4', 'no videos found in --videos'),
    ('unknown_id', '--video-id P77_77 not found under .* \\(found 2: P01_01, P02_03\\)'),
    ('bad_info', "line 2, column 'fps': expected a number, got 'fast'"),
    ('bad_rate', '--sample-fps must be >= 0'),
    ('out_is_file', '--out .* exists and is not a folder'),
])
def test_bad_arguments(tiny: TinyEpic, tmp_path: Path, case: str, message: str) -> None:
    frames = ['--frames-root', str(tiny.frames_root), '--video-info', str(tiny.video_info_csv)]
    out = ['--out', str(tmp_path / 'feat')]
    empty = tmp_path / 'empty'
    empty.mkdir()
    if case == 'missing_root':
        args = ['--frames-root', str(tmp_path / 'nowhere'), '--fps', '30', *out]
    elif case == 'no_videos':
        args = ['--frames-root', str(empty), '--fps', '30', *out]
    elif case == 'no_mp4':
        args = ['--videos', str(empty), *out]
    elif case == 'unknown_id':
        args = [*frames, *out, '--video-id', 'P01_01', 'P77_77']
    elif case == 'bad_info':
        info = tmp_path / 'info.csv'
        info.write_text('video_id,duration,fps,resolution\nP01_01,6.0,fast,128x96\n')
        args = ['--frames-root', str(tiny.frames_root), '--video-info', str(info), *out]
    elif case == 'bad_rate':
        args = [*frames, *out, '--sample-fps', '-2']
    else:
        (tmp_path / 'file').write_text('')
        args = [*frames, '--out', str(tmp_path / 'file')]
    code, _, err = _cli(*args)
    assert code == 1
    assert err.startswith('ERROR: ') and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / 'feat').exists()  # nothing written on bad arguments


def test_frames_root_and_videos_are_exclusive(tiny: TinyEpic, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        extract_cli.main(['--frames-root', str(tiny.frames_root), '--videos',
                          str(tiny.videos_dir), '--out', str(tmp_path)])
    assert info.value.code == 2
    assert 'not allowed with argument' in capsys.readouterr().err


def test_frames_default_to_the_ek100_60_fps_grid(tiny: TinyEpic) -> None:
    from malmm_ros.cli.extract import find_sources

    sources = find_sources(frames_root=str(tiny.frames_root))
    assert {s.fps for s in sources} == {60.0}
    listed = find_sources(frames_root=str(tiny.frames_root), video_info=str(tiny.video_info_csv))
    assert {s.fps for s in listed} == {tiny.fps}
