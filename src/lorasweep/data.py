"""Load a table, split it, build the label map, serialize rows to text and tokenize (cached).

Each step is a module-level function taking its own settings; `prepare_data` chains them.
Tables are read through `datasets` (Arrow, memory-mapped), so a large file is not held in memory.
CSV and JSONL cells are read as the text the file holds: account codes, cost centres and ZIP
codes are identifiers, and type inference would turn the code `0100` into the number 100.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import datasets
import numpy as np

from lorasweep import distributed
from lorasweep.console import no_progress_bars
from lorasweep.errors import DataError, one_line

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
READERS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}
MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")
PERCENTILES = (50, 75, 90, 95, 99)


@dataclass
class LabelMap:
    """Class names by id. Slots past the real classes are dummies kept for later label growth."""

    labels: List[str]
    num_real: int

    @property
    def label2id(self) -> Dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    @property
    def id2label(self) -> Dict[int, str]:
        return dict(enumerate(self.labels))

    def to_json(self) -> dict:
        return {"id2label": {str(i): n for i, n in enumerate(self.labels)},
                "label2id": self.label2id, "num_labels": len(self.labels),
                "num_real_labels": self.num_real}

    @classmethod
    def from_json(cls, payload: dict) -> "LabelMap":
        id2label = payload["id2label"]
        labels = [id2label[str(i)] for i in range(len(id2label))]
        return cls(labels=labels, num_real=payload.get("num_real_labels", len(labels)))


@dataclass
class PreparedData:
    raw: datasets.DatasetDict  # the split rows, label column as class names
    tokenized: datasets.DatasetDict  # input_ids, attention_mask, (token_type_ids), labels
    label_map: LabelMap
    text_columns: List[str]
    serialization: Dict[str, Any]
    metadata: Dict[str, Any] = field(default_factory=dict)

    def texts(self, split: str) -> List[str]:
        """The serialized text of every row of a split, as the model saw it (untruncated)."""
        return serialize_batch(self.raw[split].to_dict(), self.serialization)


# ---------------------------------------------------------------------------- reading


def _expand(path: str, key: str) -> List[str]:
    files = sorted(glob.glob(path)) if any(ch in path for ch in "*?[") else [path]
    if not files or not all(os.path.isfile(f) for f in files):
        raise DataError(f"{key}={path}: file not found (cwd {os.getcwd()})")
    return files


def read_table(path: str, key: str, allow_pickle: bool = False) -> datasets.Dataset:
    """Read parquet / CSV / JSONL (one file or a glob) into an Arrow-backed Dataset."""
    files = _expand(path, key)
    ext = os.path.splitext(files[0])[1].lower()
    if ext in (".pkl", ".pickle"):
        return _read_pickle(files, key, allow_pickle)
    if ext not in READERS:
        raise DataError(f"{key}={path}: unsupported extension '{ext}' "
                        f"(expected one of {', '.join(READERS)}, or .pkl with data.allow_pickle)")
    try:
        if ext == ".csv":
            table = _read_csv_as_text(files)
        elif ext == ".jsonl":
            table = _read_jsonl_as_text(files, key)
        else:
            table = datasets.load_dataset(READERS[ext], data_files=files, split="train")
    except DataError:
        raise
    except Exception as exc:  # datasets wraps parser errors in many types
        reason = one_line(exc)[:300]
        raise DataError(f"{key}={path}: cannot read as {READERS[ext]} ({reason})") from None
    if len(table) == 0:
        raise DataError(f"{key}={path}: the file has no rows")
    return table


def _read_csv_as_text(files: List[str]) -> datasets.Dataset:
    """Every column as strings, exactly as written; only an empty cell is missing (pandas would
    also read the text "NA" or "null" as missing)."""
    import csv

    with open(files[0], newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return datasets.load_dataset("csv", data_files=files, split="train", features=features,
                                 keep_default_na=False, na_values=[""])


def _read_jsonl_as_text(files: List[str], key: str) -> datasets.Dataset:
    """Every field as the text the line holds: `1` -> "1", `1.50` -> "1.50", `"b"` -> "b".

    A first pass checks each line and collects the field names (rows may differ in fields); the
    rows are then written to a memory-mapped Arrow cache, keyed by the files' size and mtime.
    """
    columns: Dict[str, None] = {}
    for path in files:
        for _, row in _jsonl_lines(path, key):
            columns.update(dict.fromkeys(row))
    # tuples: datasets reads a list in gen_kwargs as shards to split between processes
    stamps = tuple((path, os.path.getsize(path), os.stat(path).st_mtime_ns) for path in files)
    features = datasets.Features({name: datasets.Value("string") for name in columns})
    return datasets.Dataset.from_generator(
        _jsonl_rows, features=features,
        gen_kwargs={"files": tuple(files), "columns": tuple(columns), "key": key,
                    "stamps": stamps})


def _jsonl_lines(path: str, key: str):
    """(line number, object) for each non-blank line; a bad line raises naming its number."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line, parse_int=str, parse_float=str, parse_constant=str)
            except ValueError as exc:
                raise DataError(f"{key}={path}: line {number} is not valid JSON ({exc.msg}): "
                                f"{line.strip()[:60]!r}") from None
            if not isinstance(row, dict):
                raise DataError(f"{key}={path}: line {number} is not a JSON object: "
                                f"{line.strip()[:60]!r}")
            yield number, row


