"""TrainingArguments, the Trainer, resume, evaluation and saving."""

from __future__ import annotations

import copy
import copyreg
import json
import logging
import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, SequentialSampler
from transformers import DataCollatorWithPadding, EarlyStoppingCallback, Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lorasweep import distributed, outputs
from lorasweep.config import METRIC_NAMES
from lorasweep.data.batching import length_order, token_batches
from lorasweep.errors import ConfigError, one_line
from lorasweep.evaluation.metrics import compute_metrics
from lorasweep.model.precision import Precision, resolve
from lorasweep.redaction import is_secret_key
from lorasweep.training.callbacks import SignalCallback, SpeedMemoryCallback, use_readable_logs
from lorasweep.training.deepspeed_config import clear_stale_build_locks

log = logging.getLogger(__name__)

# Keys of training.* that are ours, not TrainingArguments'.
OWN_KEYS = ("mixed_precision", "early_stopping_patience", "head_learning_rate", "extra")
# What the Trainer's own evaluations report (compute_metrics + loss): what it can select on.
EVAL_METRICS = tuple(f"eval_{name}" for name in (*METRIC_NAMES, "loss"))


def best_model_metric(objective_metric: str) -> str:
    """The objective when the Trainer's evaluations report it, else eval_f1_macro (a test_ or
    baseline metric cannot choose an epoch)."""
    return objective_metric if objective_metric in EVAL_METRICS else "eval_f1_macro"


def build_training_arguments(train_cfg, run_dir: str, seed: int,
                             ds_config: dict[str, Any] | None,
                             objective_metric: str = "eval_f1_macro",
                             secret_keys: Sequence[str] = (),
                             precision: Precision | None = None) -> TrainingArguments:
    """Build before `from_pretrained` (see `lorasweep.training.pipeline.set_up`).
    `secret_keys`: further names of secret arguments (tracking.secret_keys), never pickled.
    `precision`: what training.mixed_precision resolved to (None: resolve it here)."""
    if precision is None:
        precision = resolve(train_cfg.mixed_precision, deepspeed=ds_config is not None)
    kwargs = {k: v for k, v in dict(train_cfg).items() if k not in OWN_KEYS}
    if train_cfg.load_best_model_at_end:  # greater_is_better follows: False only for *loss
        kwargs["metric_for_best_model"] = best_model_metric(objective_metric)
    kwargs.update(
        output_dir=os.path.join(run_dir, outputs.CHECKPOINT_DIR),
        # Autocast (accelerate's native AMP): weights and optimizer state stay fp32. Under
        # DeepSpeed its bf16/fp16 sections ("auto") follow these two.
        bf16=precision.name == "bf16",
        fp16=precision.name == "fp16",
        seed=seed,
        report_to="none",  # lorasweep.tracking logs from rank 0; the Trainer's MLflowCallback
        # would open a run per rank
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
        save_only_model=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    if train_cfg.eval_steps is None:
        kwargs.pop("eval_steps")
    if ds_config is not None:
        kwargs["deepspeed"] = ds_config
        clear_stale_build_locks()  # DeepSpeed may JIT-build an op when it starts
    kwargs.update(distributed.prepare_backend(use_deepspeed=ds_config is not None))
    if precision.name == "bf16" and not torch.cuda.is_available() and ds_config is None:
        kwargs["use_cpu"] = True  # TrainingArguments takes bf16 without a GPU only so
    kwargs.update(dict(train_cfg.extra))
    try:
        args = PicklableWithoutSecrets(**kwargs)
    except (TypeError, ValueError) as exc:  # e.g. an unknown key in training.extra
        raise ConfigError(f"training: TrainingArguments rejected the settings: "
                          f"{one_line(exc)[:300]}") from None
    setattr(args, SECRET_KEYS_ATTR, tuple(secret_keys))
    return args


SECRET_KEYS_ATTR = "_lorasweep_secret_keys"


class PicklableWithoutSecrets(TrainingArguments):
    """TrainingArguments that never carry a secret (`hub_token`, ...) into a pickle.

    The Trainer saves its arguments with `torch.save(args, "training_args.bin")` next to the
    adapter and in every checkpoint, and the adapter dir is uploaded to MLflow. Pickled, these
    arguments turn into a plain `TrainingArguments` (loading one needs no lorasweep) with every
    secret field set to None, so no file ever holds the value, not even for a moment. Nothing
    reads the file back: resume uses the checkpoint's weights, optimizer and trainer_state.json.
    """

    def __reduce_ex__(self, protocol):
        extra = self.__dict__.get(SECRET_KEYS_ATTR, ())
        state = {k: None if is_secret_key(k, extra) else v
                 for k, v in self.__dict__.items() if k != SECRET_KEYS_ATTR}
        # copyreg's own recipe for `object.__new__(cls)`: the pickle names the plain class
        return copyreg._reconstructor, (TrainingArguments, object, None), state

    # copy/deepcopy would otherwise go through __reduce_ex__ and lose the secrets.
    def __copy__(self):
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo):
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


