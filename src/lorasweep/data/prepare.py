"""Turn the configured input into `PreparedData`: split rows, label map, tokenized splits.

`prepare_data` chains the steps, each a module-level function in its own module of this package:
tables reads and splits, labels builds the label map, serialization turns rows into text, and
cache keys and stores the result. This module owns the chain itself, tokenization, a DatasetDict
that arrives tokenized already, and the diagnostics (token lengths, class counts) logged for each
run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np

from lorasweep import distributed
from lorasweep.data.cache import PreparedData, load_prepared, prepared_key, save_prepared
from lorasweep.data.labels import (
    LabelMap,
    build_label_map,
    check_class_count,
    check_unknown_labels,
    pad_label_slots,
)
from lorasweep.data.serialization import serialization_settings, serialize_batch
from lorasweep.data.tables import SPLITS, load_dataset_dict, load_splits
from lorasweep.errors import DataError

log = logging.getLogger(__name__)

MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")
PERCENTILES = (50, 75, 90, 95, 99)


# ---------------------------------------------------------------------------- tokenized input


def prepare_pretokenized(loaded: datasets.DatasetDict, data_cfg, tokenizer) -> PreparedData:
    """A DatasetDict that already has input_ids (tokenized upstream): used in place, not cached
    (there is nothing to tokenize, and a copy of a large dataset would only cost disk).

    Class ids are kept: names come from a ClassLabel feature, else the ids are the names. For
    validation and test the decoded text is kept beside the label, so the prediction reports show
    what the model saw; train keeps only its labels (decoding every train row buys nothing).
    """
    path, column = data_cfg.train_path, data_cfg.label_column
    for name in SPLITS:
        if column not in loaded[name].column_names:
            raise DataError(f"data.label_column={column!r}: no such column in the {name} split of "
                            f"{path} (columns: {', '.join(loaded[name].column_names)})")
    names = pretokenized_label_names(loaded, column, path, len(tokenizer))
    check_class_count(loaded["train"].unique(column), column)
    label_map = pad_label_slots(names, data_cfg.max_classes, data_cfg.dummy_prefix)
    keep = [c for c in MODEL_COLUMNS if c in loaded["train"].column_names and c != "labels"]
    tokenized = datasets.DatasetDict({
        name: split.select_columns(keep + [column]).rename_columns(
            {column: "labels"} if column != "labels" else {})
        for name, split in loaded.items() if name in SPLITS})
    raw = datasets.DatasetDict({
        name: datasets.Dataset.from_dict({
            "text": (tokenizer.batch_decode(list(split["input_ids"]), skip_special_tokens=True)
                     if name != "train" else [""] * len(split)),
            column: [label_map.labels[i] for i in split["labels"]]})
        for name, split in tokenized.items()})
    settings = {"text_columns": ["text"], "separator": "", "include_column_names": False,
                "null_token": None, "pretokenized": True}
    import pyarrow.compute as pc

    lengths = pc.list_value_length(tokenized["train"].with_format("arrow")["input_ids"])
    meta = diagnostics(raw, lengths.to_numpy(zero_copy_only=False), raw["test"]["text"][0],
                       data_cfg, settings, label_map)
    meta["split"] = {"split": "given (load_from_disk, pre-tokenized)"}
    meta["serialization"] = settings
    return PreparedData(raw=raw, tokenized=tokenized, label_map=label_map,
                        serialization=settings, metadata=meta)


def pretokenized_label_names(loaded: datasets.DatasetDict, column: str, path: str,
                             vocab_size: int) -> list[str]:
    """Names by class id; checks ids and token ids against the tokenizer before any training."""
    import pyarrow as pa
    import pyarrow.compute as pc

    feature = loaded["train"].features[column]
    top_id = -1
    for name in SPLITS:
        ids = loaded[name].with_format("arrow")[column]
        if not pa.types.is_integer(ids.type) or ids.null_count:
            raise DataError(f"data.label_column={column!r} in {path}: a tokenized DatasetDict "
                            f"needs integer class ids or a ClassLabel (found {ids.type}, "
                            f"{ids.null_count} missing)")
        low, high = pc.min(ids).as_py(), pc.max(ids).as_py()
        if low < 0:
            raise DataError(f"data.label_column={column!r}: the {name} split of {path} has class "
                            f"id {low}; expected ids >= 0")
        top_id = max(top_id, high)
        tokens = pc.max(pc.list_flatten(loaded[name].with_format("arrow")["input_ids"])).as_py()
        if tokens is not None and tokens >= vocab_size:
            raise DataError(f"{path}: the {name} split has token id {tokens} but the tokenizer has "
                            f"{vocab_size} tokens: was it tokenized with another tokenizer?")
    if isinstance(feature, datasets.ClassLabel):
        if top_id >= feature.num_classes:
            raise DataError(f"data.label_column={column!r}: class id {top_id} is outside the "
                            f"ClassLabel's {feature.num_classes} names in {path}")
        return list(feature.names)
    return [str(i) for i in range(top_id + 1)]


# ---------------------------------------------------------------------------- tokenization


def _tokenize_batch(batch, tokenizer, settings, label2id, label_column, max_length, padding):
    encoded = tokenizer(serialize_batch(batch, settings), truncation=True, max_length=max_length,
                        padding="max_length" if padding == "max_length" else False)
    encoded["labels"] = [label2id[v] for v in batch[label_column]]
    return encoded


def tokenize_splits(splits: datasets.DatasetDict, tokenizer, label_map: LabelMap, data_cfg,
                    settings: dict[str, Any]) -> datasets.DatasetDict:
    fn_kwargs = dict(tokenizer=tokenizer, settings=settings, label2id=label_map.label2id,
                     label_column=data_cfg.label_column, max_length=data_cfg.max_length,
                     padding=data_cfg.padding)
    return datasets.DatasetDict({
        name: split.map(_tokenize_batch, batched=True, fn_kwargs=fn_kwargs,
                        num_proc=data_cfg.num_proc if data_cfg.num_proc > 1 else None,
                        remove_columns=split.column_names, desc=f"tokenize {name}")
        for name, split in splits.items()
    })


# ---------------------------------------------------------------------------- diagnostics


def sample_token_lengths(train: datasets.Dataset, tokenizer, settings: dict[str, Any],
                         sample_size: int = 2000) -> tuple[np.ndarray, str]:
    """Untruncated token lengths of the first `sample_size` train rows, and the first row's text."""
    sample = train.select(range(min(sample_size, len(train))))
    texts = serialize_batch(sample.to_dict(), settings)
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]])
    return lengths, texts[0] if texts else ""


