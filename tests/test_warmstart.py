"""Head warm start (linear probe -> head) and the TF-IDF baseline and blend beside it: unit
tests on the probe's arithmetic, and real CLI runs (1 process, and 2 ranks under ZeRO-3)."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from helpers import (
    SMOKE,
    assert_reload_reproduces_predictions,
    assert_saved_blend_reproduces_the_run,
    deepspeed_launcher,
    run_train,
)
from lorasweep.model.warmstart import fit_probe, head_digest, head_inputs, head_layer
from lorasweep.outputs import BLEND_DIR

SPLIT_METRICS = ("accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro")
NO_TRAINING = ["training.max_steps=-1", "training.num_train_epochs=0"]


def blobs(n_classes=4, rows=200, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (n_classes, dim))
    labels = rng.integers(0, n_classes, rows)
    return centres[labels] + rng.normal(0, 1, (rows, dim)) + 5.0, labels  # offset: not centred


@pytest.mark.parametrize("with_bias", [True, False])
def test_the_folded_head_predicts_what_the_probe_predicts(with_bias):
    from sklearn.linear_model import LogisticRegression

    features, labels = blobs()
    weight, bias = fit_probe(features, labels, 6, with_bias, None)  # slots 4, 5: no train rows
    assert weight.shape == (6, 8) and (bias is None) == (not with_bias)
    logits = features @ weight.T + (0 if bias is None else bias)
    assert set(logits.argmax(-1)) <= {0, 1, 2, 3}, "a class without train rows was predicted"
    scale = features.std(axis=0).mean() + 1e-6
    shift = features.mean(axis=0) if with_bias else 0
    reference = LogisticRegression(max_iter=300, fit_intercept=with_bias).fit(
        (features - shift) / scale, labels)
    assert (logits.argmax(-1) == reference.predict((features - shift) / scale)).all()
    assert (logits.argmax(-1) == labels).mean() > 0.9


def test_two_classes_give_two_head_rows():
    features, labels = blobs(n_classes=2)
    weight, bias = fit_probe(features, labels, 2, True, None)
    assert weight.shape == (2, 8)
    assert ((features @ weight.T + bias).argmax(-1) == labels).mean() > 0.9


def test_head_inputs_of_a_decoder_are_its_last_non_pad_token():
    """Qwen2-shaped `score` head: the probe sees the hidden state of the last real token, the
    position `*ForSequenceClassification` reads its logits from."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=3,
                         pad_token_id=0)
    model = Qwen2ForSequenceClassification(config).eval()
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]},
            {"input_ids": [8, 9, 10, 11, 12], "attention_mask": [1] * 5}]

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        return {k: torch.tensor([r[k] + [0] * (width - len(r[k])) for r in batch])
                for k in ("input_ids", "attention_mask")}

    import datasets

    dataset = datasets.Dataset.from_list(rows)
    head = head_layer(model, 3)
    assert head is model.score
    features = head_inputs(model, head, dataset, collate, batch_size=2, pad_token_id=0)
    with torch.no_grad():
        logits = model(**collate(rows)).logits.numpy()
    np.testing.assert_allclose(features @ head.weight.detach().numpy().T, logits, rtol=1e-4,
                               atol=1e-5)


def metrics_of(run):
    return json.loads((run / "metrics.json").read_text())


def logged_head_digests(output: str):
    return re.findall(r"head warm start: .* head ([0-9a-f]{12})", output)


def saved_head_digest(run):
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    weight = next(v for k, v in tensors.items() if k.endswith("classifier.weight"))
    bias = next(v for k, v in tensors.items() if k.endswith("classifier.bias"))
    return head_digest(weight, bias)


@pytest.mark.slow
def test_without_training_the_model_predicts_what_the_probe_predicts(run_dir, cache_dir):
    """In fp32: under bf16 autocast the head's own matmul rounds its logits to bf16, and the
    random tiny model's steep probe head flips rows whose top two logits are that close."""
    proc = run_train([*SMOKE, *NO_TRAINING, "baseline=tfidf", "training.mixed_precision=no",
                      f"hydra.run.dir={run_dir}", f"data.cache_dir={cache_dir}"], check=True)
    metrics = metrics_of(run_dir)
    for split in ("eval", "test"):
        for name in SPLIT_METRICS:
            assert metrics[f"{split}_{name}"] == pytest.approx(metrics[f"{split}_probe_{name}"])
    assert metrics["probe_seconds"] > 0
    digests = logged_head_digests(proc.stdout + proc.stderr)
    assert digests == [saved_head_digest(run_dir)]
    assert_reload_reproduces_predictions(run_dir)
    # the baseline sits beside the model in metrics.json and in the closing table
    assert 0.0 <= metrics["test_baseline_f1_macro"] <= 1.0 and metrics["baseline_seconds"] > 0
    assert "tfidf test" in proc.stdout and "probe test" in proc.stdout
    assert "WARNING: the model's eval_f1_macro" in proc.stdout  # random tiny BERT < TF-IDF
    # and the blend of the two (saved and applied by predict.py: the ZeRO-3 test below)
    assert 0.0 <= metrics["blend_weight"] <= 1.0
    assert metrics["eval_blend_f1_macro"] >= max(metrics["eval_f1_macro"],
                                                 metrics["eval_baseline_f1_macro"]) - 1e-12
    assert "blend test" in proc.stdout and "blend: model weight" in proc.stdout
    assert (run_dir / BLEND_DIR).is_dir()


@pytest.mark.slow
def test_every_zero3_rank_starts_from_the_same_probe_head(run_dir, cache_dir):
    """2 ranks, ZeRO-3 (the head is partitioned at load): each rank logs the head it set; they
    agree, the saved adapter holds it, and evaluation sharded over both ranks scores exactly
    what the probe scored. Rank 0 alone fits the TF-IDF baseline and blends; its saved blend
    reproduces what the run reported."""
    proc = run_train(["model=tiny_bert", "training=smoke", "tracking=none", "deepspeed=zero3",
                      *NO_TRAINING, "log_all_ranks=true", f"hydra.run.dir={run_dir}",
                      f"data.cache_dir={cache_dir}"],
                     launcher=deepspeed_launcher(2), check=True)
    output = proc.stdout + proc.stderr
    digests = logged_head_digests(output)
    assert len(digests) == 2 and len(set(digests)) == 1, digests
    assert saved_head_digest(run_dir) == digests[0]
    metrics = metrics_of(run_dir)
    assert metrics["eval_f1_macro"] == pytest.approx(metrics["eval_probe_f1_macro"])
    meta = json.loads((run_dir / "model_metadata.json").read_text())
    assert meta["zero_stage_engine"] == 3 and meta["world_size"] == 2
    assert 0.0 <= metrics["test_baseline_f1_macro"] <= 1.0
    assert output.count("blend: model weight") == 2  # rank 0's log line and its closing table
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(BLEND_DIR)] == [BLEND_DIR]
    assert_saved_blend_reproduces_the_run(run_dir)
