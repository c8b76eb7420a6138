"""The torch-free runtime path imports, and rclpy starts, on the Pythons robots run (issue 13):
3.10 with numpy 1.26 (Humble on a Jetson), 3.12 with numpy 2 (Jazzy), and the main venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from support.runtime_venvs import runtime_env

pytestmark = pytest.mark.slow  # builds two venvs on the first run, then starts interpreters

# The modules of the torch-free runtime path: each robot Python imports them with torch and
# transformers unimportable. Extend it as modules join the path.
TORCH_FREE_MODULES = (
    'malmm_ros.config',
    'malmm_ros.decode_limits',
    'malmm_ros.errors',
    'malmm_ros.imaging',
    'malmm_ros.labels',
    'malmm_ros.protocol',
    'malmm_ros.stamps',
    'malmm_ros.pipeline.prediction',
    'malmm_ros.pipeline.sampler',
    'malmm_ros.pipeline',
    'malmm_ros.pipeline.anticipation',
    'malmm_ros.pipeline.onnx_runner',
    'malmm_ros.runtime',
    'malmm_ros.runtime.bundle',
    'malmm_ros.runtime.cuda_buffers',
    'malmm_ros.runtime.engine_cache',
    'malmm_ros.runtime.numpy_memory',
    'malmm_ros.runtime.onnx_step',
    'malmm_ros.runtime.onnxruntime_encoder',
    'malmm_ros.runtime.step_spec',
    'malmm_ros.runtime.tensorrt_encoder',
    'malmm_ros.runtime.tensorrt_step',
    'malmm_ros.ros.anticipate_node',
    'malmm_ros.ros.diagnostics',
    'malmm_ros.ros.latest_slot',
    'malmm_ros.ros.parameters',
)
# 'main' is the interpreter running the tests (.venv); the others are built for the robots.
PYTHONS = ('3.10', 'main', '3.12')
NUMPY = {'3.10': '1.26.', '3.12': '2.'}  # the numpy each robot's venv must have resolved

IMPORT_PROBE = """
import importlib, json, sys
sys.modules['torch'] = None  # from here on, importing either raises ImportError
sys.modules['transformers'] = None
for name in sys.argv[1:]:
    importlib.import_module(name)
import numpy
print(json.dumps({'python': '%d.%d' % sys.version_info[:2], 'numpy': numpy.__version__}))
"""

RCLPY_PROBE = """
import json, os, sys
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger
from rclpy.utilities import get_rmw_implementation_identifier

rclpy.init()  # no DDS participant before a node exists: no traffic, no domain id needed
try:
    rmw = get_rmw_implementation_identifier()
    with open('/proc/self/maps') as maps:
        libraries = sorted({line.split()[-1] for line in maps if 'librmw_fastrtps' in line})
finally:
    rclpy.shutdown()
print(json.dumps({'rmw': rmw, 'libraries': libraries,
                  'prefix': os.path.realpath(sys.prefix)}))
"""


def _python(which: str, runtime_python: Callable[[str], Path]) -> Path:
    return Path(sys.executable) if which == 'main' else runtime_python(which)


def _probe(python: Path, cwd: Path, script: str, *args: str) -> dict:
    """Run `script` in `python`; the JSON its last line prints. `cwd` is not the repo, so the
    package comes from the venv's own path."""
    result = subprocess.run([str(python), '-c', script, *args], cwd=cwd, env=runtime_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f'{python}:\n{result.stderr[-3000:]}'
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize('which', PYTHONS)
def test_runtime_path_imports_without_torch(which: str, runtime_python, tmp_path: Path) -> None:
    report = _probe(_python(which, runtime_python), tmp_path, IMPORT_PROBE, *TORCH_FREE_MODULES)
    if which in NUMPY:
        assert report['python'] == which
        assert report['numpy'].startswith(NUMPY[which]), report


@pytest.mark.parametrize('which', PYTHONS)
def test_rclpy_starts_on_its_own_ros_libraries(which: str, runtime_python,
                                               tmp_path: Path) -> None:
    """rclpy inits with the repo's DDS settings, and the RMW library it loads is its venv's own:
    none of the main venv's leaks in through the environment (runtime_env)."""
    report = _probe(_python(which, runtime_python), tmp_path, RCLPY_PROBE)
    assert report['rmw'] == os.environ.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    assert report['libraries'], 'no librmw_fastrtps loaded'
    assert all(path.startswith(report['prefix'] + os.sep) for path in report['libraries']), \
        report
