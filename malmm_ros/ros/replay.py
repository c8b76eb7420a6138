"""malmm-replay: publish a bag's camera messages over ROS 2 with their original timing.

A small `ros2 bag play` stand-in for camera bags (Image and CompressedImage topics), so the
anticipation node can be run and tested against a recorded camera without rosbag2 installed.
Messages go out as the bag's serialized CDR bytes, untouched: header stamps and frame_id are the
recorded ones. Gaps between messages are the bag's log-time gaps divided by --rate, scheduled
against a monotonic clock so that publishing delays do not accumulate.

By default it waits (up to --wait-timeout s, with a message) for one subscriber on every topic
before the first message, so a node started just before is not missing the bag's first
seconds; `--wait-subscribers 0` starts at once. The package's Fast DDS profile is applied when
FASTDDS_DEFAULT_PROFILES_FILE is not set (camera-sized frames need its buffers).

--topic T replaces the bag's topic exactly (for a compressed bag give the full name, e.g.
/cam/image_raw/compressed); it needs a bag with a single image topic.

--clock [HZ] also publishes rosgraph_msgs/Clock on /clock at HZ (default 40, as `ros2 bag play
--clock`): the bag's log time, advancing at --rate while messages play, so that a node with
use_sim_time runs on the bag's time. It holds the first message's time from before the first
message (while waiting for subscribers too) and the last one's after the end; with --loop it
jumps back to the start as the bag restarts. QoS is rclpy's /clock subscription's: keep last 1,
best effort, volatile.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rclpy
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.publisher import Publisher
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.utilities import remove_ros_args
from rosgraph_msgs.msg import Clock
from tqdm import tqdm

from malmm_ros.data.bags import bag_info, image_topics, iter_bag_messages
from malmm_ros.errors import DataError, MalmmError
from malmm_ros.ros.dds_profile import apply_default_profile

__all__ = ['CLOCK_HZ', 'MAX_CLOCK_HZ', 'NODE_NAME', 'WAIT_SUBSCRIBERS_TIMEOUT_S', 'BagClock',
           'ReplayStats', 'bag_time_ns', 'main', 'next_tick', 'replay']

_LOG = logging.getLogger(__name__)

NODE_NAME = 'malmm_replay'
WAIT_SUBSCRIBERS_TIMEOUT_S = 30.0  # an explicit --wait-subscribers N: then an error
DEFAULT_WAIT_S = 10.0  # the default wait for one subscriber: then play anyway
_POLL_S = 0.05  # longest sleep between shutdown checks
_ACK_TIMEOUT_S = 5.0
CLOCK_HZ = 40.0  # --clock without a value: rosbag2's default
MAX_CLOCK_HZ = 1000.0  # more only burns the CPU the node needs (sim time needs no finer grain)

# Reliable publishers match both reliable and best-effort subscriptions (a best-effort
# publisher would not match a reliable one); depth 10 keeps a slow subscriber from making us
# hold an unbounded backlog.
_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                  reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
# rclpy's TimeSource subscribes to /clock with depth 1, best effort (rclcpp's ClockQoS): only
# the newest time matters, and a reliable publisher would buy nothing.
_CLOCK_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                        reliability=ReliabilityPolicy.BEST_EFFORT,
                        durability=DurabilityPolicy.VOLATILE)


def bag_time_ns(wall_ns: int, *, anchor_wall_ns: int, anchor_bag_ns: int, rate: float) -> int:
    """Bag time at monotonic `wall_ns` when bag time `anchor_bag_ns` was due at
    `anchor_wall_ns` and time runs at `rate`: replay()'s schedule read backwards, so a message
    goes out when the clock shows its log time. Never before the anchor."""
    return anchor_bag_ns + max(0, round((wall_ns - anchor_wall_ns) * rate))


def next_tick(due_ns: int, period_ns: int, now_ns: int) -> int:
    """The tick after `due_ns` on a fixed grid: ticks missed on a busy machine are skipped,
    never sent in a burst, and the grid never drifts."""
    due_ns += period_ns
    if due_ns <= now_ns:
        due_ns += (now_ns - due_ns) // period_ns * period_ns + period_ns
    return due_ns


class BagClock:
    """The time /clock shows: held (before the first message, after the end) or running at
    `rate` from the newest anchor (each pass's first message), never past `end_ns` (a replay
    without --loop: between its last message and hold() a tick must not overshoot the bag).
    Thread-safe: replay() moves it, the publishing thread reads it."""

    def __init__(self, start_bag_ns: int, rate: float = 1.0, *, end_ns: int | None = None
                 ) -> None:
        self.rate, self.end_ns = rate, end_ns
        self._lock = threading.Lock()
        self._held: int | None = start_bag_ns
        self._anchor = (0, start_bag_ns)

    def run(self, wall_ns: int, bag_ns: int) -> None:
        """Bag time `bag_ns` is due at monotonic `wall_ns`; time runs from there."""
        with self._lock:
            self._held, self._anchor = None, (wall_ns, bag_ns)

    def hold(self, bag_ns: int | None = None) -> None:
        """Stop at `bag_ns` (the last message's time), or where the clock is now."""
        now = self.now(time.monotonic_ns()) if bag_ns is None else bag_ns
        with self._lock:
            self._held = now

    def now(self, wall_ns: int) -> int:
        with self._lock:
            if self._held is not None:
                return self._held
            anchor_wall, anchor_bag = self._anchor
        now = bag_time_ns(wall_ns, anchor_wall_ns=anchor_wall, anchor_bag_ns=anchor_bag,
                          rate=self.rate)
        return now if self.end_ns is None else min(now, self.end_ns)


@dataclass
class ReplayStats:
    """What a replay did: messages published, completed passes over the bag, wall seconds."""

    published: int = 0
    loops: int = 0
    wall_s: float = 0.0
    interrupted: bool = False


def _sleep_until(deadline: float, ok: Callable[[], bool]) -> bool:
    """Sleep until monotonic time `deadline` in short steps; False as soon as `ok()` is False."""
    while True:
        if not ok():
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        time.sleep(min(remaining, _POLL_S))


def _message_class(msgtype: str) -> type:
    package, _, name = msgtype.split('/')
    return getattr(importlib.import_module(f'{package}.msg'), name)


def replay(bag: str | Path, publishers: dict[str, Publisher], *, rate: float = 1.0,
           loop: bool = False, ok: Callable[[], bool] = lambda: True,
           stats: ReplayStats | None = None, progress_total: int | None = None,
           clock: BagClock | None = None) -> ReplayStats:
    """Publish the messages of the bag topics in `publishers` (bag topic -> publisher).

    Message i goes out at start + (log_i - log_0) / rate on the monotonic clock. With `loop`
    the bag repeats forever, each pass one mean frame interval after the previous one's last
    message (stamps repeat: subscribers see time jump back). Stops early when `ok()` is False.
    A `clock` runs from each pass's first message (due time, log time) and is held at the last
    message's time when the replay ends.
    """
    if not rate > 0:
        raise DataError(f'--rate must be > 0, got {rate}')
    stats = stats if stats is not None else ReplayStats()
    start = time.monotonic()
    last: int | None = None
    offset_ns = 0  # bag time of the current pass's first message, relative to the first pass
    bar = tqdm(total=progress_total, desc='replay', unit='msg', file=sys.stderr)
    try:
        while True:
            first = last = None
            count = 0
            for message in iter_bag_messages(bag, publishers):
                if first is None:
                    first = message.log_time_ns
                last = message.log_time_ns
                due = start + (offset_ns + message.log_time_ns - first) / rate / 1e9
                if not _sleep_until(due, ok):
                    stats.interrupted = True
                    return stats
                if clock is not None and count == 0:  # anchored to the schedule: no drift
                    clock.run(round(due * 1e9), message.log_time_ns)
                try:
                    publishers[message.topic].publish(message.rawdata)
                except Exception:
                    if not ok():  # the context shut down (signal) between check and publish
                        stats.interrupted = True
                        return stats
                    raise
                stats.published += 1
                count += 1
                bar.update()
            stats.loops += 1
            if not loop or first is None or last is None:
                return stats
            gap_ns = (last - first) // (count - 1) if count > 1 else 1_000_000_000
            offset_ns += last - first + gap_ns
    finally:
        bar.close()
        stats.wall_s = time.monotonic() - start
        if clock is not None:
            clock.hold(None if stats.interrupted else last)


class _ClockPublisher:
    """A thread that publishes `clock` on /clock at `hz` until stop(), on a drift-free grid."""

    def __init__(self, node: Node, clock: BagClock, hz: float, ok: Callable[[], bool]) -> None:
        self.publisher = node.create_publisher(Clock, '/clock', _CLOCK_QOS)
        self.clock, self.ok = clock, ok
        self.period_ns = max(1, round(1e9 / hz))
        self.published = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name='malmm_replay_clock',
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        due = time.monotonic_ns()
        while not self._stop.is_set() and self.ok():
            bag_ns = self.clock.now(time.monotonic_ns())
            message = Clock()
            message.clock.sec, message.clock.nanosec = divmod(bag_ns, 1_000_000_000)
            try:
                self.publisher.publish(message)
            except Exception:
                if not self.ok():  # a signal shut the context down: the main thread ends too
                    return
                raise
            self.published += 1
            due = next_tick(due, self.period_ns, time.monotonic_ns())
            self._stop.wait(max(0, due - time.monotonic_ns()) / 1e9)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10.0)


