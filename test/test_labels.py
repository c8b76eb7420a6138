"""Tests for the EK-100 label vocabularies in malmm_ros.labels."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from malmm_ros.errors import DataError
from malmm_ros.labels import (
    ActionLabel,
    ClassLabel,
    LabelMaps,
    action_id,
    load_class_csv,
    load_ek100_labels,
    top_pairs,
)


def _epic_dir() -> Path:
    """EK-100 annotations folder: $MALMM_EPIC_DIR, else shared/epic100 beside the repo root."""
    env = os.environ.get('MALMM_EPIC_DIR')
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / 'shared' / 'epic100'


@pytest.fixture(scope='module')
def epic_dir() -> Path:
    folder = _epic_dir()
    if not (folder / 'EPIC_100_verb_classes.csv').is_file():
        pytest.skip(reason=f'EK-100 annotations not found in {folder} (set MALMM_EPIC_DIR)')
    return folder


@pytest.fixture(scope='module')
def ek100(epic_dir: Path) -> LabelMaps:
    return load_ek100_labels(epic_dir)


def _small() -> LabelMaps:
    return LabelMaps(
        verbs=(ClassLabel(0, 'take'), ClassLabel(1, 'put'), ClassLabel(2, 'wash')),
        nouns=(ClassLabel(0, 'tap'), ClassLabel(1, 'spoon')),
    )


# --- real EK-100 files ------------------------------------------------------------------------


def test_real_ek100_sizes_and_names(ek100: LabelMaps) -> None:
    assert ek100.num_verbs == 97
    assert ek100.num_nouns == 300
    assert ek100.num_actions == 0
    assert ek100.verb_name(0) == 'take'
    assert ek100.verb_name(1) == 'put'
    assert ek100.noun_name(0) == 'tap'
    assert ek100.noun_name(1) == 'spoon'
    assert [v.id for v in ek100.verbs] == list(range(97))
    assert [n.id for n in ek100.nouns] == list(range(300))


def test_real_ek100_class_csv_directly(epic_dir: Path) -> None:
    nouns = load_class_csv(epic_dir / 'EPIC_100_noun_classes.csv', kind='noun')
    assert len(nouns) == 300
    assert nouns[2] == ClassLabel(2, 'plate')


def test_real_ek100_round_trip_with_actions(ek100: LabelMaps) -> None:
    maps = ek100.with_actions([(0, 0), (1, 2), (96, 299)])
    assert [a.id for a in maps.actions] == [0, 1002, 96299]
    again = LabelMaps.from_dict(json.loads(json.dumps(maps.to_dict())))
    assert again == maps


def test_load_ek100_labels_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match='does not exist'):
        load_ek100_labels(tmp_path / 'nope')


def test_load_ek100_labels_missing_noun_file(tmp_path: Path) -> None:
    (tmp_path / 'EPIC_100_verb_classes.csv').write_text('id,key\n0,take\n')
    with pytest.raises(DataError, match='EPIC_100_noun_classes.csv not found'):
        load_ek100_labels(tmp_path)


def test_load_ek100_labels_small_folder(tmp_path: Path) -> None:
    (tmp_path / 'EPIC_100_verb_classes.csv').write_text('id,key\n0,take\n1,put\n')
    (tmp_path / 'EPIC_100_noun_classes.csv').write_text('id,key\n0,tap\n')
    maps = load_ek100_labels(str(tmp_path))
    assert maps == LabelMaps(
        verbs=(ClassLabel(0, 'take'), ClassLabel(1, 'put')), nouns=(ClassLabel(0, 'tap'),)
    )


# --- action ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ('verb', 'noun', 'expected'),
    [(0, 0, 0), (0, 999, 999), (1, 0, 1000), (3, 42, 3042), (96, 299, 96299), (1234, 5, 1234005)],
)
def test_action_id(verb: int, noun: int, expected: int) -> None:
    assert action_id(verb, noun) == expected


@pytest.mark.parametrize(
    ('verb', 'noun', 'match'),
    [(-1, 0, 'verb_id'), (0, -1, 'noun_id'), (0, 1000, 'noun_id must be below 1000')],
)
def test_action_id_rejects_out_of_range(verb: int, noun: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        action_id(verb, noun)


@pytest.mark.parametrize(('verb', 'noun'), [(1.0, 0), (0, '1'), (True, 0)])
def test_action_id_rejects_non_integers(verb: object, noun: object) -> None:
    with pytest.raises(TypeError):
        action_id(verb, noun)  # type: ignore[arg-type]


# --- LabelMaps --------------------------------------------------------------------------------


def test_placeholder_sizes_and_names() -> None:
    maps = LabelMaps.placeholder()
    assert (maps.num_verbs, maps.num_nouns, maps.num_actions) == (97, 300, 0)
    assert maps.verb_name(0) == 'verb_000'
    assert maps.verb_name(96) == 'verb_096'
    assert maps.noun_name(299) == 'noun_299'
    small = LabelMaps.placeholder(num_verbs=2, num_nouns=3)
    assert [v.name for v in small.verbs] == ['verb_000', 'verb_001']
    assert [n.name for n in small.nouns] == ['noun_000', 'noun_001', 'noun_002']


@pytest.mark.parametrize(('verbs', 'nouns'), [(0, 3), (3, 0), (-1, 3)])
def test_placeholder_rejects_empty(verbs: int, nouns: int) -> None:
    with pytest.raises(ValueError):
        LabelMaps.placeholder(verbs, nouns)


def test_with_actions_sorted_deduplicated_named() -> None:
    maps = _small().with_actions([(2, 1), (0, 0), (1, 1), (0, 0), (2, 1), (0, 1)])
    assert maps.actions == (
        ActionLabel(0, 0, 0, 'take tap'),
        ActionLabel(1, 0, 1, 'take spoon'),
        ActionLabel(1001, 1, 1, 'put spoon'),
        ActionLabel(2001, 2, 1, 'wash spoon'),
    )
    assert maps.num_actions == 4
    assert maps.verbs == _small().verbs
    # The original is left untouched, and a second call replaces rather than extends.
    assert _small().num_actions == 0
    assert maps.with_actions([(1, 0)]).actions == (ActionLabel(1000, 1, 0, 'put tap'),)


def test_with_actions_accepts_generator_and_empty() -> None:
    maps = _small().with_actions((v, 0) for v in (2, 1))
    assert [a.id for a in maps.actions] == [1000, 2000]
    assert _small().with_actions([]).actions == ()


@pytest.mark.parametrize(
    ('pairs', 'match'),
    [([(3, 0)], 'unknown verb id 3'), ([(0, 2)], 'unknown noun id 2'), ([(0,)], 'pair 0')],
)
def test_with_actions_rejects_bad_pairs(pairs: list[tuple[int, ...]], match: str) -> None:
    with pytest.raises(DataError, match=match):
        _small().with_actions(pairs)  # type: ignore[arg-type]


def test_name_lookup_out_of_range() -> None:
    maps = _small()
    with pytest.raises(IndexError, match='verb id 3'):
        maps.verb_name(3)
    with pytest.raises(IndexError, match='noun id -1'):
        maps.noun_name(-1)


def test_lists_are_stored_as_tuples_and_hashable() -> None:
    maps = LabelMaps(verbs=[ClassLabel(0, 'take')], nouns=[ClassLabel(0, 'tap')])  # type: ignore[arg-type]
    assert isinstance(maps.verbs, tuple)
    assert isinstance(maps.nouns, tuple)
    assert hash(maps) == hash(LabelMaps((ClassLabel(0, 'take'),), (ClassLabel(0, 'tap'),)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        maps.verbs = ()  # type: ignore[misc]


def test_duplicate_names_are_allowed() -> None:
    maps = LabelMaps(verbs=(ClassLabel(0, 'a'), ClassLabel(1, 'a')), nouns=(ClassLabel(0, 'b'),))
    assert maps.num_verbs == 2


@pytest.mark.parametrize(
    ('kwargs', 'match'),
    [
        ({'verbs': ()}, 'at least one'),
        ({'nouns': ()}, 'at least one'),
        ({'verbs': (ClassLabel(1, 'take'),)}, 'expected 0'),
        ({'nouns': (ClassLabel(0, 'tap'), ClassLabel(2, 'spoon'))}, r'nouns\[1\] has id 2'),
        ({'actions': (ActionLabel(5000, 5, 0, 'x'),)}, 'unknown verb id 5'),
        ({'actions': (ActionLabel(9, 0, 9, 'x'),)}, 'unknown noun id 9'),
        ({'actions': (ActionLabel(7, 1, 0, 'put tap'),)}, 'give action id 1000'),
        (
            {'actions': (ActionLabel(0, 0, 0, 'a'), ActionLabel(0, 0, 0, 'b'))},
            'duplicates action id 0',
        ),
    ],
)
def test_constructor_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(DataError, match=match):
        dataclasses.replace(_small(), **kwargs)


# --- to_dict / from_dict ----------------------------------------------------------------------


def test_dict_round_trip() -> None:
    maps = _small().with_actions([(0, 1), (2, 0)])
    data = maps.to_dict()
    assert data['verbs'][1] == {'id': 1, 'name': 'put'}
    assert data['actions'][1] == {'id': 2000, 'verb_id': 2, 'noun_id': 0, 'name': 'wash tap'}
    assert LabelMaps.from_dict(data) == maps
    assert LabelMaps.from_dict(json.loads(json.dumps(data))) == maps


def test_dict_round_trip_without_actions() -> None:
    maps = LabelMaps.placeholder(4, 5)
    data = json.loads(json.dumps(maps.to_dict()))
    assert data['actions'] == []
    del data['actions']  # actions are optional on input
    assert LabelMaps.from_dict(data) == maps


_DELETE = object()


def _good_dict() -> dict:
    return _small().with_actions([(1, 1)]).to_dict()


def _edit(path: tuple[object, ...], value: object) -> dict:
    data = _good_dict()
    target = data
    for key in path[:-1]:
        target = target[key]  # type: ignore[index]
    if value is _DELETE:
        del target[path[-1]]  # type: ignore[arg-type]
    else:
        target[path[-1]] = value  # type: ignore[index]
    return data


@pytest.mark.parametrize(
    ('path', 'value', 'match'),
    [
        (('actions', 0, 'verb_id'), 7, 'unknown verb id 7'),
        (('actions', 0, 'id'), 1002, 'has id 1002'),
        (('verbs', 1, 'id'), 5, r'verbs\[1\] has id 5'),
        (('nouns', 0, 'id'), 1, r'nouns\[0\] has id 1'),
        (('verbs',), _DELETE, "missing field 'verbs'"),
        (('nouns',), 'tap', "field 'nouns' must be a list"),
        (('verbs', 0, 'name'), _DELETE, r"verbs\[0\] is missing field 'name'"),
        (('verbs', 0, 'id'), '0', r'verbs\[0\]\.id must be an int'),
        (('actions', 0, 'name'), 3, r'actions\[0\]\.name must be a string'),
        (('actions', 0), 'take tap', r'actions\[0\] must be a mapping'),
    ],
)
def test_from_dict_rejects_bad_input(path: tuple[object, ...], value: object, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        LabelMaps.from_dict(_edit(path, value), source='labels.json')
    assert str(info.value).startswith('labels.json: ')


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(DataError, match='cfg.yaml: label maps must be a mapping'):
        LabelMaps.from_dict([], source='cfg.yaml')  # type: ignore[arg-type]


# --- load_class_csv ---------------------------------------------------------------------------


def test_load_class_csv_extra_columns_bom_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / 'verbs.csv'
    path.write_text(
        '\ufeffid,key,instances,category\n'
        "0,take,\"['take', 'grab']\",retrieve\n"
        '1, put ,"[\'put\']",leave\n'
        '\n',
        encoding='utf-8',
    )
    assert load_class_csv(path, kind='verb') == (ClassLabel(0, 'take'), ClassLabel(1, 'put'))


def test_load_class_csv_column_order_does_not_matter(tmp_path: Path) -> None:
    path = tmp_path / 'nouns.csv'
    path.write_text('category,key,id\nappliances,tap,0\ncutlery,spoon,1\n')
    assert load_class_csv(str(path), kind='noun') == (ClassLabel(0, 'tap'), ClassLabel(1, 'spoon'))


@pytest.mark.parametrize(
    ('text', 'match'),
    [
        pytest.param('id,name\n0,take\n', r"line 1: missing column 'key'", id='missing-key-col'),
        pytest.param('key\ntake\n', r"line 1: missing column 'id'", id='missing-id-col'),
        pytest.param(
            'id,key\n0,take\n1,put\nx,wash\n',
            r"line 4, column 'id': expected an integer, got 'x'",
            id='non-integer-id',
        ),
        pytest.param(
            'id,key\n0,take\n1.0,put\n', r"line 3, column 'id': expected an integer", id='float-id'
        ),
        pytest.param(
            'id,key\n0,take\n2,put\n', r"line 3, column 'id': expected id 1.*got 2", id='id-gap'
        ),
        pytest.param(
            'id,key\n1,take\n', r"line 2, column 'id': expected id 0.*got 1", id='id-not-from-0'
        ),
        pytest.param(
            'id,key\n0,take\n0,put\n', r"line 3, column 'id': expected id 1", id='id-repeated'
        ),
        pytest.param('id,key\n0,take\n1,  \n', r"line 3, column 'key': empty", id='empty-key'),
        pytest.param('id,key\n0,take\n1\n', r"line 3, column 'key': empty", id='short-row'),
        pytest.param('', 'is empty', id='empty-file'),
        pytest.param('\n\n', 'is empty', id='blank-file'),
        pytest.param('id,key\n', 'no classes', id='header-only'),
    ],
)
def test_load_class_csv_rejects_bad_files(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / 'bad_verbs.csv'
    path.write_text(text)
    with pytest.raises(DataError, match=match) as info:
        load_class_csv(path, kind='verb')
    message = str(info.value)
    assert str(path) in message
    assert message.startswith('verb class file')


def test_load_class_csv_missing_file(tmp_path: Path) -> None:
    path = tmp_path / 'absent.csv'
    with pytest.raises(DataError, match=r'noun class file .*absent\.csv not found'):
        load_class_csv(path, kind='noun')


def test_load_class_csv_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match='is a directory'):
        load_class_csv(tmp_path, kind='noun')


def test_load_class_csv_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / 'latin1.csv'
    path.write_bytes(b'id,key\n0,caf\xe9\n')
    with pytest.raises(DataError, match='not valid UTF-8'):
        load_class_csv(path, kind='noun')


# -- top (verb, noun) pairs ------------------------------------------------------------------


def _brute_force_pairs(verb: np.ndarray, noun: np.ndarray, k: int
                       ) -> list[tuple[float, int, int]]:
    """Every (verb, noun) pair scored and sorted (ties: lower verb, then lower noun), k kept."""
    pairs = [(verb[v] * noun[n], v, n)
             for v, n in itertools.product(range(len(verb)), range(len(noun)))]
    pairs.sort(key=lambda item: (-item[0], item[1], item[2]))
    return pairs[:k]


@pytest.mark.parametrize(
    ('num_verbs', 'num_nouns', 'k'),
    [(97, 300, 5), (10, 20, 1), (3, 50, 5), (50, 2, 5), (4, 3, 20), (1, 1, 5), (30, 30, 12),
     (20, 30, 100)],
)
def test_top_pairs_equal_brute_force(num_verbs: int, num_nouns: int, k: int) -> None:
    rng = np.random.default_rng(num_verbs * 1000 + num_nouns + k)
    for _ in range(3):
        verb, noun = rng.dirichlet(np.ones(num_verbs)), rng.dirichlet(np.ones(num_nouns))
        pairs = top_pairs(verb, noun, k)
        expected = _brute_force_pairs(verb, noun, k)
        assert len(pairs) == min(k, num_verbs * num_nouns)
        assert [(v, n) for v, n, _ in pairs] == [(v, n) for _, v, n in expected]
        np.testing.assert_allclose([s for _, _, s in pairs], [s for s, _, _ in expected],
                                   rtol=1e-12)
        for v, n, score in pairs:  # the scores are the products of the ids' probabilities
            assert score == pytest.approx(verb[v] * noun[n])


def test_top_pairs_with_peaked_distributions() -> None:
    pairs = top_pairs(np.array([0.05, 0.9, 0.05]), np.array([0.1, 0.2, 0.7]), 2)
    assert [(v, n) for v, n, _ in pairs] == [(1, 2), (1, 1)]
    np.testing.assert_allclose([s for _, _, s in pairs], [0.63, 0.18])


def test_top_pairs_break_ties_by_id() -> None:
    """Equal probabilities: the lower ids first, the same in the node and the evaluation."""
    pairs = top_pairs(np.full(4, 0.25), np.full(3, 1 / 3), 5)
    assert [(v, n) for v, n, _ in pairs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
