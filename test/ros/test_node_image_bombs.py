"""Decompression bombs sent to the node as sensor_msgs/CompressedImage, over DDS.

A 32-byte WebP declaring 16383x16383 pixels, an 11 KB TIFF declaring 20000x20000, a JPEG whose
frame header hides behind 196 KB of APP1 segments and a PNG declaring 20000x20000, under
honest and dishonest `format` strings, interleaved with good JPEG frames. The node must refuse
each one (bad_frames counts it), keep predicting on the good frames, and its peak RSS must stay
within 100 MB of what it was before the first bomb (before the fix: +1.8 GB for the WebP
labelled jpeg, +2.3 GB for the TIFF labelled png or unlabelled, +1.1 GB for the late-SOF JPEG).

One malmm_anticipate process serves the module (input_transport compressed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage

from support.domains import domain_id
from support.frames import photo
from support.image_bombs import BOMBS
from support.ros_driver import ROOT, NodeSession, compressed_image, running_session

DOMAIN_ID = domain_id(__file__)
HEIGHT, WIDTH = 120, 160
PARAMS = ['sample_fps:=0.0', 'publish_every_n:=1', 'memory_bank_length:=8']
RSS_BUDGET_MIB = 100.0


@pytest.fixture(scope='module')
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSession]:
    yield from running_session(DOMAIN_ID, PARAMS, compressed=True,
                               log_dir=tmp_path_factory.mktemp('bombs_node'))


class PeakRss:
    """Peak resident memory of a process from start() to peak(), from /proc/<pid>/status.

    start() asks the kernel to restart the peak (VmHWM) from the current RSS by writing 5 to
    clear_refs; where that is not allowed, a thread samples VmRSS every few milliseconds instead
    (it can miss a spike shorter than that, never invent one).
    """

    def __init__(self, pid: int) -> None:
        self.proc = Path(f'/proc/{pid}')
        self._sampler: threading.Thread | None = None
        self._sampled_mib = 0.0
        self._done = threading.Event()

    def field_mib(self, name: str) -> float:
        for line in (self.proc / 'status').read_text().splitlines():
            if line.startswith(f'{name}:'):
                return int(line.split()[1]) / 1024  # kB
        raise AssertionError(f'no {name} in {self.proc}/status')

    def start(self) -> float:
        """Restart the peak now; returns the current RSS in MiB."""
        try:
            (self.proc / 'clear_refs').write_text('5')
        except OSError:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self.field_mib('VmRSS')

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self._sampled_mib = max(self._sampled_mib, self.field_mib('VmRSS'))

    def peak(self) -> float:
        """The peak RSS in MiB since start()."""
        if self._sampler is None:
            return self.field_mib('VmHWM')
        self._done.set()
        self._sampler.join(timeout=5)
        return self._sampled_mib


def _good_frame(stamp: int) -> CompressedImage:
    ok, buffer = cv2.imencode('.jpg', np.ascontiguousarray(photo(HEIGHT, WIDTH, 3)[..., ::-1]))
    assert ok
    return compressed_image('jpeg', buffer.tobytes(), stamp)


def _bad_frames(status: dict) -> int:
    return int(status['values']['bad_frames'])


def _count_after_bomb(session: NodeSession, name: str, fmt: str, payload: bytes) -> int:
    """Send the bomb (again if lost on the way) until bad_frames grows; by how much it grew."""
    before = _bad_frames(session.fresh_diagnostics())

    def refused(_stamp: int) -> dict | None:
        return next((d for d in session.diagnostics.items() if _bad_frames(d) > before), None)

    _, status = session.roundtrip(lambda stamp: compressed_image(fmt, payload, stamp), refused,
                                  f'bad_frames to count the {name} bomb')
    return _bad_frames(status) - before


def test_bombs_are_refused_without_memory_growth(session: NodeSession) -> None:
    for _ in range(3):  # warm up: the first steps allocate the model's working memory
        session.predict(_good_frame, 'a warm-up prediction')
    processed_before = int(session.fresh_diagnostics()['values']['processed'])
    rss = PeakRss(session.process.proc.pid)
    idle_mib = rss.start()

    counted = {}
    for name, (fmt, make) in BOMBS.items():
        counted[name] = _count_after_bomb(session, name, fmt, make())
        session.predict(_good_frame, f'a prediction after the {name} bomb')
    peak_mib = rss.peak()

    status = session.fresh_diagnostics()
    assert session.process.alive, session.process.describe()
    assert counted == dict.fromkeys(BOMBS, 1), counted
    assert int(status['values']['processed']) - processed_before >= len(BOMBS)
    assert peak_mib - idle_mib < RSS_BUDGET_MIB, (
        f'node peak RSS {peak_mib:.0f} MiB, {peak_mib - idle_mib:.0f} MiB above its idle '
        f'{idle_mib:.0f} MiB')
    stderr = session.process.stderr()
    assert 'Traceback' not in stderr
    assert 'bad frame skipped' in stderr


# The node imports cv2 (through the model) before the codec; OpenCV reads its pixel limit when
# it is loaded, so the limit must already be set by then.
def test_opencv_pixel_limit_is_in_effect_in_the_node_process() -> None:
    code = ('import sys\n'
            'from malmm_ros.ros.anticipate_node import main\n'
            'import cv2, numpy as np\n'
            f'sys.path.insert(0, {str(ROOT / "test")!r})\n'
            'from support.image_bombs import png_declaring\n'
            'data = np.frombuffer(png_declaring(20000, 20000), np.uint8)\n'
            'try:\n'
            '    cv2.imdecode(data, cv2.IMREAD_COLOR)\n'
            "    print('decode attempted')\n"
            'except cv2.error as exc:\n'
            '    print(str(exc).strip().splitlines()[-1])\n')
    env = {k: v for k, v in os.environ.items() if k != 'OPENCV_IO_MAX_IMAGE_PIXELS'}
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert 'pixels <= CV_IO_MAX_IMAGE_PIXELS' in result.stdout, (
        'OpenCV decodes without its pixel limit in the node process: cv2 was loaded before '
        f'malmm_ros.decode_limits set OPENCV_IO_MAX_IMAGE_PIXELS ({result.stdout.strip()})')