def diagnostics(raw: datasets.DatasetDict, lengths: np.ndarray, example_text: str, data_cfg,
                settings: dict[str, Any], label_map: LabelMap) -> dict[str, Any]:
    """Token-length percentiles and truncation share, class counts per split, rare classes."""
    truncated = float(np.mean(lengths > data_cfg.max_length)) if len(lengths) else 0.0
    counts = {name: _class_counts(split[data_cfg.label_column]) for name, split in raw.items()}
    rare = sorted(k for k, v in counts["train"].items() if v < data_cfg.rare_class_min_rows)
    meta = {
        "rows": {name: len(split) for name, split in raw.items()},
        "num_classes": label_map.num_real, "num_label_slots": len(label_map.labels),
        "text_columns": settings["text_columns"],
        "token_length": {f"p{p}": float(np.percentile(lengths, p)) for p in PERCENTILES},
        "token_length_sample_size": int(len(lengths)),
        "max_length": data_cfg.max_length, "truncated_share": truncated,
        "class_counts": counts,
        "rare_classes": {"min_rows": data_cfg.rare_class_min_rows, "classes": rare},
        "example_text": example_text,
    }
    if truncated > 0.05 and not settings.get("pretokenized"):
        log.warning("%.1f%% of rows are longer than data.max_length=%d and get truncated "
                    "(p95 = %d tokens): consider raising data.max_length", 100 * truncated,
                    data_cfg.max_length, meta["token_length"]["p95"])
    elif truncated > 0.05:
        log.warning("%.1f%% of the pre-tokenized rows are longer than data.max_length=%d; they are "
                    "used as they are (lorasweep does not re-tokenize a tokenized DatasetDict)",
                    100 * truncated, data_cfg.max_length)
    return meta


