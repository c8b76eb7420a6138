"""Verb, noun and action vocabularies of EPIC-KITCHENS-100 action anticipation.

The model predicts class indices; these maps turn them back into names and into the official
EK-100 action ids (``verb_id * 1000 + noun_id``) used by the challenge evaluation.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from malmm_ros.errors import DataError
from malmm_ros.files import open_csv

__all__ = [
    'ActionLabel',
    'ClassLabel',
    'LabelMaps',
    'NOUN_CLASSES_FILE',
    'VERB_CLASSES_FILE',
    'action_id',
    'action_ids',
    'load_class_csv',
    'load_ek100_labels',
    'top_pairs',
]

VERB_CLASSES_FILE = 'EPIC_100_verb_classes.csv'
NOUN_CLASSES_FILE = 'EPIC_100_noun_classes.csv'

# EK-100 packs an action as verb * 1000 + noun, so noun ids must stay below this.
_ACTION_STRIDE = 1000

# Plain ASCII integers only: int() would also accept '1_000' and non-ASCII digits.
_INT_RE = re.compile(r'[+-]?[0-9]+')


@dataclass(frozen=True)
class ClassLabel:
    """One verb or noun class: its index in the model output and its display name."""

    id: int
    name: str


@dataclass(frozen=True)
class ActionLabel:
    """One (verb, noun) action class with its official EK-100 id ``verb_id * 1000 + noun_id``."""

    id: int
    verb_id: int
    noun_id: int
    name: str


def _is_int(value: object) -> bool:
    """True for real integers; bools are rejected so ``True`` never passes as class 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def action_id(verb_id: int, noun_id: int) -> int:
    """Return the official EK-100 action id ``verb_id * 1000 + noun_id``.

    Raises ValueError for negative ids or a noun id above 999, which would collide with the next
    verb's range, and TypeError for non-integers.
    """
    for field, value in (('verb_id', verb_id), ('noun_id', noun_id)):
        if not _is_int(value):
            raise TypeError(f'{field} must be an int, got {type(value).__name__} {value!r}')
        if value < 0:
            raise ValueError(f'{field} must be >= 0, got {value}')
    if noun_id >= _ACTION_STRIDE:
        raise ValueError(f'noun_id must be below {_ACTION_STRIDE}, got {noun_id}')
    return int(verb_id) * _ACTION_STRIDE + int(noun_id)


def action_ids(verb_ids: np.ndarray, noun_ids: np.ndarray) -> np.ndarray:
    """`action_id` for arrays of non-negative class ids (int64, same shape)."""
    verbs, nouns = np.asarray(verb_ids, dtype=np.int64), np.asarray(noun_ids, dtype=np.int64)
    if (verbs < 0).any() or (nouns < 0).any() or (nouns >= _ACTION_STRIDE).any():
        raise ValueError(f'class ids must be >= 0 and noun ids below {_ACTION_STRIDE}')
    return verbs * _ACTION_STRIDE + nouns


