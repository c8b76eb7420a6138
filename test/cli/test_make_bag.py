"""malmm-make-bag run as the installed console script, its bags read back with rosbags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from malmm_ros.cli.make_bag import cover
from malmm_ros.data.bags import COMPRESSED_IMAGE_TYPE, IMAGE_TYPE, bag_info, read_camera_frames

SCRIPT = Path(sys.executable).with_name('malmm-make-bag')
pytestmark = pytest.mark.slow  # every test starts the console script


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    assert SCRIPT.exists(), f'{SCRIPT} missing: pip install -e . first'
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_default_photos(tmp_path: Path) -> None:
    out = tmp_path / 'cam'
    result = _run(str(out), '--seconds', '1', '--fps', '10', '--size', '64x80')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f'{out}: 10 messages on /camera/image_raw, 0.90 s, sqlite3'
    info = bag_info(out)
    assert info['topics'] == {'/camera/image_raw': {'msgtype': IMAGE_TYPE, 'count': 10}}
    frames = list(read_camera_frames(out))
    assert [f.stamp_ns for f in frames] == [i * 100_000_000 for i in range(10)]
    assert all(f.image.shape == (64, 80, 3) and f.frame_id == 'camera' for f in frames)
    assert not np.array_equal(frames[0].image, frames[-1].image)  # the camera pans


def test_compressed_mcap_custom_topic(tmp_path: Path) -> None:
    out = tmp_path / 'cam'
    result = _run(str(out), '--compressed', '--storage', 'mcap', '--topic', '/front/rgb',
                  '--seconds', '0.5', '--fps', '20', '--size', '48x64')
    assert result.returncode == 0, result.stderr
    assert 'mcap' in result.stdout and '/front/rgb/compressed' in result.stdout
    info = bag_info(out)
    assert info['storage'] == 'mcap'
    assert info['topics'] == {
        '/front/rgb/compressed': {'msgtype': COMPRESSED_IMAGE_TYPE, 'count': 10}}
    frames = list(read_camera_frames(out))
    assert len(frames) == 10 and frames[0].image.shape == (48, 64, 3)


def test_own_images(tmp_path: Path) -> None:
    photos = tmp_path / 'photos'
    photos.mkdir()
    # Sorted by name: a.jpg is the first scene, b.png the second.
    cv2.imwrite(str(photos / 'b.png'), cv2.cvtColor(skdata.chelsea(), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(photos / 'a.jpg'), cv2.cvtColor(skdata.coffee(), cv2.COLOR_RGB2BGR))
    (photos / 'notes.txt').write_text('not a photo', encoding='utf-8')
    out = tmp_path / 'cam'
    # 2 fps for 5 s: frames 0-7 pan over the first photo, frame 8 (t = 4 s) starts the second.
    result = _run(str(out), '--images', str(photos), '--seconds', '5', '--fps', '2',
                  '--size', '64x80')
    assert result.returncode == 0, result.stderr
    frames = list(read_camera_frames(out))
    assert len(frames) == 10
    for index, name in ((0, 'a.jpg'), (8, 'b.png')):
        rgb = cv2.cvtColor(cv2.imread(str(photos / name)), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(frames[index].image, cover(rgb, (64, 80))[:64, :80])


@pytest.mark.parametrize('case', ['unreadable', 'empty', 'missing'])
def test_bad_images_folder(tmp_path: Path, case: str) -> None:
    photos = tmp_path / 'photos'
    if case != 'missing':
        photos.mkdir()
    if case == 'unreadable':
        cv2.imwrite(str(photos / 'good.png'), np.full((50, 60, 3), 128, np.uint8))
        (photos / 'broken.jpg').write_bytes(b'\xff\xd8 this is not really a jpeg')
    out = tmp_path / 'cam'
    result = _run(str(out), '--images', str(photos), '--seconds', '1', '--fps', '5')
    assert result.returncode == 1
    assert result.stderr.startswith('ERROR: '), result.stderr
    assert 'Traceback' not in result.stderr
    assert ('broken.jpg' if case == 'unreadable' else str(photos)) in result.stderr
    assert not out.exists()


def test_existing_output_refused(tmp_path: Path) -> None:
    out = tmp_path / 'cam'
    out.mkdir()
    result = _run(str(out), '--seconds', '0.2', '--fps', '10', '--size', '32x32')
    assert result.returncode == 1
    assert result.stderr.startswith('ERROR: ') and 'exists' in result.stderr
    assert list(out.iterdir()) == []