def _jsonl_rows(files: tuple, columns: tuple, key: str, stamps: tuple):
    del stamps  # only part of the cache key: an edited file is read again
    for path in files:
        for _, row in _jsonl_lines(path, key):
            yield {name: _json_text(row.get(name)) for name in columns}


def _json_text(value: Any) -> Optional[str]:
    """A JSON value parsed with numbers kept as their text, as one string (or None for null)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False)  # a list or an object, as JSON text


def _read_pickle(files: List[str], key: str, allow_pickle: bool) -> datasets.Dataset:
    if not allow_pickle:
        raise DataError(f"{key}={files[0]}: pickle files can run code when loaded; "
                        "set data.allow_pickle=true if you trust this file")
    import pandas as pd

    try:
        frames = [pd.read_pickle(f) for f in files]
    except Exception as exc:
        raise DataError(f"{key}={files[0]}: cannot read as pickle ({exc})") from None
    return datasets.Dataset.from_pandas(pd.concat(frames, ignore_index=True), preserve_index=False)


def check_columns(table: datasets.Dataset, label_column: str, text_columns: Sequence[str],
                  path: str) -> List[str]:
    """Return the text columns to serialize; raise naming any column the table lacks."""
    columns = table.column_names
    if label_column not in columns:
        raise DataError(f"data.label_column={label_column!r}: no such column in {path} "
                        f"(columns: {', '.join(columns)})")
    missing = [c for c in text_columns if c not in columns]
    if missing:
        raise DataError(f"data.text_columns: {', '.join(missing)} not in {path} "
                        f"(columns: {', '.join(columns)})")
    return list(text_columns) or [c for c in columns if c != label_column]


def normalise_labels(table: datasets.Dataset, label_column: str, path: str) -> datasets.Dataset:
    """Labels as strings (a CSV code 51100 and a parquet '51100' are one class); no empty ones.

    Arrow compute, not a Python loop over the rows. A `ClassLabel` column gives its names.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    values = table.with_format("arrow")[label_column]
    empty = pc.is_null(values, nan_is_null=True)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), False)
        empty = pc.or_(empty, blank)
    bad = np.flatnonzero(empty.to_numpy(zero_copy_only=False))
    if len(bad):
        rows = ", ".join(str(i) for i in bad[:5])
        raise DataError(f"{path}: column {label_column!r} has {len(bad)} empty/NaN labels "
                        f"(first rows: {rows})")
    feature = table.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = pa.array(feature.names, pa.string()).take(values)
        return _replace_column(table, label_column, names.to_pylist())
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return strip_label_whitespace(table, label_column, path)
    if pa.types.is_integer(values.type) or _integral_floats(values):
        return (table.cast_column(label_column, datasets.Value("int64"))
                .cast_column(label_column, datasets.Value("string")))
    # anything else (non-integral floats, booleans): Python's str, as predict.py writes labels
    return _replace_column(table, label_column, [label_to_text(v) for v in values.to_pylist()])