def top_pairs(verb_probs: np.ndarray, noun_probs: np.ndarray, k: int
              ) -> list[tuple[int, int, float]]:
    """The k best (verb id, noun id, p(verb) * p(noun)) of one prediction, best first.

    The best k pairs only involve the k best verbs and the k best nouns, so a k x k product
    suffices. Sorting is stable: ties go to the better-ranked verb, then noun (lower ids first
    among equal probabilities), so the node and the evaluation rank pairs alike.
    """
    verbs = np.argsort(-verb_probs, kind='stable')[:k]  # (k_v,)
    nouns = np.argsort(-noun_probs, kind='stable')[:k]  # (k_n,)
    product = (verb_probs[verbs][:, None] * noun_probs[nouns][None, :]).reshape(-1)  # k_v*k_n
    best = np.argsort(-product, kind='stable')[:k]
    return [(int(verbs[i // len(nouns)]), int(nouns[i % len(nouns)]), float(product[i]))
            for i in best]


def _check_classes(labels: Sequence[object], kind: str) -> tuple[ClassLabel, ...]:
    """Validate that a class list is non-empty and holds ids 0..n-1 in order."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
        raise DataError(f'{kind}s must be a sequence of ClassLabel, got {type(labels).__name__}')
    result = tuple(labels)
    if not result:
        raise DataError(f'{kind}s must hold at least one class')
    for index, label in enumerate(result):
        if not isinstance(label, ClassLabel):
            raise DataError(f'{kind}s[{index}] must be a ClassLabel, got {type(label).__name__}')
        if not _is_int(label.id):
            raise DataError(f'{kind}s[{index}].id must be an int, got {label.id!r}')
        if label.id != index:
            raise DataError(
                f'{kind} ids must be 0..{len(result) - 1} in order: '
                f'{kind}s[{index}] has id {label.id}, expected {index}'
            )
        if not isinstance(label.name, str):
            raise DataError(f'{kind}s[{index}].name must be a string, got {label.name!r}')
    return result


@dataclass(frozen=True)
class LabelMaps:
    """Verb, noun and optional action vocabularies; index ``i`` of each class tuple is id ``i``.

    An empty ``actions`` tuple means the model scores actions as the verb x noun product.
    """

    verbs: tuple[ClassLabel, ...]
    nouns: tuple[ClassLabel, ...]
    actions: tuple[ActionLabel, ...] = ()

    def __post_init__(self) -> None:
        verbs = _check_classes(self.verbs, 'verb')
        nouns = _check_classes(self.nouns, 'noun')
        if isinstance(self.actions, (str, bytes)) or not isinstance(self.actions, Iterable):
            raise DataError(
                f'actions must be a sequence of ActionLabel, got {type(self.actions).__name__}'
            )
        actions = tuple(self.actions)
        seen: dict[int, int] = {}
        for index, action in enumerate(actions):
            where = f'actions[{index}]'
            if not isinstance(action, ActionLabel):
                raise DataError(f'{where} must be an ActionLabel, got {type(action).__name__}')
            for field in ('id', 'verb_id', 'noun_id'):
                value = getattr(action, field)
                if not _is_int(value):
                    raise DataError(f'{where}.{field} must be an int, got {value!r}')
            if not 0 <= action.verb_id < len(verbs):
                raise DataError(
                    f'{where} refers to unknown verb id {action.verb_id} '
                    f'(verb ids are 0..{len(verbs) - 1})'
                )
            if not 0 <= action.noun_id < len(nouns):
                raise DataError(
                    f'{where} refers to unknown noun id {action.noun_id} '
                    f'(noun ids are 0..{len(nouns) - 1})'
                )
            try:
                expected = action_id(action.verb_id, action.noun_id)
            except ValueError as exc:
                raise DataError(f'{where}: {exc}') from None
            if action.id != expected:
                raise DataError(
                    f'{where} has id {action.id} but verb {action.verb_id} and noun '
                    f'{action.noun_id} give action id {expected}'
                )
            if not isinstance(action.name, str):
                raise DataError(f'{where}.name must be a string, got {action.name!r}')
            if action.id in seen:
                raise DataError(
                    f'{where} duplicates action id {action.id} of actions[{seen[action.id]}]'
                )
            seen[action.id] = index
        # Store tuples so the instance stays immutable and hashable even if lists were passed.
        object.__setattr__(self, 'verbs', verbs)
        object.__setattr__(self, 'nouns', nouns)
        object.__setattr__(self, 'actions', actions)

    @property
    def num_verbs(self) -> int:
        """Number of verb classes."""
        return len(self.verbs)

    @property
    def num_nouns(self) -> int:
        """Number of noun classes."""
        return len(self.nouns)

    @property
    def num_actions(self) -> int:
        """Number of explicit action classes (0 when actions are scored as verb x noun)."""
        return len(self.actions)

    def verb_name(self, verb_id: int) -> str:
        """Name of verb ``verb_id``; IndexError if out of range (negative ids do not wrap)."""
        return _lookup(self.verbs, verb_id, 'verb')

    def noun_name(self, noun_id: int) -> str:
        """Name of noun ``noun_id``; IndexError if out of range (negative ids do not wrap)."""
        return _lookup(self.nouns, noun_id, 'noun')

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        """Return a JSON-safe dict that :meth:`from_dict` turns back into an equal object."""
        return {
            'verbs': [{'id': v.id, 'name': v.name} for v in self.verbs],
            'nouns': [{'id': n.id, 'name': n.name} for n in self.nouns],
            'actions': [
                {'id': a.id, 'verb_id': a.verb_id, 'noun_id': a.noun_id, 'name': a.name}
                for a in self.actions
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = '<dict>') -> LabelMaps:
        """Build label maps from :meth:`to_dict` output; errors name ``source`` and the field."""
        if not isinstance(data, Mapping):
            raise DataError(f'{source}: label maps must be a mapping, got {type(data).__name__}')
        verbs = _parse_classes(data, 'verbs', source)
        nouns = _parse_classes(data, 'nouns', source)
        actions = _parse_actions(data, source)
        try:
            return cls(verbs=verbs, nouns=nouns, actions=actions)
        except DataError as exc:
            raise DataError(f'{source}: {exc}') from None

    @classmethod
    def placeholder(cls, num_verbs: int = 97, num_nouns: int = 300) -> LabelMaps:
        """Label maps with generic names ("verb_000", "noun_000", ...) for when no CSVs are set."""
        for field, value in (('num_verbs', num_verbs), ('num_nouns', num_nouns)):
            if not _is_int(value) or value < 1:
                raise ValueError(f'{field} must be a positive int, got {value!r}')
        return cls(
            verbs=tuple(ClassLabel(i, f'verb_{i:03d}') for i in range(num_verbs)),
            nouns=tuple(ClassLabel(i, f'noun_{i:03d}') for i in range(num_nouns)),
        )

    def with_actions(self, pairs: Iterable[tuple[int, int]]) -> LabelMaps:
        """Return a copy whose action vocabulary is built from (verb_id, noun_id) pairs.

        Replaces any existing actions; the result is sorted by action id, without duplicates, and
        named "verb_name noun_name". DataError if a pair names an unknown verb or noun.
        """
        by_id: dict[int, ActionLabel] = {}
        for index, pair in enumerate(pairs):
            try:
                verb, noun = pair
            except (TypeError, ValueError):
                raise DataError(
                    f'action pair {index} must be a (verb_id, noun_id) pair, got {pair!r}'
                ) from None
            if not (_is_int(verb) and 0 <= verb < self.num_verbs):
                raise DataError(
                    f'action pair {index} ({verb!r}, {noun!r}) has unknown verb id {verb!r} '
                    f'(verb ids are 0..{self.num_verbs - 1})'
                )
            if not (_is_int(noun) and 0 <= noun < self.num_nouns):
                raise DataError(
                    f'action pair {index} ({verb!r}, {noun!r}) has unknown noun id {noun!r} '
                    f'(noun ids are 0..{self.num_nouns - 1})'
                )
            try:
                aid = action_id(verb, noun)
            except ValueError as exc:
                raise DataError(f'action pair {index}: {exc}') from None
            if aid not in by_id:
                name = f'{self.verbs[verb].name} {self.nouns[noun].name}'
                by_id[aid] = ActionLabel(aid, int(verb), int(noun), name)
        actions = tuple(by_id[aid] for aid in sorted(by_id))
        return dataclasses.replace(self, actions=actions)


def _lookup(labels: tuple[ClassLabel, ...], class_id: int, kind: str) -> str:
    """Name of class ``class_id``; refuses negative ids that Python indexing would wrap."""
    if not _is_int(class_id) or not 0 <= class_id < len(labels):
        raise IndexError(f'unknown {kind} id {class_id!r} ({kind} ids are 0..{len(labels) - 1})')
    return labels[class_id].name


def _get_list(data: Mapping[str, Any], key: str, source: str, *, required: bool) -> list[Any]:
    """Fetch a list field from a dict, with errors that name the source and the field."""
    if key not in data:
        if required:
            raise DataError(f"{source}: missing field '{key}'")
        return []
    value = data[key]
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{source}: field '{key}' must be a list, got {type(value).__name__}")
    return list(value)


def _get_field(entry: Mapping[str, Any], key: str, where: str, source: str, kind: type) -> Any:
    """Fetch one typed field of a list entry, with errors that name the source and the field."""
    if key not in entry:
        raise DataError(f"{source}: {where} is missing field '{key}'")
    value = entry[key]
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise DataError(
            f'{source}: {where}.{key} must be {"an int" if kind is int else "a string"}, '
            f'got {value!r}'
        )
    return value


def _parse_classes(data: Mapping[str, Any], key: str, source: str) -> tuple[ClassLabel, ...]:
    """Parse the 'verbs' or 'nouns' list of a :meth:`LabelMaps.to_dict` dict."""
    result = []
    for index, entry in enumerate(_get_list(data, key, source, required=True)):
        where = f'{key}[{index}]'
        if not isinstance(entry, Mapping):
            raise DataError(f'{source}: {where} must be a mapping, got {type(entry).__name__}')
        result.append(
            ClassLabel(
                id=_get_field(entry, 'id', where, source, int),
                name=_get_field(entry, 'name', where, source, str),
            )
        )
    return tuple(result)


def _parse_actions(data: Mapping[str, Any], source: str) -> tuple[ActionLabel, ...]:
    """Parse the optional 'actions' list of a :meth:`LabelMaps.to_dict` dict."""
    result = []
    for index, entry in enumerate(_get_list(data, 'actions', source, required=False)):
        where = f'actions[{index}]'
        if not isinstance(entry, Mapping):
            raise DataError(f'{source}: {where} must be a mapping, got {type(entry).__name__}')
        result.append(
            ActionLabel(
                id=_get_field(entry, 'id', where, source, int),
                verb_id=_get_field(entry, 'verb_id', where, source, int),
                noun_id=_get_field(entry, 'noun_id', where, source, int),
                name=_get_field(entry, 'name', where, source, str),
            )
        )
    return tuple(result)


def load_class_csv(path: str | os.PathLike[str], *, kind: str) -> tuple[ClassLabel, ...]:
    """Read an EK-100 class CSV (columns ``id,key,...``) into class labels with ids 0..n-1.

    ``kind`` ("verb" or "noun") only labels error messages, which name the file, the 1-based
    line and the column at fault.
    """
    path = Path(path)
    what = f'{kind} class file {path}'
    with open_csv(path, what) as handle:
        return _read_class_rows(csv.reader(handle), what)


def _read_class_rows(reader: Any, what: str) -> tuple[ClassLabel, ...]:
    """Parse the rows of a class CSV; ``what`` names the file in error messages."""
    try:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)
        if header is None:
            raise DataError(f'{what} is empty (expected a header line with id and key columns)')
        header_line = reader.line_num
        columns = [cell.strip() for cell in header]
        for required in ('id', 'key'):
            if required not in columns:
                raise DataError(
                    f"{what}, line {header_line}: missing column '{required}' "
                    f'(header has {", ".join(repr(c) for c in columns)})'
                )
        id_col = columns.index('id')
        key_col = columns.index('key')
        labels: list[ClassLabel] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line, e.g. a trailing newline
            line = reader.line_num
            raw_id = row[id_col].strip() if id_col < len(row) else ''
            if not _INT_RE.fullmatch(raw_id):
                raise DataError(
                    f"{what}, line {line}, column 'id': expected an integer, got {raw_id!r}"
                )
            class_id = int(raw_id)
            if class_id != len(labels):
                raise DataError(
                    f"{what}, line {line}, column 'id': expected id {len(labels)} "
                    f'(ids must be 0..n-1 in order), got {class_id}'
                )
            key = row[key_col].strip() if key_col < len(row) else ''
            if not key:
                raise DataError(f"{what}, line {line}, column 'key': empty class name")
            labels.append(ClassLabel(class_id, key))
    except csv.Error as exc:
        raise DataError(f'{what}, line {reader.line_num}: malformed CSV: {exc}') from None
    if not labels:
        raise DataError(f'{what} has a header but no classes')
    return tuple(labels)


def load_ek100_labels(annotations_dir: str | os.PathLike[str]) -> LabelMaps:
    """Load the verb and noun vocabularies from an EK-100 annotations folder.

    Reads ``EPIC_100_verb_classes.csv`` and ``EPIC_100_noun_classes.csv``; the action vocabulary is
    left empty (see :meth:`LabelMaps.with_actions`).
    """
    folder = Path(annotations_dir)
    if not folder.is_dir():
        raise DataError(f'EK-100 annotations folder {folder} does not exist or is not a folder')
    verbs = load_class_csv(folder / VERB_CLASSES_FILE, kind='verb')
    nouns = load_class_csv(folder / NOUN_CLASSES_FILE, kind='noun')
    return LabelMaps(verbs=verbs, nouns=nouns)
