"""An unusable engine_dir at start: one `ERROR: ...` line naming it, exit status 1, no traceback.

Issue 10: the ONNX Runtime backend (the default) ignored engine_dir, and a cache folder that
could not be created ended in a raw OSError traceback. Real node processes, started together
(each only gets as far as its encoder and exits).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from support.domains import domain_id
from support.ros_driver import WAIT_S, NodeProcess, startup_outcome

DOMAIN_ID = domain_id(__file__)

# engine_dir relative to the test folder, text of the reason
CASES = {
    'under_a_file': ('blocker/engines', 'Not a directory'),
    'a_file': ('blocker', 'not a folder'),
}


class Outcome(NamedTuple):
    engine_dir: Path
    returncode: int | str  # or 'started' / 'hung' for a node that did not exit
    stderr: str
    default_dir: Path  # $MALMM_ENGINE_DIR of the node


@pytest.fixture(scope='module')
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    """{case: Outcome} of one node per case, all started at once."""
    root = tmp_path_factory.mktemp('engine_cache_nodes')
    (root / 'blocker').write_text('a file where the encoder cache would be\n')
    folders = {name: root / relative for name, (relative, _) in CASES.items()}
    processes: dict[str, NodeProcess] = {}
    try:
        with pytest.MonkeyPatch.context() as patch:
            # A node that ignored engine_dir would export here, never into the checkout.
            patch.setenv('MALMM_ENGINE_DIR', str(root / 'default_cache'))
            for name, folder in folders.items():  # the environment is copied at start
                processes[name] = NodeProcess(DOMAIN_ID, [f'engine_dir:={folder}'],
                                              log_dir=root / 'logs', name=name)
        yield {name: Outcome(folders[name], *startup_outcome(process, 2 * WAIT_S),
                             root / 'default_cache')
               for name, process in processes.items()}
    finally:
        for process in processes.values():
            process.kill()


@pytest.mark.parametrize('case', sorted(CASES))
def test_unusable_engine_dir_exits_1_with_one_error_line_naming_it(
        outcomes: dict[str, Outcome], case: str) -> None:
    folder, returncode, stderr, default_dir = outcomes[case]
    errors = [line for line in stderr.splitlines() if line.startswith('ERROR:')]
    assert returncode != 'started', f'the node ignored engine_dir and started:\n{stderr[-2000:]}'
    assert returncode == 1, f'exit status {returncode}; stderr:\n{stderr[-2000:]}'
    assert len(errors) == 1, stderr[-3000:]
    assert f'engine_dir {folder}:' in errors[0], errors
    assert CASES[case][1] in errors[0], errors
    assert 'Traceback' not in stderr, stderr[-3000:]
    assert not default_dir.exists()  # nothing was exported anywhere else instead