def strip_label_whitespace(table: datasets.Dataset, label_column: str,
                           path: str) -> datasets.Dataset:
    """`a`, ` a` and `a ` are one class: a label is an identifier, and surrounding whitespace in a
    cell is a typing or export accident, never a distinct code. The count of changed rows is
    logged, so a user sees that the file was not taken literally."""
    import pyarrow.compute as pc

    values = table.with_format("arrow")[label_column]
    stripped = pc.utf8_trim_whitespace(values)
    changed = pc.sum(pc.cast(pc.not_equal(stripped, values), "int64")).as_py() or 0
    if not changed:
        return table
    log.warning("%s: stripped surrounding whitespace from %d label(s) in column %r "
                "(' a', 'a ' and 'a' are one class)", path, changed, label_column)
    return _replace_column(table, label_column, stripped.to_pylist())


def _replace_column(table: datasets.Dataset, column: str, values: list) -> datasets.Dataset:
    # added before the old one goes: a table of just that column would otherwise have no rows
    return (table.add_column(f"{column}.new", values).remove_columns(column)
            .rename_column(f"{column}.new", column))


def _integral_floats(values) -> bool:
    import pyarrow as pa
    import pyarrow.compute as pc

    if not pa.types.is_floating(values.type):
        return False
    whole = pc.all(pc.equal(pc.floor(values), values)).as_py()
    small = pc.max(pc.abs(values)).as_py() < 2 ** 53
    return bool(whole and small)


def label_to_text(value: Any) -> str:
    """A label value as its class name (whitespace around it stripped, as in training)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


# ---------------------------------------------------------------------------- splitting


def split_table(table: datasets.Dataset, label_column: str, val_size: float, test_size: float,
                seed: int) -> tuple[datasets.DatasetDict, Dict[str, Any]]:
    """Stratified train/validation/test split, deterministic for a given table and seed.

    A class with fewer than 3 rows cannot appear in all three splits: its rows all go to train,
    and the report lists it.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(table[label_column])
    names, counts = np.unique(labels, return_counts=True)
    too_small = set(names[counts < 3].tolist())
    indices = np.arange(len(labels))
    small_mask = np.isin(labels, list(too_small))
    pool, held_back = indices[~small_mask], indices[small_mask]
    if len(pool) < 3:
        raise DataError(f"data: {len(pool)} rows in classes with >= 3 rows; too few to split")
    holdout = val_size + test_size
    train_idx, rest_idx = train_test_split(pool, test_size=holdout, random_state=seed,
                                           stratify=_stratify_or_none(labels[pool], holdout))
    val_idx, test_idx = train_test_split(rest_idx, test_size=test_size / holdout,
                                         random_state=seed,
                                         stratify=_stratify_or_none(labels[rest_idx], 0.5))
    train_idx = np.concatenate([train_idx, held_back])
    splits = datasets.DatasetDict({
        "train": table.select(train_idx), "validation": table.select(val_idx),
        "test": table.select(test_idx),
    })
    report = {"classes_too_small_to_stratify": sorted(too_small),
              "action": "all rows of these classes kept in train" if too_small else None}
    if too_small:
        log.warning("%d classes have < 3 rows and were kept in train only: %s",
                    len(too_small), ", ".join(sorted(too_small)[:20]))
    return splits, report


