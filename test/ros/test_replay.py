"""malmm-replay over real DDS: a replay process and a collecting subscriber process.

Both run as separate processes with their own ROS_DOMAIN_ID (localhost discovery only), so
this test process never initialises rclpy. The subscriber (test/support/collect.py) writes what it
received as JSON; the test compares it with the bag read back by rosbags.

The --clock pieces (bag time from the schedule, the tick grid, replay() moving the clock) are
checked here without DDS, on a virtual monotonic clock; /clock over DDS into a node with
use_sim_time is test_sim_time.py's.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from malmm_ros.data.bags import image_topics, read_camera_frames, write_camera_bag
from malmm_ros.data.sample_stream import panning_frames
from malmm_ros.ros import replay as replay_module
from malmm_ros.ros.replay import BagClock, bag_time_ns, main, next_tick, replay
from support.domains import domain_ids

REPLAY = Path(sys.executable).with_name('malmm-replay')
COLLECT = Path(__file__).resolve().parents[1] / 'support' / 'collect.py'
START_NS = 1_700_000_000_250_000_000
COLLECT_S = 60.0  # how long the subscriber waits for its messages: generous, a hang guard
WAIT_S = 2 * COLLECT_S  # for any process to end (the subscriber's start-up and wait included)

_domains = itertools.cycle(domain_ids(__file__))  # each test the next id of this file's
_counter = itertools.count()


@pytest.fixture
def ros_env() -> dict[str, str]:
    env = dict(os.environ)
    env['ROS_DOMAIN_ID'] = str(next(_domains))
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env['PYTHONUNBUFFERED'] = '1'
    return env


class _Procs:
    """Processes started by a test: stdout/stderr go to files; all are killed at the end."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env, self.procs = folder, env, []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.folder / f'{name}.out', 'wb') as out, \
                open(self.folder / f'{name}.err', 'wb') as err:
            proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=err)
        self.procs.append(proc)
        return proc

    def output(self, name: str) -> tuple[str, str]:
        return tuple((self.folder / f'{name}.{kind}').read_text(errors='replace')
                     for kind in ('out', 'err'))

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def procs(tmp_path: Path, ros_env: dict[str, str]) -> Iterator[_Procs]:
    started = _Procs(tmp_path, ros_env)
    try:
        yield started
    finally:
        started.kill_all()


def _bag(tmp_path: Path, topic: str, *, compressed: bool = False, storage: str = 'sqlite3'
         ) -> Path:
    path = tmp_path / 'bag'
    frames = panning_frames(2.0, 10.0, size=(64, 80), start_ns=START_NS)
    write_camera_bag(path, frames, topic=topic, compressed=compressed, storage=storage,
                     frame_id='replay_cam')
    return path


def _expected(bag: Path) -> list[dict[str, object]]:
    return [{'stamp_ns': f.stamp_ns, 'frame_id': f.frame_id, 'height': f.image.shape[0],
             'width': f.image.shape[1], 'sha256': hashlib.sha256(f.image.tobytes()).hexdigest()}
            for f in read_camera_frames(bag)]


def _bag_topic(bag: Path) -> str:
    (topic,) = image_topics(bag)
    return topic


def _unique_topic(tag: str) -> str:
    return f'/replay_test_{os.getpid()}_{next(_counter)}/{tag}'


def _collect(procs: _Procs, topic: str, count: int, out: Path, *, compressed: bool = False,
             best_effort: bool = False, timeout: float = COLLECT_S
             ) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(COLLECT), '--topic', topic, '--count', str(count),
            '--out', str(out), '--timeout', str(timeout),
            '--type', 'compressed' if compressed else 'raw']
    return procs.start('collect', argv + (['--best-effort'] if best_effort else []))


def _replay(procs: _Procs, bag: Path, *args: str) -> subprocess.Popen[bytes]:
    assert REPLAY.exists(), f'{REPLAY} missing: pip install -e . first'
    return procs.start('replay', [str(REPLAY), str(bag), *args])


def _finish(proc: subprocess.Popen[bytes]) -> int:
    return proc.wait(timeout=WAIT_S)


@pytest.mark.parametrize(('storage', 'compressed', 'rate'),
                         [('sqlite3', False, '1.0'), ('mcap', True, '4.0')],
                         ids=['raw-sqlite3-rate1', 'compressed-mcap-rate4'])
def test_every_message_arrives_in_order(tmp_path: Path, procs: _Procs, storage: str,
                                        compressed: bool, rate: str) -> None:
    base = _unique_topic('image_raw')
    bag = _bag(tmp_path, base, compressed=compressed, storage=storage)
    topic = base + '/compressed' if compressed else base
    expected = _expected(bag)
    assert len(expected) == 20

    collector = _collect(procs, topic, len(expected), tmp_path / 'got.json',
                         compressed=compressed)
    replay = _replay(procs, bag, '--wait-subscribers', '1', '--rate', rate)
    assert _finish(replay) == 0, procs.output('replay')
    assert _finish(collector) == 0, procs.output('collect')

    got = json.loads((tmp_path / 'got.json').read_text())
    assert not got['timed_out'], f'{len(got["messages"])} of {len(expected)} arrived'
    assert got['messages'] == expected  # same order, stamps, frame_id and decoded pixels
    stdout, stderr = procs.output('replay')
    assert 'published 20 messages' in stdout
    assert 'Traceback' not in stderr