class OrderedEvalTrainer(Trainer):
    """A Trainer whose evaluation and `predict` keep the dataset's row order and cut their batches
    by padded tokens, whose head may learn at its own rate, and that leaves its checkpoints in
    place when training ends.

    With `train_sampling_strategy=group_by_length`, transformers 5 also length-groups (shuffles)
    evaluation batches, so `predict()` output no longer lines up with the rows. Metrics would not
    care, but per-row predictions would be silently wrong. On one process the batches follow the
    dataset's order, cut by `token_batches` (eval batch size x the mean length in padded tokens;
    the run passes its splits sorted by length). On N ranks the Trainer's own ordered, sharded
    sampler cuts batches of eval batch size rows: its sharding and the gathering of predictions
    assume one batch size.
    """

    head_learning_rate: float | None = None  # None: the head learns at learning_rate
    head_modules: tuple = ()  # module names trained in full beside the adapters
    eval_batches_by_tokens: bool = True  # False: the Trainer's batches of eval batch size rows

    def _get_eval_sampler(self, eval_dataset):
        if eval_dataset is None or self.args.world_size > 1:
            return None
        return SequentialSampler(eval_dataset)

    def _by_tokens(self, dataset) -> bool:
        return (self.eval_batches_by_tokens and self.args.world_size == 1
                and "input_ids" in getattr(dataset, "column_names", ()))

    def _token_dataloader(self, dataset, description: str) -> DataLoader:
        dataset = self._remove_unused_columns(dataset, description=description)
        batches = token_batches([len(ids) for ids in dataset["input_ids"]],
                                self.args.eval_batch_size)
        return self.accelerator.prepare(DataLoader(
            dataset, batch_sampler=[list(b) for b in batches], collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory))

    def get_eval_dataloader(self, eval_dataset=None):
        dataset = (self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str)
                   else self.eval_dataset if eval_dataset is None else eval_dataset)
        if self._by_tokens(dataset):
            return self._token_dataloader(dataset, "Evaluation")
        return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        if self._by_tokens(test_dataset):
            return self._token_dataloader(test_dataset, "test")
        return super().get_test_dataloader(test_dataset)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The batch's mean loss once per row, so that the evaluation loss is the mean over rows
        when batches differ in size: the Trainer repeats each batch's loss eval-batch-size times,
        as if every batch were full."""
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only,
                                                       ignore_keys=ignore_keys)
        if loss is not None and self.args.world_size == 1:
            loss = loss.reshape(1).repeat(len(inputs["input_ids"]))
        return loss, logits, labels

    def _finalize_training(self, *args, **kwargs):
        """With save_total_limit=1 the Trainer deletes every checkpoint but the best one as
        training ends, before the run has written its outputs: a run that then fails (a full
        disk) would have to train again. The run prunes them itself once its outputs are on disk
        (`prune_checkpoints`)."""
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            return super()._finalize_training(*args, **kwargs)
        finally:
            self.args.save_total_limit = limit

    def create_optimizer(self, model=None):
        """The Trainer's optimizer with the fully trained modules (head, pooler) in groups of
        their own at `head_learning_rate`; the LR schedule scales every group alike."""
        if self.head_learning_rate is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple, list] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                head = any(f".{m}." in f".{name}" for m in self.head_modules)
                groups.setdefault((name in decay, head), []).append(param)
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(
            [{"params": params, "weight_decay": self.args.weight_decay if decayed else 0.0,
              **({"lr": self.head_learning_rate} if head else {})}
             for (decayed, head), params in groups.items()], **kwargs)
        return self.optimizer


def sorted_by_length(dataset):
    """The dataset's rows by token length: evaluation batches of similar lengths pad little."""
    return dataset.select(length_order([len(ids) for ids in dataset["input_ids"]]))