def _stratify_or_none(labels: np.ndarray, fraction: float) -> Optional[np.ndarray]:
    """Stratify when every class can give a row to both sides, else fall back to a plain shuffle."""
    _, counts = np.unique(labels, return_counts=True)
    n_small_side = int(math.ceil(len(labels) * min(fraction, 1 - fraction)))
    if counts.min() >= 2 and n_small_side >= len(counts):
        return labels
    return None


def load_splits(data_cfg) -> tuple[datasets.DatasetDict, List[str], Dict[str, Any]]:
    """Read the configured files and return (splits, text columns, split report)."""
    if data_cfg.source == "hf_disk":
        return _load_hf_disk(data_cfg)
    train = read_table(data_cfg.train_path, "data.train_path", data_cfg.allow_pickle)
    text_columns = check_columns(train, data_cfg.label_column, data_cfg.text_columns,
                                 data_cfg.train_path)
    train = normalise_labels(train, data_cfg.label_column, data_cfg.train_path)
    given = {"validation": data_cfg.valid_path, "test": data_cfg.test_path}
    if all(given.values()):
        splits, report = datasets.DatasetDict({"train": train}), {"split": "given"}
    else:
        splits, report = split_table(train, data_cfg.label_column, data_cfg.val_size,
                                     data_cfg.test_size, data_cfg.seed)
    for name, path in given.items():
        if path:
            key = "data.valid_path" if name == "validation" else "data.test_path"
            table = read_table(path, key, data_cfg.allow_pickle)
            check_columns(table, data_cfg.label_column, text_columns, path)
            splits[name] = normalise_labels(table, data_cfg.label_column, path)
    return splits, text_columns, report


def load_dataset_dict(path: str) -> datasets.DatasetDict:
    """A DatasetDict saved with `save_to_disk`, with train, validation and test splits."""
    if not os.path.isdir(path):
        raise DataError(f"data.train_path={path}: not a directory saved by "
                        "DatasetDict.save_to_disk")
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:
        raise DataError(f"data.train_path={path}: cannot load_from_disk "
                        f"({one_line(exc)})") from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"data.train_path={path}: a single Dataset; expected a DatasetDict with "
                        f"splits {', '.join(SPLITS)}")
    missing = [s for s in SPLITS if s not in loaded]
    if missing:
        raise DataError(f"data.train_path={path}: DatasetDict lacks split(s) {', '.join(missing)} "
                        f"(has {', '.join(loaded)})")
    for name in SPLITS:
        if len(loaded[name]) == 0:
            raise DataError(f"data.train_path={path}: the {name} split has no rows")
    return loaded


def _load_hf_disk(data_cfg) -> tuple[datasets.DatasetDict, List[str], Dict[str, Any]]:
    """A DatasetDict of table/text columns: serialized and tokenized like files are."""
    path = data_cfg.train_path
    loaded = load_dataset_dict(path)
    text_columns = check_columns(loaded["train"], data_cfg.label_column, data_cfg.text_columns,
                                 path)
    splits = datasets.DatasetDict({s: normalise_labels(loaded[s], data_cfg.label_column, path)
                                   for s in SPLITS})
    return splits, text_columns, {"split": "given (load_from_disk)"}


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
    return PreparedData(raw=raw, tokenized=tokenized, label_map=label_map, text_columns=["text"],
                        serialization=settings, metadata=meta)


def pretokenized_label_names(loaded: datasets.DatasetDict, column: str, path: str,
                             vocab_size: int) -> List[str]:
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


# ---------------------------------------------------------------------------- labels


def check_class_count(train_classes: Sequence[Any], label_column: str) -> None:
    """One class in train would give a 1-label model that scores 1.0 on everything."""
    if len(train_classes) < 2:
        found = f" ({train_classes[0]!r})" if train_classes else ""
        raise DataError(f"data.label_column={label_column!r}: {len(train_classes)} class in the "
                        f"train split{found}; a classifier needs at least 2")


def build_label_map(train_labels: Sequence[str], max_classes: Optional[int],
                    dummy_prefix: str) -> LabelMap:
    """Sorted class names, padded with dummy slots up to `max_classes`."""
    return pad_label_slots(sorted(set(train_labels)), max_classes, dummy_prefix)