def test_topic_is_renamed(tmp_path: Path, procs: _Procs) -> None:
    bag = _bag(tmp_path, _unique_topic('image_raw'))
    renamed = _unique_topic('renamed')
    collector = _collect(procs, renamed, 20, tmp_path / 'got.json')
    replay = _replay(procs, bag, '--topic', renamed, '--wait-subscribers', '1',
                     '--rate', '4')
    assert _finish(replay) == 0, procs.output('replay')
    assert _finish(collector) == 0, procs.output('collect')
    got = json.loads((tmp_path / 'got.json').read_text())
    assert got['messages'] == _expected(bag)


def test_loop_repeats_the_bag(tmp_path: Path, procs: _Procs) -> None:
    bag = _bag(tmp_path, _unique_topic('image_raw'))
    expected = [m['stamp_ns'] for m in _expected(bag)]
    wanted = len(expected) + 8
    # A best-effort subscriber also matches the replay's reliable publisher.
    collector = _collect(procs, _bag_topic(bag), wanted, tmp_path / 'got.json',
                         best_effort=True)
    replay = _replay(procs, bag, '--loop', '--rate', '4', '--wait-subscribers', '1')
    assert _finish(collector) == 0, procs.output('collect')
    assert replay.poll() is None, procs.output('replay')  # still looping
    replay.send_signal(signal.SIGINT)
    assert _finish(replay) == 0, procs.output('replay')

    stamps = [m['stamp_ns'] for m in json.loads((tmp_path / 'got.json').read_text())['messages']]
    assert len(stamps) == wanted > len(expected)
    jumps = [i for i in range(1, len(stamps)) if stamps[i] < stamps[i - 1]]
    assert jumps, 'stamps never went back: the bag did not repeat'
    assert set(stamps) <= set(expected)
    first_pass = stamps[:jumps[0]]
    assert first_pass == sorted(set(first_pass))  # in order within a pass


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_signal_gives_clean_exit(tmp_path: Path, procs: _Procs, signum: int) -> None:
    bag = _bag(tmp_path, _unique_topic('image_raw'))
    collector = _collect(procs, _bag_topic(bag), 3, tmp_path / 'got.json')
    replay = _replay(procs, bag, '--loop', '--wait-subscribers', '1')
    assert _finish(collector) == 0, procs.output('collect')  # so replay is publishing now
    assert replay.poll() is None, procs.output('replay')
    replay.send_signal(signum)
    assert _finish(replay) == 0, procs.output('replay')
    stdout, stderr = procs.output('replay')
    assert 'Traceback' not in stderr, stderr
    assert re.search(r'published \d+ messages .*\(interrupted\)', stdout), stdout


def test_bad_bag_is_an_error(tmp_path: Path, procs: _Procs) -> None:
    replay = _replay(procs, tmp_path / 'no_such_bag')
    assert _finish(replay) == 1
    stdout, stderr = procs.output('replay')
    assert stderr.startswith('ERROR: ') and 'no_such_bag' in stderr, stderr
    assert 'Traceback' not in stderr


# -- --clock, without DDS ---------------------------------------------------------------------

S = 1_000_000_000


@pytest.mark.parametrize('value', ['0', '-1', 'nan', 'inf', '1001', 'abc', ''])
def test_bad_clock_rate_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   value: str) -> None:
    bag = _bag(tmp_path, '/replay_clock_args/image_raw')
    assert main([str(bag), '--clock', value, '--wait-subscribers', '0']) == 1
    err = capsys.readouterr().err
    assert err.startswith('ERROR: --clock must be a frequency in Hz, above 0 and at most 1000'
                          ), err
    assert repr(value) in err


@pytest.mark.parametrize(('argv', 'hz'), [(['BAG', '--clock'], 40.0),
                                          (['--clock', 'BAG'], 40.0),
                                          (['BAG', '--clock', '--rate', '2'], 40.0),
                                          (['BAG', '--clock', '12.5'], 12.5),
                                          (['--clock=5', 'BAG'], 5.0),
                                          (['BAG'], None)])
def test_clock_argument_forms(tmp_path: Path, argv: list[str], hz: float | None) -> None:
    """A bare --clock is rosbag2's 40 Hz wherever it stands, even right before the bag."""
    bag = _bag(tmp_path, '/replay_clock_args/image_raw')
    args = replay_module._parse([str(bag) if a == 'BAG' else a for a in argv])
    assert Path(args.bag) == bag
    replay_module._plan(args)
    assert args.clock == hz


