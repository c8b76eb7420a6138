"""The node publishes the same top-5 with either CPU encoder backend on the same bag (issue 4).

Two real node processes (ONNX Runtime, then torch), the same rosbag2 replayed into each over
DDS with its original timing; their /malmm/actions messages are matched by frame stamp.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from malmm_ros.config import AnticipateConfig
from malmm_ros.data.bags import write_camera_bag
from malmm_ros.data.sample_stream import panning_frames
from malmm_ros.ros.live_eval import record_live
from support.domains import domain_ids

DOMAIN_IDS = dict(zip(('onnxruntime', 'torch'), domain_ids(__file__), strict=True))


@pytest.fixture(scope='module')
def bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp('backends') / 'bag'
    write_camera_bag(path, panning_frames(9.0, 10.0))
    return path


def top5(message: dict) -> tuple:
    return tuple(tuple(entry['id'] for entry in message[kind])
                 for kind in ('verb', 'noun', 'action'))


def test_same_top5_with_onnxruntime_and_torch(bag: Path, tmp_path: Path) -> None:
    by_backend = {}
    for backend, domain_id in DOMAIN_IDS.items():
        config = AnticipateConfig().replace(backend=backend, num_threads=1)
        recording = record_live(bag, config, out_dir=tmp_path / backend, domain_id=domain_id,
                                node_timeout_s=120.0, progress=False)
        assert recording.node_exit in (0, None), (tmp_path / backend / 'node.log').read_text()
        by_backend[backend] = {m['stamp']['sec'] * 10**9 + m['stamp']['nanosec']: m
                               for m in recording.messages}
    ort, eager = by_backend['onnxruntime'], by_backend['torch']
    common = sorted(set(ort) & set(eager))
    assert len(common) >= 6, (sorted(ort), sorted(eager))  # 9 s sampled at 1 fps
    for stamp in common:
        assert top5(ort[stamp]) == top5(eager[stamp]), stamp
        for kind in ('verb', 'noun', 'action'):
            for a, b in zip(ort[stamp][kind], eager[stamp][kind], strict=True):
                assert a['score'] == pytest.approx(b['score'], abs=1e-4)
