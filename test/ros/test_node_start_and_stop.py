"""Start-up of malmm-anticipate as a new user meets it (issue 10, items 5, 6, 8, 12, 14).

- unknown parameter names (params file or -p) are refused with the closest valid name;
- `--help` prints every parameter without starting ROS;
- missing files (parameter file, relative checkpoint) are one ERROR line with the absolute path;
- Ctrl-C at any moment of start-up: exit 0, no traceback;
- a model whose outputs are not finite publishes nothing and counts errors.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from malmm_ros.config import field_specs, load_config
from malmm_ros.model.checkpoint import save_checkpoint, untrained_model
from support.domains import domain_ids
from support.frames import photo
from support.ros_driver import (
    CONFIG,
    WAIT_S,
    NodeProcess,
    NodeSession,
    StampClock,
    node_executable,
    raw_image,
    ros_env,
    startup_outcome,
    wait_until,
)

# Start-up cases (none of them gets to talk), the signal cases, the NaN checkpoint.
DOMAIN_ID, SIGNAL_DOMAIN_ID, NAN_DOMAIN_ID = domain_ids(__file__)


def _run(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
         timeout: float = WAIT_S) -> subprocess.CompletedProcess:
    return subprocess.run([node_executable(), *args], env=env or ros_env(DOMAIN_ID), cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith('ERROR:')]


# -- --help --------------------------------------------------------------------------------


@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_lists_every_parameter_without_starting_ros(flag: str) -> None:
    # With an RMW that does not exist, starting ROS would fail: exit 0 shows it never did.
    env = dict(ros_env(DOMAIN_ID), RMW_IMPLEMENTATION='rmw_that_does_not_exist')
    done = _run([flag], env=env)
    assert done.returncode == 0, done.stderr
    for name, spec in field_specs().items():
        assert f'  {name} (default ' in done.stdout
        assert spec.metadata['doc'] in done.stdout
    assert '0 .. 1000' in done.stdout  # sample_fps's range
    assert 'best_effort | reliable' in done.stdout


def test_unknown_program_argument_is_refused() -> None:
    done = _run(['--frobnicate'])
    assert done.returncode == 1
    assert _error_lines(done.stderr) and 'Traceback' not in done.stderr


# -- unknown parameter names ---------------------------------------------------------------


def test_unknown_parameter_from_the_command_line_is_refused(tmp_path: Path) -> None:
    process = NodeProcess(DOMAIN_ID, ['publish_evry_n:=3'], log_dir=tmp_path)
    status, stderr = startup_outcome(process, 2 * WAIT_S)
    assert status == 1, stderr
    assert _error_lines(stderr) == [
        'ERROR: unknown parameter publish_evry_n; did you mean publish_every_n?']
    assert 'Traceback' not in stderr


def test_unknown_parameter_from_a_params_file_is_refused(tmp_path: Path) -> None:
    text = CONFIG.read_text().replace('      hidden_size: 128', '      hiden_size: 128')
    assert 'hiden_size' in text
    params = tmp_path / 'typo.yaml'
    params.write_text(text)
    process = NodeProcess(DOMAIN_ID, log_dir=tmp_path, params_file=params)
    status, stderr = startup_outcome(process, 2 * WAIT_S)
    assert status == 1, stderr
    assert 'unknown parameter model.hiden_size; did you mean model.hidden_size?' in stderr


# -- files that are not there ----------------------------------------------------------------


def test_missing_params_file_names_the_absolute_path(tmp_path: Path) -> None:
    done = _run(['--ros-args', '--params-file', 'config/nope.yaml'], cwd=tmp_path)
    assert done.returncode == 1
    assert _error_lines(done.stderr) == [
        f'ERROR: parameter file {tmp_path / "config" / "nope.yaml"} does not exist']
    assert 'Traceback' not in done.stderr


def test_missing_relative_checkpoint_names_the_absolute_path(tmp_path: Path) -> None:
    done = _run(['--ros-args', '--params-file', str(CONFIG), '-p',
                 'checkpoint:=runs/train/best.safetensors'], cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert _error_lines(done.stderr) == [
        f"ERROR: checkpoint 'runs/train/best.safetensors': "
        f'{tmp_path / "runs" / "train" / "best.safetensors"} does not exist']


# -- Ctrl-C during start-up ------------------------------------------------------------------


@pytest.mark.parametrize('delay_s', [0.3, 1.2, 2.5, 4.0])
def test_ctrl_c_during_start_up_exits_0_without_traceback(tmp_path: Path, delay_s: float
                                                          ) -> None:
    """Early (imports), mid (rclpy.init, pipeline load) and late (spinning) signals."""
    process = NodeProcess(SIGNAL_DOMAIN_ID, log_dir=tmp_path)
    try:
        time.sleep(delay_s)
        status = process.stop(signal.SIGINT, timeout=WAIT_S)
    finally:
        process.kill()
    assert status == 0, process.describe()
    assert 'Traceback' not in process.stderr()


# -- non-finite outputs ----------------------------------------------------------------------


def test_non_finite_outputs_are_never_published(tmp_path: Path) -> None:
    """Finite weights so large that the heads overflow: every prediction is withheld.

    The checkpoint was 'trained' with the node's own sample_fps and M, so no protocol warning
    may appear (the node used to build its pipeline with sample_fps 0 and warn every time).
    """
    config = load_config(CONFIG)
    model = untrained_model(config)
    with torch.no_grad():
        model.heads.verb.weight.fill_(3e38)
    checkpoint = save_checkpoint(tmp_path / 'overflow.safetensors', model, training={
        'sample_fps': config.sample_fps, 'memory_bank_length': config.memory_bank_length})
    session = NodeSession(NAN_DOMAIN_ID, [f'checkpoint:={checkpoint}'], log_dir=tmp_path)
    try:
        session.wait_ready()
        clock = StampClock(step_ns=1_000_000_000)  # one frame per sampling period
        pixels = photo(48, 64, 0).tobytes()
        for _ in range(3):
            session.publish(raw_image('rgb8', 64, 48, 64 * 3, pixels, clock.next()))
            time.sleep(0.3)
        status = session.wait_diagnostics(lambda s: int(s['values']['errors']) >= 1,
                                          'the withheld prediction counted in errors')
        assert int(status['values']['predictions']) == 0
        wait_until(lambda: 'non-finite scores' in session.process.stderr(), 'the ERROR line',
                   process=session.process)
        assert len(session.actions) == 0
        assert 'was trained with' not in session.process.stderr()
    finally:
        session.close()


def test_prediction_json_is_strict() -> None:
    from malmm_ros.pipeline.prediction import ClassScore, Prediction

    prediction = Prediction(stamp_ns=1, frame_id='', frames_seen=1, memory_slots=1,
                            verbs=(ClassScore(0, 'take', float('nan')),), nouns=(), actions=())
    with pytest.raises(ValueError, match='JSON'):
        prediction.to_json()
    assert json.loads(Prediction(1, '', 1, 1, (), (), ()).to_json())['frames_seen'] == 1
