"""Reading the input tables and splitting them: files, globs and saved DatasetDicts in; and writing
a table of predictions out.

Owns every reader (parquet, CSV, JSONL, pickle, `save_to_disk` directories) and the writer, the
column checks,
label normalisation (labels become class-name strings, whitespace stripped) and the stratified
train/validation/test split. Tables are read through `datasets` (Arrow, memory-mapped), so a large
file is not held in memory. CSV and JSONL cells are read as the text the file holds: account codes,
cost centres and ZIP codes are identifiers, and type inference would turn the code `0100` into the
number 100.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np

from lorasweep.data.labels import label_to_text
from lorasweep.errors import DataError, one_line
from lorasweep.outputs import atomic_path

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
READERS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}
WRITERS = (".parquet", ".csv", ".jsonl")


# ---------------------------------------------------------------------------- reading


def expand_files(path: str, key: str) -> list[str]:
    files = sorted(glob.glob(path)) if any(ch in path for ch in "*?[") else [path]
    if not files or not all(os.path.isfile(f) for f in files):
        raise DataError(f"{key}={path}: file not found (cwd {os.getcwd()})")
    return files


def read_table(path: str, key: str, allow_pickle: bool = False) -> datasets.Dataset:
    """Read parquet / CSV / JSONL (one file or a glob) into an Arrow-backed Dataset."""
    files = expand_files(path, key)
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


def _read_csv_as_text(files: list[str]) -> datasets.Dataset:
    """Every column as strings, exactly as written; only an empty cell is missing (pandas would
    also read the text "NA" or "null" as missing)."""
    import csv

    with open(files[0], newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return datasets.load_dataset("csv", data_files=files, split="train", features=features,
                                 keep_default_na=False, na_values=[""])


def _read_jsonl_as_text(files: list[str], key: str) -> datasets.Dataset:
    """Every field as the text the line holds: `1` -> "1", `1.50` -> "1.50", `"b"` -> "b".

    A first pass checks each line and collects the field names (rows may differ in fields); the
    rows are then written to a memory-mapped Arrow cache, keyed by the files' size and mtime.
    """
    columns: dict[str, None] = {}
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


def _json_text(value: Any) -> str | None:
    """A JSON value parsed with numbers kept as their text, as one string (or None for null)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False)  # a list or an object, as JSON text


def _read_pickle(files: list[str], key: str, allow_pickle: bool) -> datasets.Dataset:
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
                  path: str) -> list[str]:
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


# ---------------------------------------------------------------------------- splitting


def split_table(table: datasets.Dataset, label_column: str, val_size: float, test_size: float,
                seed: int) -> tuple[datasets.DatasetDict, dict[str, Any]]:
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


def _stratify_or_none(labels: np.ndarray, fraction: float) -> np.ndarray | None:
    """Stratify when every class can give a row to both sides, else fall back to a plain shuffle."""
    _, counts = np.unique(labels, return_counts=True)
    n_small_side = int(math.ceil(len(labels) * min(fraction, 1 - fraction)))
    if counts.min() >= 2 and n_small_side >= len(counts):
        return labels
    return None


def load_splits(data_cfg, loaded: datasets.DatasetDict | None = None
                ) -> tuple[datasets.DatasetDict, list[str], dict[str, Any]]:
    """Read the configured files and return (splits, text columns, split report). `loaded`: the
    DatasetDict of `data=hf_disk`, when the caller has loaded it already."""
    if data_cfg.source == "hf_disk":
        return _load_hf_disk(data_cfg, loaded)
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


def _load_hf_disk(data_cfg, loaded: datasets.DatasetDict | None
                  ) -> tuple[datasets.DatasetDict, list[str], dict[str, Any]]:
    """A DatasetDict of table/text columns: serialized and tokenized like files are."""
    path = data_cfg.train_path
    loaded = load_dataset_dict(path) if loaded is None else loaded
    text_columns = check_columns(loaded["train"], data_cfg.label_column, data_cfg.text_columns,
                                 path)
    splits = datasets.DatasetDict({s: normalise_labels(loaded[s], data_cfg.label_column, path)
                                   for s in SPLITS})
    return splits, text_columns, {"split": "given (load_from_disk)"}


# ---------------------------------------------------------------------------- writing


def write_table(frame, path: str) -> None:
    """Write a DataFrame by the extension of `path` (one of WRITERS); a failed write leaves no
    partial file, and an earlier file at `path` stays as it was."""
    ext = os.path.splitext(path)[1].lower()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        if ext == ".parquet":
            frame.to_parquet(tmp, index=False)
        elif ext == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