def pad_label_slots(real: List[str], max_classes: Optional[int], dummy_prefix: str) -> LabelMap:
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


# ---------------------------------------------------------------------------- serialization


def format_value(value: Any) -> Optional[str]:
    """Stable text for a cell: integers without '.0', floats in shortest round-trip form."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (np.floating, np.integer)):
        return format_value(value.item())
    text = str(value).strip()
    return text if text else None


def serialize_row(row: Dict[str, Any], columns: Sequence[str], separator: str = ", ",
                  include_column_names: bool = True, null_token: Optional[str] = None) -> str:
    """One table row as text: "vendor: Staples, amount: 45.2". Missing values are skipped,
    or written as `null_token` when one is set. The same function runs at predict time."""
    parts = []
    for column in columns:
        text = format_value(row.get(column))
        if text is None:
            if null_token is None:
                continue
            text = null_token
        parts.append(f"{column}: {text}" if include_column_names else text)
    return separator.join(parts)


def serialization_settings(data_cfg, text_columns: Sequence[str]) -> Dict[str, Any]:
    return {"text_columns": list(text_columns), "separator": data_cfg.separator,
            "include_column_names": data_cfg.include_column_names,
            "null_token": data_cfg.null_token}


def serialize_batch(batch: Dict[str, list], settings: Dict[str, Any]) -> List[str]:
    n = len(next(iter(batch.values())))
    columns = settings["text_columns"]
    return [serialize_row({c: batch[c][i] for c in columns}, columns, settings["separator"],
                          settings["include_column_names"], settings["null_token"])
            for i in range(n)]


# ---------------------------------------------------------------------------- tokenization


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Calling the tokenizer stores truncation/padding settings in it: not part of its identity.
        state.pop("truncation", None)
        state.pop("padding", None)
        body = json.dumps(state, sort_keys=True)
    else:
        body = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = f"{tokenizer.padding_side}|{tokenizer.pad_token}|{len(tokenizer)}"
    return hashlib.sha256((body + extra).encode()).hexdigest()[:16]


def _tokenize_batch(batch, tokenizer, settings, label2id, label_column, max_length, padding):
    encoded = tokenizer(serialize_batch(batch, settings), truncation=True, max_length=max_length,
                        padding="max_length" if padding == "max_length" else False)
    encoded["labels"] = [label2id[v] for v in batch[label_column]]
    return encoded


def tokenize_splits(splits: datasets.DatasetDict, tokenizer, label_map: LabelMap, data_cfg,
                    settings: Dict[str, Any]) -> datasets.DatasetDict:
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


def sample_token_lengths(train: datasets.Dataset, tokenizer, settings: Dict[str, Any],
                         sample_size: int = 2000) -> tuple[np.ndarray, str]:
    """Untruncated token lengths of the first `sample_size` train rows, and the first row's text."""
    sample = train.select(range(min(sample_size, len(train))))
    texts = serialize_batch(sample.to_dict(), settings)
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]])
    return lengths, texts[0] if texts else ""


def diagnostics(raw: datasets.DatasetDict, lengths: np.ndarray, example_text: str, data_cfg,
                settings: Dict[str, Any], label_map: LabelMap) -> Dict[str, Any]:
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


