"""The torch-free node (runtime onnx, a bundle) over real DDS on the Pythons robots run: 3.10
with numpy 1.26 (Humble on a Jetson), the main venv and 3.12 (Jazzy); torch is not installed
in the robot venvs, and the main venv's node must not load it either."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from std_msgs.msg import String

from support.domains import domain_ids
from support.ros_driver import (
    CAMERA_TOPIC,
    CONFIG,
    ROOT,
    CameraStream,
    Driver,
    ros_env,
    wait_until,
)
from support.runtime_venvs import runtime_env

pytestmark = pytest.mark.slow  # builds the venvs once, exports a bundle once, starts nodes

PYTHONS = ('3.10', 'main', '3.12')
DOMAINS = dict(zip(PYTHONS, domain_ids(__file__), strict=True))
WAIT_S = 120.0  # start-up on a busy 2-core machine, in a fresh interpreter


class _Node:
    """`python -m malmm_ros.ros.anticipate_main` with runtime onnx from `bundle`."""

    def __init__(self, python: Path, env: dict[str, str], bundle: Path, log_dir: Path) -> None:
        cmd = [str(python), '-m', 'malmm_ros.ros.anticipate_main', '--ros-args',
               '--params-file', str(CONFIG), '-r', f'image:={CAMERA_TOPIC}',
               '-p', 'num_threads:=1', '-p', 'runtime:=onnx', '-p', f'bundle:={bundle}',
               '-p', 'sample_fps:=4.0']
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / 'node.log'
        with self.log.open('wb') as out:
            self.proc = subprocess.Popen(cmd, cwd=log_dir, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def describe(self) -> str:
        state = 'running' if self.alive() else f'exited with {self.proc.returncode}'
        return f'node {state}; log tail:\n{self.log.read_text(errors="replace")[-3000:]}'

    def libraries(self) -> set[str]:
        with open(f'/proc/{self.proc.pid}/maps') as maps:
            return {Path(line.split()[-1]).name for line in maps if '/' in line}

    def stop(self) -> int:
        if self.alive():
            self.proc.send_signal(2)  # SIGINT, as ctrl-c
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
            raise AssertionError(f'node did not stop on SIGINT: {self.describe()}') from None


@pytest.mark.parametrize('which', PYTHONS)
def test_node_predicts_from_a_bundle_without_torch(which: str, edge_bundle: Path,
                                                   runtime_python: Callable[[str], Path],
                                                   tmp_path: Path) -> None:
    domain = DOMAINS[which]
    if which == 'main':
        python, env = Path(sys.executable), ros_env(domain)
    else:
        python = runtime_python(which)
        env = runtime_env({'PYTHONUNBUFFERED': '1', 'ROS_DOMAIN_ID': str(domain)})
    node = _Node(python, env, edge_bundle, tmp_path / 'node')
    driver = Driver(domain)
    try:
        _, actions = driver.subscribe(String, '/malmm/actions',
                                      convert=lambda m: json.loads(m.data))
        with CameraStream(domain, log_dir=tmp_path, width=320, height=240, rate=10.0):
            wait_until(lambda: len(actions) >= 3 or not node.alive(),
                       'three predictions', timeout=WAIT_S)
            assert len(actions) >= 3, node.describe()
            loaded = node.libraries()
        message = actions.items()[-1]
        assert message['model']['trained'] is False and len(message['verb']) == 5
        assert all(0.0 <= entry['score'] <= 1.0 for entry in message['noun'])
        assert not {name for name in loaded if name.startswith('libtorch')}, sorted(loaded)
        log = node.log.read_text(errors='replace')
        assert 'int8' in log, log[-2000:]  # precision auto: the bundle's INT8 encoder
        assert node.stop() == 0, node.describe()
    finally:
        driver.close()
        if node.alive():
            node.proc.kill()


def test_robot_venvs_have_no_torch(runtime_python: Callable[[str], Path]) -> None:
    for version in ('3.10', '3.12'):
        result = subprocess.run([str(runtime_python(version)), '-c', 'import torch'],
                                cwd=ROOT, env=runtime_env(), capture_output=True, text=True)
        assert result.returncode != 0 and 'torch' in result.stderr