def _class_counts(labels: Sequence[str]) -> dict[str, int]:
    names, counts = np.unique(np.asarray(labels), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return {str(names[i]): int(counts[i]) for i in order}


def format_diagnostics(meta: dict[str, Any]) -> str:
    rows = meta["rows"]
    lengths = ", ".join(f"{k}={v:.0f}" for k, v in meta["token_length"].items())
    lines = [
        f"data: {rows['train']} train / {rows['validation']} validation / {rows['test']} test rows,"
        f" {meta['num_classes']} classes ({meta['num_label_slots']} label slots)",
        f"tokens per row: {lengths}; truncated at {meta['max_length']}: "
        f"{100 * meta['truncated_share']:.1f}%",
    ]
    if meta["rare_classes"]["classes"]:
        rare = meta["rare_classes"]
        lines.append(f"rare classes (< {rare['min_rows']} train rows): "
                     f"{', '.join(rare['classes'][:20])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the whole step


def prepare_data(data_cfg, tokenizer) -> PreparedData:
    """Split, label, serialize and tokenize, or load all of it from the cache.

    Rank 0 prepares first and fills the cache; the other ranks then load it. A bad input raises on
    rank 0 inside the block and, after the barrier, on every other rank too. On several nodes
    with a cache dir of each node's own, a node's first rank misses, prepares and fills its
    node's cache (the write is atomic, so a shared dir filled twice stays whole).
    """
    loaded = None  # a saved DatasetDict, loaded once here and used from here on
    if data_cfg.source == "hf_disk":
        loaded = load_dataset_dict(data_cfg.train_path)
        if "input_ids" in loaded["train"].column_names:  # tokenized already: used in place
            return prepare_pretokenized(loaded, data_cfg, tokenizer)
    key = prepared_key(data_cfg, tokenizer)
    path = os.path.join(data_cfg.cache_dir, "prepared", key)
    with distributed.rank_zero_first():
        cached = load_prepared(path)
        if cached is not None:
            log.info("data cache hit: %s (key %s): splits, label map and tokenization loaded",
                     path, key)
            return cached
        log.info("data cache miss (key %s): splitting and tokenizing", key)
        prepared = build_prepared(data_cfg, tokenizer, loaded)
        if distributed.is_local_rank_zero():
            save_prepared(prepared, path)
        return prepared


def build_prepared(data_cfg, tokenizer,
                   loaded: datasets.DatasetDict | None = None) -> PreparedData:
    """`loaded`: the DatasetDict of `data=hf_disk`, when the caller has it loaded already."""
    splits, text_columns, split_report = load_splits(data_cfg, loaded)
    check_class_count(splits["train"].unique(data_cfg.label_column), data_cfg.label_column)
    label_map = build_label_map(splits["train"][data_cfg.label_column], data_cfg.max_classes,
                                data_cfg.dummy_prefix)
    splits = check_unknown_labels(splits, label_map, data_cfg.label_column,
                                  data_cfg.unknown_label)
    settings = serialization_settings(data_cfg, text_columns)
    tokenized = tokenize_splits(splits, tokenizer, label_map, data_cfg, settings)
    lengths, example = sample_token_lengths(splits["train"], tokenizer, settings)
    meta = diagnostics(splits, lengths, example, data_cfg, settings, label_map)
    meta["split"] = split_report
    meta["serialization"] = settings
    return PreparedData(raw=splits, tokenized=tokenized, label_map=label_map,
                        serialization=settings, metadata=meta)