def _class_counts(labels: Sequence[str]) -> Dict[str, int]:
    names, counts = np.unique(np.asarray(labels), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return {str(names[i]): int(counts[i]) for i in order}


def format_diagnostics(meta: Dict[str, Any]) -> str:
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


# ---------------------------------------------------------------------------- the cache

# Data settings that change nothing in the prepared result; the paths are replaced by the hash of
# the files' bytes (a moved file is still a hit, an edited one is a miss).
NOT_IN_KEY = ("cache_dir", "num_proc", "train_path", "valid_path", "test_path")
CACHE_VERSION = 3  # 3: CSV and JSONL cells read as text


def input_files(data_cfg) -> Dict[str, List[str]]:
    """The files a run reads, by config key (a glob expanded; a saved DatasetDict's own files)."""
    if data_cfg.source == "hf_disk":
        return {"data.train_path": dataset_dict_files(data_cfg.train_path)}
    given = {"data.train_path": data_cfg.train_path, "data.valid_path": data_cfg.valid_path,
             "data.test_path": data_cfg.test_path}
    return {key: _expand(path, key) for key, path in given.items() if path}


def dataset_dict_files(root: str) -> List[str]:
    """The files `save_to_disk` wrote, read from its manifests. Not a directory listing: datasets
    writes `map` cache files beside them, which would change the key on every run."""
    manifest = os.path.join(root, "dataset_dict.json")
    if not os.path.isfile(manifest):
        load_dataset_dict(root)  # raises the error that says what is wrong with the directory
    files = [manifest]
    try:
        with open(manifest) as fh:
            splits = json.load(fh)["splits"]
        for split in splits:
            state = os.path.join(root, split, "state.json")
            with open(state) as fh:
                data_files = [f["filename"] for f in json.load(fh)["_data_files"]]
            files += [state, os.path.join(root, split, "dataset_info.json")]
            files += [os.path.join(root, split, name) for name in data_files]
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"data.train_path={root}: not a complete DatasetDict saved by "
                        f"save_to_disk ({one_line(exc)})") from None
    return files


def file_digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def prepared_key(data_cfg, tokenizer) -> str:
    """Key of a prepared result: input bytes + every data setting that matters + the tokenizer."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(data_cfg, resolve=True)
    payload = {
        "files": {key: [file_digest(f) for f in files]
                  for key, files in input_files(data_cfg).items()},
        "settings": {k: v for k, v in settings.items() if k not in NOT_IN_KEY},
        "tokenizer": tokenizer_fingerprint(tokenizer), "version": CACHE_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def save_prepared(prepared: PreparedData, path: str) -> None:
    """Write the whole prepared result to a temp dir and rename it into place, so a crash never
    leaves a half-written entry and a reader sees either nothing or everything."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with no_progress_bars():
        prepared.raw.save_to_disk(os.path.join(tmp, "raw"))
        prepared.tokenized.save_to_disk(os.path.join(tmp, "tokenized"))
    payload = {"label_map": prepared.label_map.to_json(), "text_columns": prepared.text_columns,
               "serialization": prepared.serialization, "metadata": prepared.metadata}
    with open(os.path.join(tmp, "prepared.json"), "w") as fh:
        json.dump(payload, fh, indent=2)
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def load_prepared(path: str) -> Optional[PreparedData]:
    """The cached result at `path`, or None when there is no complete entry."""
    manifest = os.path.join(path, "prepared.json")
    if not os.path.isfile(manifest):
        return None
    with open(manifest) as fh:
        payload = json.load(fh)
    return PreparedData(raw=datasets.load_from_disk(os.path.join(path, "raw")),
                        tokenized=datasets.load_from_disk(os.path.join(path, "tokenized")),
                        label_map=LabelMap.from_json(payload["label_map"]),
                        text_columns=payload["text_columns"],
                        serialization=payload["serialization"], metadata=payload["metadata"])


# ---------------------------------------------------------------------------- the whole step


def prepare_data(data_cfg, tokenizer) -> PreparedData:
    """Split, label, serialize and tokenize, or load all of it from the cache.

    Rank 0 prepares first and fills the cache; the other ranks then load it. A bad input raises on
    rank 0 inside the block and, after the barrier, on every other rank too.
    """
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
        prepared = build_prepared(data_cfg, tokenizer)
        if distributed.is_rank_zero():
            save_prepared(prepared, path)
        return prepared


def build_prepared(data_cfg, tokenizer) -> PreparedData:
    splits, text_columns, split_report = load_splits(data_cfg)
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
                        text_columns=text_columns, serialization=settings, metadata=meta)
