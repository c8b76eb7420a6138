"""Simulated time (issue 14 item 4): the node with use_sim_time and a /clock, over real DDS.

- before any /clock the node reports "waiting for /clock", not a starved camera;
- /diagnostics stamps follow /clock, and values say `clock: sim` and `silence_s`;
- a paused /clock is no dead camera, however long the wall-clock wait (the diagnostics timer
  runs on the steady clock, so the node keeps reporting meanwhile); sim time that advances
  without frames is starved, and the ERROR says it is sim time;
- use_sim_time switched off at run time: wall time again (the default node's starved ERROR is
  test_node_input_checks.py's);
- `malmm-replay --clock` drives a node with use_sim_time: /clock within the bag's time range and
  increasing, diagnostics stamped with it, predictions, and no starved ERROR once the bag ends.

Every wait is for messages (counted, or matched by their stamp), never for a duration, and
checks that the node is alive.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock

from malmm_ros.data.bags import write_camera_bag
from malmm_ros.data.sample_stream import panning_frames
from support.domains import domain_ids
from support.frames import photo
from support.ros_driver import (
    CAMERA_TOPIC,
    WAIT_S,
    NodeSession,
    raw_image,
    ros_env,
    running_session,
    stamp_ns_of,
    to_time,
)

# The node fed a hand-made /clock; the node fed by malmm-replay --clock; two spare ids.
SIM_DOMAIN_ID, REPLAY_DOMAIN_ID = domain_ids(__file__)
S = 1_000_000_000
STALE_AFTER_S = 1.0
PARAMS = ['use_sim_time:=true', f'stale_after_s:={STALE_AFTER_S}', 'sample_fps:=0.0',
          'max_gap_s:=0.0', 'memory_bank_length:=4']
HEIGHT, WIDTH = 64, 96
PHOTO = photo(HEIGHT, WIDTH, 3).tobytes()
WARN = int.from_bytes(DiagnosticStatus.WARN, 'little')
ERROR = int.from_bytes(DiagnosticStatus.ERROR, 'little')
REPLAY = Path(sys.executable).with_name('malmm-replay')
BAG_START_NS = 1_700_000_000_250_000_000
# rclpy's TimeSource subscribes with depth 1, best effort: the publisher matches it.
CLOCK_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                       reliability=ReliabilityPolicy.BEST_EFFORT,
                       durability=DurabilityPolicy.VOLATILE)
_bases = itertools.count(1)  # each test's sim time starts 100 s after the previous one's


def _frame(stamp_ns: int) -> Any:
    return raw_image('rgb8', WIDTH, HEIGHT, WIDTH * 3, PHOTO, stamp_ns)


def _new_statuses(session: NodeSession, count: int, *, after: int | None = None
                  ) -> list[dict[str, Any]]:
    """The next `count` node statuses received after index `after` (default: now)."""
    start = len(session.diagnostics) if after is None else after
    session.wait_until(lambda: len(session.diagnostics) >= start + count,
                       f'{count} more /diagnostics messages')
    return session.diagnostics.items()[start:start + count]


class SimClock:
    """/clock from the test, as a simulator or `ros2 bag play --clock` publishes it."""

    def __init__(self, session: NodeSession) -> None:
        self.session = session
        self.publisher = session.driver.node.create_publisher(Clock, '/clock', CLOCK_QOS)

    def publish(self, stamp_ns: int) -> None:
        self.publisher.publish(Clock(clock=to_time(stamp_ns)))

    def set(self, stamp_ns: int) -> dict[str, Any]:
        """Publish `stamp_ns` (again and again: best effort) until a status stamped with it
        shows that the node's clock reads it; that status."""
        start = len(self.session.diagnostics)

        def adopted() -> dict[str, Any] | None:
            self.publish(stamp_ns)
            for status in self.session.diagnostics.items()[start:]:
                if status['stamp_ns'] == stamp_ns:
                    return status
            return None
        return self.session.wait_until(adopted, f'the node on sim time {stamp_ns}')


@pytest.fixture(scope='module')
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSession]:
    # Ready means a status came: published before this module sends any /clock.
    yield from running_session(SIM_DOMAIN_ID, PARAMS, log_dir=tmp_path_factory.mktemp('sim'))


@pytest.fixture(scope='module')
def clock(session: NodeSession) -> SimClock:
    return SimClock(session)


def _fresh_start(session: NodeSession, clock: SimClock) -> int:
    """A sim time of this test's own, with a frame received at it (silence 0 from there)."""
    base = 10_000 * S + next(_bases) * 100 * S
    clock.set(base)
    session.predict(_frame, 'a prediction at the fresh sim time')
    return base


def test_waiting_for_clock_before_the_first(session: NodeSession) -> None:
    first = session.diagnostics.items()[0]  # received before any /clock was published
    assert first['stamp_ns'] == 0  # a sim-time node's clock reads 0 until /clock
    assert first['level'] == WARN
    assert 'waiting for /clock' in first['message']
    assert first['values']['clock'] == 'sim'
    assert first['values']['silence_s'] == 'waiting for /clock'