def test_bag_time_follows_the_schedule_at_the_rate() -> None:
    def at(wall_ns: int, rate: float) -> int:
        return bag_time_ns(wall_ns, anchor_wall_ns=10 * S, anchor_bag_ns=1_000 * S, rate=rate)
    assert at(10 * S, 1.0) == 1_000 * S
    assert at(12 * S, 1.0) == 1_002 * S
    assert at(12 * S, 4.0) == 1_008 * S  # --rate 4: bag time runs 4 times as fast
    assert at(12 * S, 0.5) == 1_001 * S
    assert at(9 * S, 1.0) == 1_000 * S  # never before the anchor


def test_tick_grid_skips_missed_ticks_without_drift() -> None:
    period = 25_000_000  # 40 Hz
    assert next_tick(0, period, 1_000_000) == period  # on time
    assert next_tick(0, period, period) == 2 * period  # exactly due: the next one
    # 100 ms late (a busy machine): one tick at the next grid point, not four at once.
    assert next_tick(0, period, 101_000_000) == 5 * period
    due = 0
    for now in range(0, 10 * S, 7_000_000):  # any wake-up pattern stays on the grid
        if now >= due:
            due = next_tick(due, period, now)
            assert due % period == 0 and due > now


def test_bag_clock_holds_runs_and_holds() -> None:
    clock = BagClock(1_000 * S, rate=2.0)
    assert clock.now(5 * S) == clock.now(500 * S) == 1_000 * S  # held before the first message
    clock.run(10 * S, 1_000 * S)
    assert clock.now(11 * S) == 1_002 * S
    clock.hold(1_003 * S)
    assert clock.now(100 * S) == 1_003 * S
    clock.run(200 * S, 1_000 * S)  # the next pass of a looped bag: back to its start
    assert clock.now(200 * S) == 1_000 * S


def test_bag_clock_never_runs_past_the_end() -> None:
    clock = BagClock(1_000 * S, end_ns=1_004 * S)
    clock.run(10 * S, 1_000 * S)
    assert clock.now(13 * S) == 1_003 * S
    assert clock.now(15 * S) == clock.now(60 * S) == 1_004 * S


class _VirtualTime:
    """time.monotonic / monotonic_ns / sleep of the replay module on a clock the test owns, so
    that replay()'s schedule and its clock are checked exactly, whatever the machine's load."""

    def __init__(self) -> None:
        self.now_ns = 1_000 * S

    def monotonic(self) -> float:
        return self.now_ns / 1e9

    def monotonic_ns(self) -> int:
        return self.now_ns

    def sleep(self, seconds: float) -> None:
        self.now_ns += max(1, round(seconds * 1e9))


class _ClockedPublisher:
    """Records (bag clock, message stamp) at every publish."""

    def __init__(self, clock: BagClock, virtual: _VirtualTime) -> None:
        self.clock, self.virtual = clock, virtual
        self.seen: list[tuple[int, int]] = []

    def publish(self, rawdata: bytes) -> None:
        self.seen.append((self.clock.now(self.virtual.now_ns), len(self.seen)))


@pytest.mark.parametrize('rate', [1.0, 4.0, 0.5])
def test_replay_clock_shows_each_messages_log_time(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   rate: float) -> None:
    bag = _bag(tmp_path, '/replay_clock/image_raw')
    logs = [f.stamp_ns for f in read_camera_frames(bag)]  # log time == stamp in these bags
    virtual = _VirtualTime()
    monkeypatch.setattr(replay_module, 'time', virtual)
    clock = BagClock(logs[0], rate)
    publisher = _ClockedPublisher(clock, virtual)
    start = virtual.now_ns
    stats = replay(bag, {_bag_topic(bag): publisher}, rate=rate, clock=clock)
    assert stats.published == len(logs)
    shown = [c for c, _ in publisher.seen]
    assert all(abs(c - log) <= 1_000 for c, log in zip(shown, logs, strict=True)), \
        [(c - log) for c, log in zip(shown, logs, strict=True)]
    assert clock.now(virtual.now_ns + 100 * S) == logs[-1]  # held at the end
    elapsed = virtual.now_ns - start
    assert abs(elapsed - (logs[-1] - logs[0]) / rate) <= 1_000_000  # and the schedule kept


def test_looped_replay_clock_jumps_back_with_the_bag(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bag = _bag(tmp_path, '/replay_clock/image_raw')
    logs = [f.stamp_ns for f in read_camera_frames(bag)]
    virtual = _VirtualTime()
    monkeypatch.setattr(replay_module, 'time', virtual)
    clock = BagClock(logs[0], 2.0)
    publisher = _ClockedPublisher(clock, virtual)
    wanted = 2 * len(logs) + 3
    stats = replay(bag, {_bag_topic(bag): publisher}, rate=2.0, loop=True,
                   ok=lambda: len(publisher.seen) < wanted, clock=clock)
    assert stats.interrupted and stats.loops == 2
    shown = [c for c, _ in publisher.seen]
    expected = (logs * 3)[:wanted]
    assert all(abs(c - log) <= 1_000 for c, log in zip(shown, expected, strict=True))
    jumps = [i for i in range(1, len(shown)) if shown[i] < shown[i - 1]]
    assert jumps == [len(logs), 2 * len(logs)]