def build_trainer(model, args: TrainingArguments, tokenized, tokenizer, loss_fn,
                  callbacks: list, early_stopping_patience: int | None = None,
                  head_learning_rate: float | None = None,
                  head_modules: Sequence[str] = ()) -> Trainer:
    collator = DataCollatorWithPadding(tokenizer)
    if early_stopping_patience is not None:
        callbacks = [*callbacks, EarlyStoppingCallback(early_stopping_patience)]
    trainer = OrderedEvalTrainer(
        model=model, args=args, train_dataset=tokenized["train"],
        # Sorted by length (metrics do not depend on the order; `evaluate_split` puts per-row
        # outputs back in dataset order).
        eval_dataset=sorted_by_length(tokenized["validation"]),
        data_collator=collator,
        processing_class=tokenizer, compute_metrics=compute_metrics,
        compute_loss_func=loss_fn,
        callbacks=[SignalCallback(), SpeedMemoryCallback(), *callbacks],
    )
    trainer.head_learning_rate, trainer.head_modules = head_learning_rate, tuple(head_modules)
    use_readable_logs(trainer)
    return trainer


def is_complete_checkpoint(path: str) -> bool:
    """The Trainer writes trainer_state.json last (after weights, optimizer, DeepSpeed shards and
    RNG states): a dir without a readable one died while being written."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as fh:
            return "global_step" in json.load(fh)
    except (OSError, ValueError):
        return False


def checkpoint_step(path: str) -> int | None:
    """The global step in a checkpoint dir's name (`checkpoint-<step>`); None for another name."""
    prefix, _, step = os.path.basename(os.path.normpath(path)).rpartition("-")
    return int(step) if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() else None


def prune_checkpoints(trainer: Trainer, run_dir: str) -> list[str]:
    """What transformers does as training ends with save_total_limit=1, once the run's outputs
    are on disk: every checkpoint but the best one goes. The removed dirs."""
    best = trainer.state.best_model_checkpoint
    ckpt_dir = os.path.join(run_dir, outputs.CHECKPOINT_DIR)
    if trainer.args.save_total_limit != 1 or not best or not os.path.isdir(ckpt_dir):
        return []
    removed = []
    for name in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, name)
        if checkpoint_step(name) is not None and not os.path.samefile(path, best):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def find_resume_checkpoint(resume: str, run_dir: str) -> str | None:
    """`auto`: the newest complete checkpoint in the run dir; `never`: None; else that path."""
    if resume == "never":
        return None
    if resume != "auto":
        return resume
    ckpt_dir = os.path.join(run_dir, outputs.CHECKPOINT_DIR)
    if not os.path.isdir(ckpt_dir):
        return None
    candidates = []
    for name in os.listdir(ckpt_dir):
        path, step = os.path.join(ckpt_dir, name), checkpoint_step(name)
        if step is None:
            continue
        if is_complete_checkpoint(path):
            candidates.append((step, path))
        else:
            log.warning("ignoring incomplete checkpoint %s", path)
    return max(candidates)[1] if candidates else None


def best_epoch(trainer: Trainer) -> float | None:
    """The epoch of the checkpoint the Trainer ended with (load_best_model_at_end), else None."""
    best = trainer.state.best_model_checkpoint
    if not (trainer.args.load_best_model_at_end and best):
        return None
    step = checkpoint_step(best)
    epochs = [e["epoch"] for e in trainer.state.log_history
              if e.get("step") == step and "epoch" in e]
    return epochs[-1] if epochs else None


def evaluate_split(trainer: Trainer, dataset, prefix: str) -> tuple[dict[str, float], np.ndarray]:
    """Metrics and class probabilities, one row per dataset row, in dataset order.

    The rows go through the model sorted by length, in batches cut by padded tokens (a batch pads
    to its longest row: in dataset order a batch of short rows pads to its one long row), and
    come back in dataset order."""
    order = length_order([len(ids) for ids in dataset["input_ids"]])
    result = trainer.predict(dataset.select(order), metric_key_prefix=prefix)
    logits = result.predictions[0] if isinstance(result.predictions, tuple) else result.predictions
    probabilities = np.empty((len(order), logits.shape[-1]), dtype=np.float64)
    probabilities[order] = softmax(logits)
    return result.metrics, probabilities


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted.astype(np.float64))
    return exp / exp.sum(axis=-1, keepdims=True)


def save_model(trainer: Trainer, run_dir: str, tokenizer, lora_enabled: bool) -> str:
    """Save the adapter (LoRA) or the full model, and the tokenizer. Every rank must call this:
    under ZeRO-3 the weights are gathered from all ranks; only rank 0 writes."""
    target = os.path.join(run_dir, outputs.ADAPTER_DIR if lora_enabled else outputs.FULL_MODEL_DIR)
    with outputs.writing(target):
        trainer.save_model(target)
    if trainer.is_world_process_zero():
        tokenizer_dir = os.path.join(run_dir, outputs.TOKENIZER_DIR)
        with outputs.writing(tokenizer_dir):
            tokenizer.save_pretrained(tokenizer_dir)
    return target
