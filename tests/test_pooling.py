"""model.pooling: what the head reads. auto finds a sentence-transformers checkpoint's own pooling;
mean/cls stand in for the pooler; the probe fits on it; runs reload and predict with it, and export
refuses what plain transformers cannot express."""

import json

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
)

from helpers import SAMPLE, SMOKE, assert_reload_reproduces_predictions, compose_cfg, run_train
from lorasweep.data.labels import LabelMap
from lorasweep.errors import ConfigError
from lorasweep.model.modeling import build_model, load_tokenizer
from lorasweep.model.pooling import (
    TokenPooler,
    apply_pooling,
    checkpoint_pooling,
    model_pooling,
    resolve_pooling,
)
from lorasweep.model.warmstart import head_inputs, head_layer


def tiny_bert(num_labels=3, vocab_size=100):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=num_labels)).eval()


def test_auto_reads_the_sentence_transformers_checkpoints_own_pooling(tmp_path):
    """The shipped all-MiniLM-L6-v2 declares mean pooling (modules.json -> 1_Pooling); a plain
    checkpoint declares none and keeps the model's own head."""
    minilm = compose_cfg(["model=minilm"]).model
    assert checkpoint_pooling(minilm.name_or_path) == "mean"
    assert resolve_pooling("auto", minilm.name_or_path)[0] == "mean"
    tiny_bert().save_pretrained(tmp_path / "plain")
    assert checkpoint_pooling(str(tmp_path / "plain")) is None
    assert resolve_pooling("auto", str(tmp_path / "plain"))[0] == "pooler"
    assert resolve_pooling("cls", str(tmp_path / "plain"))[0] == "cls"
    (tmp_path / "cls" / "1_Pooling").mkdir(parents=True)
    (tmp_path / "cls" / "modules.json").write_text(json.dumps(
        [{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "cls" / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert checkpoint_pooling(str(tmp_path / "cls")) == "cls"


def test_minilm_loads_with_mean_pooling_by_default():
    cfg = compose_cfg(["model=minilm"])
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg.model, LabelMap(["a", "b"], 2), tokenizer, cfg.model.name_or_path)
    assert isinstance(model.bert.pooler, TokenPooler) and model_pooling(model) == "mean"


def test_mean_pooling_is_the_masked_mean_and_padding_does_not_change_it():
    model = apply_pooling(tiny_bert(), "mean")
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = model.bert(input_ids=ids, attention_mask=mask).pooler_output
        alone = model.bert(input_ids=ids[1:, :3]).pooler_output
    expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(pooled[1:], alone, atol=1e-5, rtol=1e-5)
    cls = apply_pooling(tiny_bert(), "cls")
    with torch.no_grad():
        out = cls.bert(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])


def test_the_probe_fits_on_the_mean_pooled_tokens():
    """What head_inputs captures (the head's input) is the mean of the real tokens."""
    tokenizer = AutoTokenizer.from_pretrained(compose_cfg(SMOKE).model.tokenizer_name_or_path)
    model = apply_pooling(tiny_bert(vocab_size=tokenizer.vocab_size), "mean")
    encoded = tokenizer(["a b c d e f", "a", "some words here"])
    dataset = datasets.Dataset.from_dict(dict(encoded))
    features = head_inputs(model, head_layer(model, 3), dataset, DataCollatorWithPadding(tokenizer),
                           batch_size=2, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        for row, feature in zip(encoded["input_ids"], features, strict=True):
            hidden = model.bert(input_ids=torch.tensor([row])).last_hidden_state[0]
            np.testing.assert_allclose(feature, hidden.mean(0).numpy(), atol=1e-5)


def test_token_pooling_on_a_model_without_a_pooler_is_one_line():
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    model = Qwen2ForSequenceClassification(Qwen2Config(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_labels=3, pad_token_id=0))
    with pytest.raises(ConfigError, match=r"model.pooling=mean: Qwen2ForSequenceClassification"):
        apply_pooling(model, "mean")
    assert apply_pooling(model, "pooler") is model and model_pooling(model) == "pooler"


@pytest.mark.slow
def test_a_mean_pooled_run_reloads_predicts_and_refuses_export(run_dir, cache_dir, tmp_path):
    """model.pooling=mean on tiny_bert: recorded, the adapter reloads with it and reproduces the
    run's predictions, predict uses it, and export refuses in one line (exit 2) writing nothing."""
    import subprocess
    import sys

    from helpers import ROOT, cli_env
    from lorasweep.predict import PredictConfig, predict_file

    run_train([*SMOKE, "model.pooling=mean", f"hydra.run.dir={run_dir}",
               f"data.cache_dir={cache_dir}"], check=True)
    meta = json.loads((run_dir / "model_metadata.json").read_text())
    assert meta["pooling"] == "mean"
    assert_reload_reproduces_predictions(run_dir)
    rows = tmp_path / "rows.parquet"
    pd.read_parquet(SAMPLE).head(20).to_parquet(rows, index=False)
    out = tmp_path / "predicted.csv"
    summary = predict_file(OmegaConf.merge(OmegaConf.structured(PredictConfig), {
        "run_dir": str(run_dir), "input": str(rows), "output": str(out), "progress": False}))
    assert summary["rows"] > 0 and out.is_file()

    export = subprocess.run([sys.executable, "-m", "lorasweep.export", f"run_dir={run_dir}",
                             f"output={tmp_path / 'exported'}"], cwd=ROOT, env=cli_env(),
                            capture_output=True, text=True, timeout=300)
    lines = [x for x in export.stderr.splitlines() if x.startswith("lorasweep: error:")]
    assert export.returncode == 2 and len(lines) == 1, export.stderr[-2000:]
    assert "model.pooling=pooler" in lines[0] and not (tmp_path / "exported").exists()
