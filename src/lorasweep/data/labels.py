"""The label map: class names by id, and the checks made on the classes a run trains on.

Owns `LabelMap` (the id <-> name mapping saved with every run and read back by predict, export and
modeling), the dummy label slots kept for later class growth, the "at least 2 classes" check, the
policy for validation/test labels absent from train, and `label_to_text`, the one rule that turns a
label value into its class name for training and prediction alike. It reads no files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from lorasweep.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class LabelMap:
    """Class names by id. Slots past the real classes are dummies kept for later label growth."""

    labels: list[str]
    num_real: int

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    def to_json(self) -> dict:
        return {"id2label": {str(i): n for i, n in enumerate(self.labels)},
                "label2id": self.label2id, "num_labels": len(self.labels),
                "num_real_labels": self.num_real}

    @classmethod
    def from_json(cls, payload: dict) -> LabelMap:
        id2label = payload["id2label"]
        labels = [id2label[str(i)] for i in range(len(id2label))]
        return cls(labels=labels, num_real=payload.get("num_real_labels", len(labels)))



def label_to_text(value: Any) -> str:
    """A label value as its class name (whitespace around it stripped, as in training)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def check_class_count(train_classes: Sequence[Any], label_column: str) -> None:
    """One class in train would give a 1-label model that scores 1.0 on everything."""
    if len(train_classes) < 2:
        found = f" ({train_classes[0]!r})" if train_classes else ""
        raise DataError(f"data.label_column={label_column!r}: {len(train_classes)} class in the "
                        f"train split{found}; a classifier needs at least 2")


def build_label_map(train_labels: Sequence[str], max_classes: int | None,
                    dummy_prefix: str) -> LabelMap:
    """Sorted class names, padded with dummy slots up to `max_classes`."""
    return pad_label_slots(sorted(set(train_labels)), max_classes, dummy_prefix)


def pad_label_slots(real: list[str], max_classes: int | None, dummy_prefix: str) -> LabelMap:
    """`real` names keep their ids; dummy slots follow, up to `max_classes`."""
    if max_classes is None:
        return LabelMap(labels=list(real), num_real=len(real))
    if len(real) > max_classes:
        raise DataError(f"data.max_classes={max_classes}: the train split has {len(real)} classes")
    taken = set(real)
    dummies, i = [], 0
    while len(real) + len(dummies) < max_classes:
        i += 1
        name = f"{dummy_prefix}{i}"
        if name not in taken:
            dummies.append(name)
    return LabelMap(labels=list(real) + dummies, num_real=len(real))


def check_unknown_labels(splits: datasets.DatasetDict, label_map: LabelMap, label_column: str,
                         policy: str) -> datasets.DatasetDict:
    known = label_map.label2id
    for name in ("validation", "test"):
        unknown = sorted(set(splits[name][label_column]) - set(known))
        if not unknown:
            continue
        if policy == "error":
            raise DataError(f"{name} split has {len(unknown)} label(s) absent from train: "
                            f"{', '.join(unknown[:10])} (set data.unknown_label=drop to drop them)")
        before = len(splits[name])
        splits[name] = splits[name].filter(lambda v: v in known, input_columns=label_column)
        log.warning("dropped %d %s rows with labels absent from train: %s",
                    before - len(splits[name]), name, ", ".join(unknown[:10]))
        if len(splits[name]) == 0:
            raise DataError(f"{name} split is empty after dropping labels absent from train")
    return splits