def _first_log_time(bag: str | Path, topics: list[str]) -> int:
    """Log time of the first message replay() will publish (/clock shows it until then)."""
    for message in iter_bag_messages(bag, topics):
        return message.log_time_ns
    raise DataError(f'{bag} holds no message on {topics}')


def _clock_hz(text: str) -> float:
    """--clock's value, checked: a number in (0, MAX_CLOCK_HZ]."""
    try:
        hz = float(text)
    except ValueError:
        hz = math.nan
    if not 0 < hz <= MAX_CLOCK_HZ:
        raise DataError(f'--clock must be a frequency in Hz, above 0 and at most '
                        f'{MAX_CLOCK_HZ:.0f}, got {text!r}')
    return hz


def _clock_argv(argv: list[str]) -> list[str]:
    """A bare --clock (last, before another option, or before the bag) gets the default HZ,
    so that the bag is not taken for its value; any other value is checked by _clock_hz."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == '--':
            break
        if arg == '--clock':
            value = out[i + 1] if i + 1 < len(out) else None
            if value is None or not _looks_numeric(value) and (
                    value.startswith('-') or value != '' and Path(value).exists()):
                out[i] = f'--clock={CLOCK_HZ:g}'
    return out


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='malmm-replay', description=__doc__.splitlines()[0])
    parser.add_argument('bag', metavar='BAG', help='rosbag2 directory (or .db3/.mcap file)')
    parser.add_argument('--rate', type=float, default=1.0,
                        help='playback speed factor (default 1.0)')
    parser.add_argument('--loop', action='store_true', help='replay the bag forever')
    parser.add_argument('--topic', default=None,
                        help='publish on this topic instead of the bag\'s (exact name)')
    parser.add_argument('--wait-subscribers', type=int, default=None, metavar='N',
                        help='wait for N matched subscribers on every topic before starting '
                             '(default: 1, then play anyway after --wait-timeout; given '
                             'explicitly, not finding them is an error; 0: start at once)')
    parser.add_argument('--wait-timeout', type=float, default=None, metavar='S',
                        help=f'longest wait for subscribers (default {DEFAULT_WAIT_S:.0f} s, '
                             f'{WAIT_SUBSCRIBERS_TIMEOUT_S:.0f} s with --wait-subscribers)')
    parser.add_argument('--start-delay', type=float, default=0.0, metavar='S',
                        help='seconds to wait before the first message')
    parser.add_argument('--clock', default=None, metavar='HZ',
                        help=f'also publish /clock at HZ (default {CLOCK_HZ:g}, at most '
                             f'{MAX_CLOCK_HZ:g}), like `ros2 bag play --clock`: the bag\'s '
                             'time, advancing at --rate, held at the first message\'s time '
                             'before it and at the last one\'s after the end; with --loop it '
                             'jumps back as the bag restarts. For nodes with use_sim_time:=true')
    return parser.parse_args(_clock_argv(argv))


def _plan(args: argparse.Namespace) -> tuple[dict[str, tuple[str, str]], int]:
    """Check the arguments and the bag before touching ROS: bag topic -> (out topic, msgtype),
    and messages per pass."""
    if not args.rate > 0:
        raise DataError(f'--rate must be > 0, got {args.rate}')
    if args.clock is not None:
        args.clock = _clock_hz(args.clock)
    if (args.wait_subscribers or 0) < 0 or not args.start_delay >= 0 or (
            args.wait_timeout is not None and not args.wait_timeout >= 0):
        raise DataError('--wait-subscribers, --wait-timeout and --start-delay must not be '
                        'negative')
    topics = image_topics(args.bag)
    if not topics:
        info = bag_info(args.bag)
        raise DataError(f'{args.bag} holds no Image or CompressedImage topic; it has '
                        f'{sorted(info["topics"])}')
    if args.topic is not None:
        if len(topics) > 1:
            raise DataError(f'--topic needs a bag with one image topic; {args.bag} has '
                            f'{sorted(topics)}')
        if not args.topic.startswith('/'):
            raise DataError(f'--topic must be an absolute name such as /camera/image_raw, '
                            f'got {args.topic!r}')
    plan = {t: (args.topic or t, m) for t, m in topics.items()}
    counts = bag_info(args.bag)['topics']
    return plan, sum(counts[t]['count'] for t in plan)


def _wait_for_subscribers(publishers: dict[str, Publisher], wanted: int,
                          ok: Callable[[], bool], *, timeout_s: float, strict: bool) -> bool:
    """Wait until every publisher has `wanted` matched subscriptions; False when interrupted.

    After `timeout_s`: MalmmError when `strict`, else a warning and True (play anyway).
    """
    deadline = time.monotonic() + timeout_s
    names = ', '.join(p.topic_name for p in publishers.values())
    told = False
    while True:
        if not ok():  # checked first: counting on a shut-down context raises
            return False
        matched = min(p.get_subscription_count() for p in publishers.values())
        if matched >= wanted:
            return True
        if time.monotonic() >= deadline:
            message = (f'only {matched} of {wanted} subscriber(s) matched on {names} within '
                       f'{timeout_s:.0f} s')
            if strict:
                raise MalmmError(message)
            print(f'malmm-replay: {message}; publishing anyway', file=sys.stderr, flush=True)
            return True
        if not told:
            print(f'malmm-replay: waiting up to {timeout_s:.0f} s for {wanted} subscriber(s) '
                  f'on {names} (--wait-subscribers 0: start at once)', file=sys.stderr,
                  flush=True)
            told = True
        time.sleep(_POLL_S)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace, ros_argv: list[str]) -> int:
    plan, per_pass = _plan(args)
    clock = None
    if args.clock is not None:  # the bag's end: all topics' (exact for a camera-only bag)
        end_ns = None if args.loop else bag_info(args.bag)['end_ns']
        clock = BagClock(_first_log_time(args.bag, list(plan)), args.rate, end_ns=end_ns)
    stats = ReplayStats()
    print(f'malmm-replay: {apply_default_profile()}', file=sys.stderr, flush=True)
    rclpy.init(args=ros_argv)
    node = None
    ticker = None
    try:
        node = Node(NODE_NAME)
        publishers = {bag_topic: node.create_publisher(_message_class(msgtype), out_topic, _QOS)
                      for bag_topic, (out_topic, msgtype) in plan.items()}
        for bag_topic, (out_topic, msgtype) in plan.items():
            _LOG.info('%s (%s) -> %s', bag_topic, msgtype, out_topic)
        if clock is not None:  # from now on: a node with use_sim_time starts on the bag's time
            ticker = _ClockPublisher(node, clock, args.clock, rclpy.ok)
        strict = args.wait_subscribers is not None
        wanted = 1 if args.wait_subscribers is None else args.wait_subscribers
        timeout_s = args.wait_timeout if args.wait_timeout is not None else (
            WAIT_SUBSCRIBERS_TIMEOUT_S if strict else DEFAULT_WAIT_S)
        go = wanted == 0 or _wait_for_subscribers(publishers, wanted, rclpy.ok,
                                                  timeout_s=timeout_s, strict=strict)
        if go and args.start_delay > 0:
            go = _sleep_until(time.monotonic() + args.start_delay, rclpy.ok)
        if go:
            replay(args.bag, publishers, rate=args.rate, loop=args.loop, ok=rclpy.ok,
                   stats=stats, progress_total=None if args.loop else per_pass, clock=clock)
            if not stats.interrupted and rclpy.ok():
                for publisher in publishers.values():  # let reliable subscribers catch up
                    publisher.wait_for_all_acked(Duration(seconds=_ACK_TIMEOUT_S))
        else:
            stats.interrupted = True
    except (KeyboardInterrupt, ExternalShutdownException):
        stats.interrupted = True
    except MalmmError:
        raise
    except Exception:
        if rclpy.ok():
            raise
        # A signal shut the context down between our ok() check and an rcl call.
        stats.interrupted = True
    finally:
        if ticker is not None:
            ticker.stop()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    clocks = f', {ticker.published} /clock messages' if ticker is not None else ''
    print(f'malmm-replay: published {stats.published} messages in {stats.wall_s:.2f} s{clocks}'
          f'{" (interrupted)" if stats.interrupted else ""}', flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    # Until rclpy.init installs its own handlers, SIGTERM ends the program like Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    ros_argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    try:
        args = _parse(remove_ros_args(ros_argv)[1:])
        logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
        return _run(args, ros_argv)
    except MalmmError as exc:
        print(f'ERROR: {exc}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == '__main__':
    sys.exit(main())
