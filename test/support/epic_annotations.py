"""EpicAnnotations: every standard file of an EK-100 annotations folder in one object.

Test-side convenience over malmm_ros.data.epic's readers (the package reads the files it needs
one by one); it checks that the readers agree on the real folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from malmm_ros.data.epic import (
    TAIL_NOUNS_FILE,
    TAIL_VERBS_FILE,
    TEST_TIMESTAMPS_FILE,
    TRAIN_FILE,
    UNSEEN_TEST_FILE,
    UNSEEN_VALIDATION_FILE,
    VALIDATION_FILE,
    VIDEO_INFO_FILE,
    Segment,
    VideoInfo,
    action_vocabulary,
    load_segments,
    load_tail_classes,
    load_unseen_participants,
    load_video_info,
)
from malmm_ros.errors import DataError
from malmm_ros.labels import LabelMaps, load_ek100_labels

_LOG = logging.getLogger(__name__)


@dataclass
class EpicAnnotations:
    """The files of an EK-100 annotations folder; optional files that are absent are None."""

    root: Path
    labels: LabelMaps
    train: list[Segment] | None = None
    validation: list[Segment] | None = None
    test_timestamps: list[Segment] | None = None
    video_info: dict[str, VideoInfo] | None = None
    tail_verbs: frozenset[int] | None = None
    tail_nouns: frozenset[int] | None = None
    unseen_validation: frozenset[str] | None = None
    unseen_test: frozenset[str] | None = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> EpicAnnotations:
        """Load the standard files of an epic-kitchens-100-annotations folder.

        The verb and noun class CSVs are required (DataError naming the file when absent); the
        others are loaded when present. Class ids in segments and tail files are range-checked.
        """
        root = Path(path)
        labels = load_ek100_labels(root)  # raises for a missing folder or class file
        limits = {'num_verbs': labels.num_verbs, 'num_nouns': labels.num_nouns}

        def present(name: str) -> Path | None:
            file = root / name
            if file.is_file():
                return file
            pickle = file.with_suffix('.pkl')
            if pickle.is_file():
                # Not an error (the file is optional) but the user should know why it is unused.
                _LOG.warning('%s is ignored: pickles are never loaded; add %s', pickle, name)
            return None

        def segments(name: str) -> list[Segment] | None:
            file = present(name)
            return load_segments(file, **limits) if file else None

        tail_verbs_file, tail_nouns_file = present(TAIL_VERBS_FILE), present(TAIL_NOUNS_FILE)
        info_file = present(VIDEO_INFO_FILE)
        unseen_val, unseen_test = present(UNSEEN_VALIDATION_FILE), present(UNSEEN_TEST_FILE)
        return cls(
            root=root,
            labels=labels,
            train=segments(TRAIN_FILE),
            validation=segments(VALIDATION_FILE),
            test_timestamps=segments(TEST_TIMESTAMPS_FILE),
            video_info=load_video_info(info_file) if info_file else None,
            tail_verbs=(
                load_tail_classes(tail_verbs_file, num_classes=labels.num_verbs)
                if tail_verbs_file else None
            ),
            tail_nouns=(
                load_tail_classes(tail_nouns_file, num_classes=labels.num_nouns)
                if tail_nouns_file else None
            ),
            unseen_validation=load_unseen_participants(unseen_val) if unseen_val else None,
            unseen_test=load_unseen_participants(unseen_test) if unseen_test else None,
        )

    def action_vocabulary(self, *, include_validation: bool = False) -> list[tuple[int, int]]:
        """(verb, noun) pairs of the training split, plus validation when asked."""
        lists = [segs for segs in (self.train, self.validation if include_validation else None)
                 if segs is not None]
        if not lists:
            raise DataError(
                f'{self.root}: no {TRAIN_FILE}'
                + (f' or {VALIDATION_FILE}' if include_validation else '')
                + ' to build the action vocabulary from'
            )
        return action_vocabulary(*lists)

    def labels_with_actions(self, *, include_validation: bool = False) -> LabelMaps:
        """Label maps whose actions are :meth:`action_vocabulary`, named "verb noun"."""
        return self.labels.with_actions(
            self.action_vocabulary(include_validation=include_validation)
        )
