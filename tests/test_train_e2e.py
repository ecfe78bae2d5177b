"""End-to-end runs of the real CLI on tiny models: files written, objective returned, and the
saved adapter + tokenizer + label map reproduce the in-process predictions."""

import json

import pandas as pd
import pytest

from helpers import (
    SAMPLE,
    SMOKE,
    assert_reload_reproduces_predictions,
    compose_cfg,
    run_train,
    save_tokenized_dataset_dict,
)
from lorasweep import outputs
from lorasweep.model.precision import resolve

METRIC_KEYS = ["eval_accuracy", "eval_f1_macro", "eval_f1_weighted", "eval_precision_macro",
               "eval_recall_macro", "test_accuracy", "test_f1_macro", "train_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_bert", "tiny_qwen2"])
def test_smoke_run_writes_outputs_and_the_adapter_reloads(model, run_dir, cache_dir):
    run_train([f"model={model}", "training=smoke", "baseline=none", "tracking=none",
               f"hydra.run.dir={run_dir}",
               f"data.cache_dir={cache_dir}"], check=True)
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                 "tokenizer/tokenizer.json", "label_map.json", "metrics.json",
                 "model_metadata.json", "dataset_metadata.json", "config.yaml",
                 ".hydra/config.yaml", "reports/per_class_test.csv"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 1.0 or key == "train_loss", key
    # baseline=none: no TF-IDF model, so no baseline scores and no blend
    assert not [k for k in metrics if "baseline" in k or "blend" in k], metrics
    assert not (run_dir / outputs.BLEND_DIR).exists()
    label_map = json.loads((run_dir / "label_map.json").read_text())
    assert label_map["num_labels"] == 26 and label_map["id2label"]["0"] == "14100"
    meta = json.loads((run_dir / "model_metadata.json").read_text())
    assert meta["global_step"] == 6 and meta["model_class"] == "PeftModelForSequenceClassification"
    # training.mixed_precision=auto (the default): what it resolved to here, and why, recorded
    expected = resolve("auto", "cpu")
    assert (meta["mixed_precision"], meta["precision"]) == ("auto", expected.name)
    assert meta["precision_reason"] == expected.reason
    assert meta["trainer_mixed_precision"] == ("bf16" if expected.name == "bf16" else "no")
    assert_reload_reproduces_predictions(run_dir)


@pytest.mark.slow
def test_main_returns_the_objective_in_metrics_json(run_dir, cache_dir):
    from lorasweep.train import main

    cfg = compose_cfg(["model=tiny_bert", "training=smoke", "baseline=none", "tracking=none",
                       "objective.metric=eval_accuracy", f"data.cache_dir={cache_dir}"],
                      output_dir=str(run_dir))
    value = main(cfg)
    metrics = outputs.read_json(str(run_dir), outputs.METRICS)
    assert isinstance(value, float) and value == metrics["eval_accuracy"]


@pytest.mark.slow
def test_a_users_csv_trains_end_to_end(tmp_path, run_dir, cache_dir):
    """`data=files data.train_path=x.csv data.label_column=y`: integer codes in a CSV."""
    table = pd.read_parquet(SAMPLE).rename(columns={"acct_code": "account"})
    table["account"] = table["account"].astype(int)
    csv = tmp_path / "ledger.csv"
    table.to_csv(csv, index=False)
    run_train([*SMOKE, "data=files", f"data.train_path={csv}", "data.label_column=account",
               f"hydra.run.dir={run_dir}", f"data.cache_dir={cache_dir}"], check=True)
    label_map = json.loads((run_dir / "label_map.json").read_text())
    assert label_map["num_labels"] == 26 and label_map["id2label"]["0"] == "14100"
    meta = json.loads((run_dir / "dataset_metadata.json").read_text())
    assert meta["rows"] == {"train": 3200, "validation": 400, "test": 400}
    assert meta["text_columns"] == [c for c in table.columns if c != "account"]
    predictions = pd.read_csv(run_dir / "reports" / "predictions_test.csv")
    assert len(predictions) == 400 and predictions["text"][0].startswith("date: ")
    assert 0.0 <= json.loads((run_dir / "metrics.json").read_text())["test_f1_macro"] <= 1.0


@pytest.mark.slow
def test_a_tokenized_dataset_dict_trains_end_to_end(tmp_path, run_dir, cache_dir):
    """A tokenized export: `data=hf_disk` on a tokenized DatasetDict with a ClassLabel column."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(compose_cfg(SMOKE).model.tokenizer_name_or_path)
    _, names = save_tokenized_dataset_dict(tmp_path / "dd", tokenizer, rows=600)
    run_train([*SMOKE, "data=hf_disk", f"data.train_path={tmp_path / 'dd'}",
               "data.label_column=label", f"hydra.run.dir={run_dir}",
               f"data.cache_dir={cache_dir}"], check=True)
    label_map = json.loads((run_dir / "label_map.json").read_text())
    assert [label_map["id2label"][str(i)] for i in range(len(names))] == names
    meta = json.loads((run_dir / "dataset_metadata.json").read_text())
    assert meta["rows"] == {"train": 400, "validation": 100, "test": 100}
    predictions = pd.read_csv(run_dir / "reports" / "predictions_validation.csv", dtype=str)
    assert len(predictions) == 100 and set(predictions["label"]) <= set(names)
    assert_reload_reproduces_predictions(run_dir)
