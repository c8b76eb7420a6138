"""The README's commands as written, with no DDS profile exported (issue 10, items 4 and 7).

A 640x480 30 fps bag from malmm-make-bag, replayed by malmm-replay into malmm-anticipate with
no flags and no FASTDDS_DEFAULT_PROFILES_FILE: both apply the package's Fast DDS profile
themselves (without it a best-effort subscriber loses most camera-sized frames), and the replay
waits for the node's subscription before its first frame. Nearly every frame must arrive.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from diagnostic_msgs.msg import DiagnosticArray

from support.domains import domain_id
from support.ros_driver import (
    CONFIG,
    RELIABLE,
    ROOT,
    WAIT_S,
    Driver,
    node_diagnostics,
    ros_env,
    wait_until,
)

DOMAIN_ID = domain_id(__file__)
SECONDS, FPS = 10, 30
FRAMES = SECONDS * FPS


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_readme_commands_get_every_frame_without_a_profile_exported(tmp_path: Path) -> None:
    bag = tmp_path / 'cam_bag'
    subprocess.run([_bin('malmm-make-bag'), str(bag), '--seconds', str(SECONDS), '--fps',
                    str(FPS)], check=True, capture_output=True, timeout=10 * WAIT_S)
    env = ros_env(DOMAIN_ID)
    env.pop('FASTDDS_DEFAULT_PROFILES_FILE', None)
    logs = {name: tmp_path / f'{name}.log' for name in ('node', 'replay')}
    with open(logs['node'], 'wb') as node_log, open(logs['replay'], 'wb') as replay_log:
        node = subprocess.Popen([_bin('malmm-anticipate'), '--ros-args', '--params-file',
                                 str(CONFIG), '-r', 'image:=/camera/image_raw'], cwd=ROOT,
                                env=env, stdin=subprocess.DEVNULL, stdout=node_log,
                                stderr=subprocess.STDOUT)
        replay = subprocess.Popen([_bin('malmm-replay'), str(bag)], cwd=ROOT, env=env,
                                  stdin=subprocess.DEVNULL, stdout=replay_log,
                                  stderr=subprocess.STDOUT)
    driver = None
    try:
        assert replay.wait(timeout=10 * WAIT_S) == 0, logs['replay'].read_text()
        driver = Driver(DOMAIN_ID)
        _, statuses = driver.subscribe(DiagnosticArray, '/diagnostics', RELIABLE,
                                       convert=node_diagnostics)
        status = wait_until(lambda: statuses.items()[-1] if len(statuses) else None,
                            'the node\'s diagnostics')
        frames_in = int(status['values']['frames_in'])
    finally:
        if driver is not None:
            driver.close()
        node.kill()
        node.wait(timeout=15)
    node_text = logs['node'].read_text(errors='replace')
    replay_text = logs['replay'].read_text(errors='replace')
    assert 'config/fastdds.xml (package default; $FASTDDS_DEFAULT_PROFILES_FILE was not set)' \
        in node_text
    assert 'package default' in replay_text
    assert 'waiting up to' in replay_text  # it said what it was waiting for
    assert frames_in >= 0.99 * FRAMES, (frames_in, node_text[-2000:], replay_text[-2000:])
