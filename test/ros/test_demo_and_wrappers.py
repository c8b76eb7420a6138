"""malmm-demo and the installed `anticipate` wrapper as a new user meets them (issue 10, items 8
and 10): any label vocabulary, a clear word when the class names are missing, and what to do
when the wrong Python runs the node.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support.domains import domain_id
from support.ros_driver import ROOT, WAIT_S, ros_env

DOMAIN_ID = domain_id(__file__)
VERBS = 'id,key,instances,category\n0,take,"[\'take\']",retrieve\n1,put,"[\'put\']",leave\n'
NOUNS = 'id,key,instances,category\n0,tap,"[\'tap\']",appliances\n1,spoon,"[\'spoon\']",cutlery\n'


def _demo(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / 'malmm-demo'), '--bag', str(tmp_path / 'bag'),
           '--seconds', '3', '--log', str(tmp_path / 'node.log'), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=ros_env(DOMAIN_ID), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=10 * WAIT_S)


def test_demo_with_a_two_class_vocabulary(tmp_path: Path) -> None:
    labels = tmp_path / 'labels'
    labels.mkdir()
    (labels / 'EPIC_100_verb_classes.csv').write_text(VERBS)
    (labels / 'EPIC_100_noun_classes.csv').write_text(NOUNS)
    done = _demo(tmp_path, '--labels-dir', str(labels))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert 'Traceback' not in done.stdout + done.stderr
    assert 'malmm-demo summary' in done.stdout
    assert 'spoon' in done.stdout or 'tap' in done.stdout  # the 2-noun names in the table
    assert 'class names not found' not in done.stdout


def test_demo_says_when_class_names_are_missing(tmp_path: Path) -> None:
    done = _demo(tmp_path, '--labels-dir', str(tmp_path / 'nowhere'))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = ' '.join(done.stdout.split())  # rich wraps lines
    assert 'EK-100 class names not found' in text
    assert 'EPIC_ANNOTATIONS=' in text


@pytest.mark.parametrize('sources', [False, True], ids=['no-malmm_ros', 'no-rclpy'])
def test_wrapper_without_the_right_python_says_what_to_do(tmp_path: Path, sources: bool
                                                          ) -> None:
    """`python -S` has no site-packages: neither malmm_ros (installed there) nor rclpy. With
    the source tree and a copy of PyYAML on PYTHONPATH, malmm_ros and its config import and the
    node's own imports (numpy, rclpy) fail."""
    env = ros_env(DOMAIN_ID)
    env.pop('PYTHONPATH', None)
    if sources:
        shutil.copytree(Path(yaml.__file__).parent, tmp_path / 'yaml')
        env['PYTHONPATH'] = os.pathsep.join([str(ROOT), str(tmp_path)])
    done = subprocess.run([sys.executable, '-S', str(ROOT / 'scripts' / 'anticipate')],
                          env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 1
    assert 'Traceback' not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('ERROR: Python module')
    assert 'source install/setup.bash' in lines[0]
    if sources:
        assert "'rclpy'" in lines[0]
