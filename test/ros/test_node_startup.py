"""A bad parameter value at start: `ERROR: ...` naming it on stderr, exit status 1, no traceback.

The cases' node processes start a few at a time (each only reads its parameters and exits).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.domains import domain_id
from support.ros_driver import CONFIG, WAIT_S, NodeProcess, startup_outcome

DOMAIN_ID = domain_id(__file__)

# -p argument, text the ERROR line must contain
CASES = {
    'memory_bank_length_zero': ('memory_bank_length:=0', 'memory_bank_length'),
    'unknown_backend': ('backend:=nope', 'backend'),
    'unknown_device': ('device:=gpu', 'device'),
    'negative_sample_fps': ('sample_fps:=-1.0', 'sample_fps'),
    'heads_do_not_divide_width': ('model.num_heads:=3', 'num_heads'),
    'qos_depth_zero': ('qos.depth:=0', 'qos.depth'),
    'unknown_reliability': ('qos.reliability:=sometimes', 'qos.reliability'),
    'unknown_transport': ('input_transport:=udp', 'input_transport'),
    'missing_checkpoint': ('checkpoint:=/nonexistent/malmm.safetensors',
                           '/nonexistent/malmm.safetensors'),
}
# A value of the wrong type is written into a copy of config/anticipate.yaml instead: rcl merges
# `-p name:=text` into the file's value of another type and rclpy then reads the file's value,
# so the node never sees it (an rcl quirk, not the node's).
# YAML line prefix to replace, replacement, text the ERROR line must contain
FILE_CASES = {
    'memory_bank_length_not_a_number': ('memory_bank_length:', 'memory_bank_length: abc',
                                        'memory_bank_length'),
    'sample_fps_not_a_number': ('sample_fps:', 'sample_fps: fast', 'sample_fps'),
    'publish_every_n_fraction': ('publish_every_n:', 'publish_every_n: 2.5', 'publish_every_n'),
}


def _params_file(directory: Path, prefix: str, replacement: str) -> Path:
    lines = CONFIG.read_text().splitlines()
    hits = [i for i, line in enumerate(lines) if line.strip().startswith(prefix)]
    assert len(hits) == 1, f'{prefix} in {CONFIG}'
    indent = lines[hits[0]][:len(lines[hits[0]]) - len(lines[hits[0]].lstrip())]
    lines[hits[0]] = indent + replacement
    path = directory / f'{prefix.rstrip(":")}.yaml'
    path.write_text('\n'.join(lines) + '\n')
    return path


AT_ONCE = 4  # node processes starting together (each imports torch; the machine has 2 cores)


@pytest.fixture(scope='module')
def outcomes(tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[dict[str, tuple[int | str, str]]]:
    """{case: (exit status, or 'started' / 'hung' if it did not exit, stderr)}."""
    log_dir = tmp_path_factory.mktemp('startup_nodes')
    commands = {name: dict(params=[param]) for name, (param, _) in CASES.items()}
    commands.update({name: dict(params_file=_params_file(log_dir, prefix, replacement))
                     for name, (prefix, replacement, _) in FILE_CASES.items()})
    names = list(commands)
    results: dict[str, tuple[int | str, str]] = {}
    processes: list[NodeProcess] = []
    try:
        for first in range(0, len(names), AT_ONCE):
            batch = names[first:first + AT_ONCE]
            processes = [NodeProcess(DOMAIN_ID, log_dir=log_dir, name=name, **commands[name])
                         for name in batch]
            for name, process in zip(batch, processes, strict=True):
                results[name] = startup_outcome(process, 2 * WAIT_S)
        yield results
    finally:
        for process in processes:
            process.kill()


@pytest.mark.parametrize('case', list(CASES) + list(FILE_CASES))
def test_bad_parameter_at_start_exits_1_with_an_error_naming_it(
        outcomes: dict[str, tuple[int | str, str]], case: str) -> None:
    returncode, stderr = outcomes[case]
    fragment = CASES[case][1] if case in CASES else FILE_CASES[case][2]
    errors = [line for line in stderr.splitlines() if line.startswith('ERROR:')]
    assert returncode != 'started', f'the node accepted it and started:\n{stderr[-2000:]}'
    assert returncode == 1, f'exit status {returncode}; stderr:\n{stderr[-2000:]}'
    assert errors, f'no ERROR: line; stderr:\n{stderr[-2000:]}'
    assert any(fragment in line for line in errors), errors
    assert 'Traceback' not in stderr, stderr[-3000:]
