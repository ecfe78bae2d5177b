"""The Trainer lorasweep builds: the run ends with its best epoch, the head learns at its own rate,
resume finds the newest complete checkpoint, and evaluation runs sorted by length with per-row
outputs in dataset order."""

import json

import numpy as np
import pandas as pd
import pytest
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from helpers import SAMPLE, SMOKE, assert_reload_reproduces_predictions, run_train, tiny_trainer
from lorasweep.data.batching import length_order, token_batches
from lorasweep.training.trainer import (
    OrderedEvalTrainer,
    checkpoint_step,
    evaluate_split,
    find_resume_checkpoint,
    sorted_by_length,
)


def metrics_of(run):
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_the_run_ends_with_its_best_epoch_not_its_last(tmp_path, run_dir, cache_dir):
    """A learning rate that ramps up to 5.0 over the whole run (warmup to the last step): the
    model diverges, so epoch 1 has the lowest eval loss and the last epoch a higher one. The run
    must end with epoch 1's weights: its final eval loss is epoch 1's, not epoch 3's, and the
    saved adapter reproduces those predictions."""
    csv = tmp_path / "small.csv"
    pd.read_parquet(SAMPLE).sample(600, random_state=0).to_csv(csv, index=False)
    run_train([*SMOKE, "data=files", f"data.train_path={csv}", "data.label_column=acct_code",
               "training.max_steps=-1", "training.num_train_epochs=3",
               "training.eval_strategy=epoch", "training.save_strategy=epoch",
               "training.load_best_model_at_end=true", "training.learning_rate=5.0",
               "training.warmup_steps=0.99", "training.per_device_train_batch_size=16",
               "training.save_total_limit=3",  # keep every epoch's trainer_state.json
               "model.head_init=random", "lora=default", "loss=ce",
               "objective.metric=eval_loss", "baseline=none",
               f"hydra.run.dir={run_dir}", f"data.cache_dir={cache_dir}"],
              check=True)
    metrics = metrics_of(run_dir)
    last = max((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    losses = {e["epoch"]: e["eval_loss"] for e in history if "eval_loss" in e}
    assert sorted(losses) == [1.0, 2.0, 3.0]
    best = min(losses, key=losses.get)
    assert best == 1.0 and losses[3.0] > losses[1.0], losses  # the scenario
    assert metrics["best_epoch"] == best
    assert metrics["eval_loss"] == pytest.approx(losses[best], rel=1e-5)
    assert_reload_reproduces_predictions(run_dir)


@pytest.mark.parametrize("sampling", ["group_by_length", "random"])
def test_per_row_probabilities_pair_with_their_rows(tmp_path, sampling):
    """Evaluation runs sorted by length in batches cut by padded tokens (and the Trainer's own
    eval sampler would length-group it under group_by_length); the probabilities come back in
    dataset order: row i's equal the model's output for row i alone. The loss is the mean over
    rows, though the batches differ in size."""
    import torch

    trainer = tiny_trainer(tmp_path, [f"training.train_sampling_strategy={sampling}",
                                      "training.mixed_precision=no",
                                      "training.per_device_eval_batch_size=5"], rows=23)
    split = trainer.train_dataset
    lengths = [len(ids) for ids in split["input_ids"]]
    order = length_order(lengths)
    assert list(order) != list(range(len(split)))  # the rows are not already sorted
    assert [lengths[i] for i in order] == sorted(lengths)
    sizes = [len(batch["input_ids"]) for batch in trainer.get_test_dataloader(
        sorted_by_length(split))]
    assert sum(sizes) == len(split) and len(set(sizes)) > 1, sizes  # cut by tokens, not rows
    metrics, probabilities = evaluate_split(trainer, split, "test")
    model = trainer.model.eval()
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([row["input_ids"]])).logits[0] for row in split]
    np.testing.assert_allclose(probabilities, torch.softmax(torch.stack(alone), -1).numpy(),
                               atol=1e-5)
    assert metrics["test_accuracy"] == pytest.approx(
        (probabilities.argmax(-1) == np.asarray(split["labels"])).mean())
    row_losses = torch.nn.functional.cross_entropy(  # the model's own loss: no loss_fn here
        torch.stack(alone), torch.tensor(split["labels"]), reduction="none")
    assert metrics["test_loss"] == pytest.approx(float(row_losses.mean()), rel=1e-4)
    assert len(trainer.eval_dataset) == len(split)  # the per-epoch evaluation: sorted rows
    assert trainer.eval_dataset["input_ids"] == [split[int(i)]["input_ids"] for i in order]


def test_token_batches_fill_a_budget_of_padded_tokens():
    """Batches follow the given order without a gap; each pads (rows x its longest row) to at
    most rows-per-batch x the mean length, or holds one row; sorted short rows go many to a
    batch, long ones few."""
    lengths = sorted([3] * 40 + [10] * 20 + [60] * 4 + [200])
    batches = token_batches(lengths, rows=8)
    assert [i for batch in batches for i in batch] == list(range(len(lengths)))
    budget = 8 * np.mean(lengths)
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= budget
    assert len(batches[0]) > 8 and len(batches[-1]) == 1  # short rows many, the long one alone
    assert token_batches([], rows=8) == []
    with pytest.raises(ValueError, match="at least 1"):
        token_batches([5], rows=0)


def test_the_head_and_pooler_learn_at_their_own_rate(tmp_path):
    """training.head_learning_rate: the modules trained in full (PEFT's modules_to_save copies)
    get their own optimizer groups at that rate; the adapters keep learning_rate."""
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3)
    model = get_peft_model(BertForSequenceClassification(config),
                           LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"],
                                      modules_to_save=["classifier", "pooler"]))
    trainer = OrderedEvalTrainer(model=model, args=TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-3, report_to="none", use_cpu=True))
    trainer.head_learning_rate, trainer.head_modules = 5e-3, ("classifier", "pooler")
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], set()).update(names[id(p)] for p in group["params"])
    assert set(by_lr) == {1e-3, 5e-3}
    assert by_lr[5e-3] and all("modules_to_save" in n for n in by_lr[5e-3])
    assert any("classifier" in n for n in by_lr[5e-3]) and any("pooler" in n for n in by_lr[5e-3])
    assert by_lr[1e-3] and all("lora_" in n for n in by_lr[1e-3])


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    """A checkpoint dir without a readable trainer_state.json died while it was written: skipped.
    Other names in checkpoints/ are not checkpoints at all."""
    checkpoints = tmp_path / "checkpoints"
    for step, state in ((10, '{"global_step": 10}'), (20, '{"global_step": 20}'), (30, "{")):
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        (checkpoints / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (checkpoints / "checkpoint-40").mkdir()  # no trainer_state.json yet
    (checkpoints / "checkpoint-latest").mkdir()
    (checkpoints / ".checkpoint-50.tmp-1").mkdir()
    assert find_resume_checkpoint("auto", str(tmp_path)) == str(checkpoints / "checkpoint-20")
    assert find_resume_checkpoint("never", str(tmp_path)) is None
    assert find_resume_checkpoint("auto", str(tmp_path / "elsewhere")) is None
    assert checkpoint_step("/runs/x/checkpoints/checkpoint-120/") == 120
    assert checkpoint_step("checkpoint-latest") is None and checkpoint_step("run-7") is None