def test_diagnostics_follow_sim_time(session: NodeSession, clock: SimClock) -> None:
    base = _fresh_start(session, clock)
    status = clock.set(base + S // 2)
    assert status['values']['clock'] == 'sim'
    assert status['values']['silence_s'] == '0.5'  # sim time since the frame, exactly
    assert status['level'] != ERROR
    later = clock.set(base + S // 2 + 123_456_789)
    assert later['stamp_ns'] == base + S // 2 + 123_456_789


def test_paused_clock_is_not_a_dead_camera(session: NodeSession, clock: SimClock) -> None:
    base = _fresh_start(session, clock)
    # Four more reports: over 3 s of wall time (> stale_after_s) with sim time standing still.
    # That they come at all shows the diagnostics timer does not run on sim time.
    statuses = _new_statuses(session, 4)
    for status in statuses:
        assert status['stamp_ns'] == base, status
        assert status['level'] != ERROR, status
        assert status['values']['silence_s'] == '0.0', status
    # The wall time that passed is no silence once sim time moves on either.
    assert clock.set(base + S // 2)['values']['silence_s'] == '0.5'


def test_sim_time_without_frames_is_starved(session: NodeSession, clock: SimClock) -> None:
    base = _fresh_start(session, clock)
    status = clock.set(base + 3 * S)  # sim time ran 3 s (> stale_after_s), no frame came
    assert status['level'] == ERROR, status
    assert status['message'].startswith(f'no frames on {CAMERA_TOPIC} for 3.0 s of sim time;')
    assert status['values']['silence_s'] == '3.0'
    assert status['values']['clock'] == 'sim'
    # A frame ends it.
    session.predict(_frame, 'a prediction after the silence')
    after = _new_statuses(session, 2)[-1]
    assert after['level'] != ERROR, after
    assert after['values']['silence_s'] == '0.0'


def test_use_sim_time_off_counts_wall_time(session: NodeSession, clock: SimClock) -> None:
    _fresh_start(session, clock)
    try:
        assert all(r.successful for r in session.set_parameters(use_sim_time=False))
        # No frames: starved after stale_after_s of wall time, and no mention of sim time.
        status = session.wait_until(
            lambda: next((s for s in session.diagnostics.items()
                          if s['values'].get('clock') == 'wall' and s['level'] == ERROR), None),
            'a starved status in wall time')
        assert status['message'].startswith(f'no frames on {CAMERA_TOPIC} for ')
        assert 'sim time' not in status['message']
        assert float(status['values']['silence_s']) > STALE_AFTER_S
        assert status['stamp_ns'] > 1_600_000_000 * S  # system time stamps again
    finally:
        assert all(r.successful for r in session.set_parameters(use_sim_time=True))
    assert _new_statuses(session, 2)[-1]['values']['clock'] == 'sim'


# -- malmm-replay --clock -------------------------------------------------------------------


@pytest.fixture
def replay_session(tmp_path: Path) -> Iterator[NodeSession]:
    yield from running_session(REPLAY_DOMAIN_ID, PARAMS, log_dir=tmp_path / 'node')


def test_replay_clock_drives_the_node(tmp_path: Path, replay_session: NodeSession) -> None:
    session = replay_session
    bag = tmp_path / 'bag'
    frames = panning_frames(4.0, 10.0, size=(HEIGHT, WIDTH), start_ns=BAG_START_NS)
    write_camera_bag(bag, frames, topic='/recorded/image_raw', frame_id='replay_cam')
    first, last = BAG_START_NS, BAG_START_NS + 39 * S // 10  # 40 frames, 0.1 s apart
    _, clocks = session.driver.subscribe(
        Clock, '/clock', QoSProfile(depth=1000, reliability=ReliabilityPolicy.BEST_EFFORT),
        convert=lambda m: stamp_ns_of(m.clock))
    before = len(session.diagnostics)

    assert REPLAY.exists(), f'{REPLAY} missing: pip install -e . first'
    out, err = tmp_path / 'replay.out', tmp_path / 'replay.err'
    with open(out, 'wb') as stdout, open(err, 'wb') as stderr:
        replay = subprocess.Popen([str(REPLAY), str(bag), '--topic', CAMERA_TOPIC, '--clock',
                                   '--wait-subscribers', '1', '--wait-timeout', str(WAIT_S)],
                                  env=ros_env(REPLAY_DOMAIN_ID),
                                  stdout=stdout, stderr=stderr)
    try:
        session.wait_until(lambda: replay.poll() is not None, 'malmm-replay to finish',
                           timeout=2 * WAIT_S)
    finally:
        if replay.poll() is None:
            replay.kill()
            replay.wait(timeout=15)
    assert replay.returncode == 0, err.read_text()
    assert 'published 40 messages' in out.read_text()
    # The bag has ended: sim time stands at its end. Three reports of that.
    ended = _new_statuses(session, 3)

    seen = clocks.items()
    assert len(seen) >= 10, seen  # 40 Hz over 4 s; best effort may lose some, not most
    assert all(first <= t <= last for t in seen), [t - first for t in seen]
    assert seen == sorted(seen) and seen[-1] > seen[0]  # increasing, never back

    during = [s for s in session.diagnostics.items()[before:] if s['stamp_ns'] != 0]
    assert during, 'no status on sim time'
    assert all(first <= s['stamp_ns'] <= last for s in during), during
    assert all(s['values']['clock'] == 'sim' for s in during)
    stamps = [s['stamp_ns'] for s in during]
    assert stamps == sorted(stamps)

    predictions = [stamp_ns_of(p['stamp']) for p in session.actions.items()]
    assert predictions and all(first <= t <= last for t in predictions), predictions
    # A finished bag is a paused clock, not a dead camera.
    for status in ended:
        assert status['level'] != ERROR, status
        assert first <= status['stamp_ns'] <= last
        assert float(status['values']['silence_s']) < STALE_AFTER_S, status
