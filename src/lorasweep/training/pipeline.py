"""One training run, start to finish: `run(cfg) -> metrics`. Works without Hydra (tests call it).

check config -> tracker -> DeepSpeed dict -> set_up (TrainingArguments, data, model, head warm
start, LoRA, Trainer) -> fit (train, best epoch, evaluate, save, baseline, blend) -> finish (files,
MLflow: params, metrics, artifacts, the run as an MLflow model)
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from transformers import DataCollatorWithPadding, Trainer, set_seed

from lorasweep import __version__, distributed, outputs
from lorasweep.config import HEAD_NAMES, METRIC_NAMES, check_run_config
from lorasweep.console import silence_library_noise
from lorasweep.data.cache import PreparedData
from lorasweep.data.prepare import format_diagnostics, prepare_data
from lorasweep.data.tables import SPLITS
from lorasweep.errors import ConfigError
from lorasweep.evaluation import reports
from lorasweep.evaluation.baseline import tfidf_baseline
from lorasweep.evaluation.blend import blend_fits, blend_metrics, save_blend
from lorasweep.evaluation.metrics import hierarchy_metrics
from lorasweep.interrupts import failure_reason, run_status
from lorasweep.model.losses import build_loss
from lorasweep.model.modeling import (
    apply_lora,
    base_model_path,
    build_model,
    count_parameters,
    load_tokenizer,
)
from lorasweep.model.pooling import model_pooling
from lorasweep.model.precision import Precision, resolve
from lorasweep.model.warmstart import warm_start_head
from lorasweep.redaction import mask_overrides
from lorasweep.tracking.study import is_pruned
from lorasweep.tracking.tracker import (
    Tracker,
    flatten_params,
    git_commit,
    resolve_uri,
    start_tracker,
)
from lorasweep.training.callbacks import TrackingCallback
from lorasweep.training.deepspeed_config import (
    build_deepspeed_config,
    count_model_parameters,
    estimate_model_state_memory,
    zero_stage,
)
from lorasweep.training.disk_space import warn_if_short
from lorasweep.training.pruning import pruning_callback, stop_if_pruned
from lorasweep.training.trainer import (
    best_epoch,
    build_trainer,
    build_training_arguments,
    checkpoint_step,
    evaluate_split,
    find_resume_checkpoint,
    prune_checkpoints,
    save_model,
)

log = logging.getLogger(__name__)


def run(cfg: DictConfig, overrides: tuple = (), check: bool = True) -> dict[str, Any]:
    """Train, evaluate and save one model; return its metrics (also written to metrics.json).
    `check=False`: the caller has passed `cfg` through `config.check_run_config` already (the
    CLI does, before it imports the training stack)."""
    if check:
        check_run_config(cfg)
    distributed.configure_logging(cfg.log_all_ranks, cfg.log_level)
    silence_library_noise()
    tracker = start_tracker(cfg.tracking)
    status = "FAILED"
    try:
        tracker.log_params(flatten_params(cfg))
        os.makedirs(cfg.output_dir, exist_ok=True)
        set_seed(cfg.seed)
        ds_config = build_deepspeed_config(cfg.deepspeed)
        tracker.set_tags({"git_commit": git_commit(), "lorasweep_version": __version__,
                          "hydra_overrides": " ".join(
                              mask_overrides(overrides, cfg.tracking.secret_keys)) or "(none)",
                          "world_size": distributed.world_size(),
                          "zero_stage": zero_stage(ds_config),
                          "run_dir": os.path.abspath(cfg.output_dir)})
        metrics = train_and_save(cfg, tracker, ds_config)
        status = "FINISHED"
    except BaseException as exc:  # KILLED for Ctrl-C / SIGTERM and pruning, FAILED otherwise
        status = run_status(exc)
        if is_pruned(exc):  # stopped early on purpose
            status = "KILLED"
            tracker.set_tags({"lorasweep.pruned": "true", "pruned_reason": str(exc)})
        else:
            tracker.set_tags({"failure_reason": failure_reason(exc)})
        raise
    finally:
        tracker.end(status)
    if distributed.is_rank_zero():
        print(run_summary(metrics, cfg, tracker), flush=True)
    return metrics


def run_summary(metrics: dict[str, Any], cfg: DictConfig, tracker: Tracker) -> str:
    """The closing table: the model beside the probe and TF-IDF baselines and the blend, the
    objective, the verdict against the baseline, where the outputs went."""
    systems = [("model", "")] + [(label, infix) for label, infix in COMPARED
                                 if f"eval_{infix}f1_macro" in metrics]
    header = "".join(f"{f'{label} val':>12}{f'{label} test':>12}" for label, _ in systems)
    lines = ["", f"lorasweep: run finished in {metrics['wall_time_s']:.0f} s",
             f"  {'metric':<18}{header}"]
    for name in (*METRIC_NAMES, "loss"):
        cells = "".join(f"{metrics.get(f'eval_{infix}{name}', float('nan')):>12.4f}"
                        f"{metrics.get(f'test_{infix}{name}', float('nan')):>12.4f}"
                        for _, infix in systems)
        lines.append(f"  {name:<18}{cells}")
    best = metrics.get("best_epoch")
    lines.append(f"  objective {cfg.objective.metric} = {metrics.get(cfg.objective.metric)}"
                 + (f" (best epoch {best:g})" if best is not None else ""))
    verdict = baseline_verdict(metrics, cfg.objective.metric)
    if verdict:
        lines.append(f"  {verdict}")
    if "blend_weight" in metrics:
        weight = metrics["blend_weight"]
        alone = " (the model adds nothing: TF-IDF alone)" if weight == 0 else ""
        lines.append(f"  blend: model weight {weight:.1f}, TF-IDF {1 - weight:.1f}{alone}, chosen "
                     "on validation; lorasweep-predict applies it, blend=false there: the model "
                     "alone")
    lines.append(f"  outputs: {os.path.abspath(cfg.output_dir)}")
    if tracker.problem:
        lines.append(f"  WARNING: nothing was logged to MLflow: {tracker.problem}")
    if tracker.run_id:
        uri = resolve_uri(cfg.tracking)
        lines.append(f"  MLflow run {tracker.run_id} in {uri}")
        if uri.startswith("sqlite:"):
            lines.append(f"  view it: mlflow ui --backend-store-uri {uri}")
        if cfg.tracking.log_model:
            lines.append(f"  serve it: MLFLOW_TRACKING_URI={uri} mlflow models serve -m "
                         f"runs:/{tracker.run_id}/model --env-manager local --port 5000")
    return "\n".join(lines)


# The systems every run is compared with, as (column label, metric-name infix).
COMPARED = (("blend", "blend_"), ("probe", "probe_"), ("tfidf", "baseline_"))


def baseline_verdict(metrics: dict[str, Any], objective: str) -> str | None:
    """One line when the model's objective is below the TF-IDF baseline's on the same split."""
    prefix, _, name = objective.partition("_")
    ours, theirs = metrics.get(objective), metrics.get(f"{prefix}_baseline_{name}")
    if ours is None or theirs is None or any(f"_{infix}" in objective for _, infix in COMPARED):
        return None
    lower_is_better = name == "loss"
    if (ours < theirs) != lower_is_better and ours != theirs:
        return (f"WARNING: the model's {objective} {ours:.4f} is below the TF-IDF + logistic "
                f"regression baseline's {theirs:.4f} (by {abs(theirs - ours):.4f})")
    return None


@dataclass
class Recipe:
    """What `set_up` builds for one run and `fit` / `finish` use."""

    trainer: Trainer
    tokenizer: Any
    data: PreparedData
    base_path: str
    precision: Precision  # what training.mixed_precision resolved to here
    resume_from: str | None
    comparison: dict[str, float]  # the probe's scores (warm start); the baseline's join later
    rank_zero: bool
    tfidf: Any = None  # the fitted TF-IDF baseline, when the run blends with it (rank 0)
    pruning: Any = None  # a sweep trial's PruningCallback, when its study can prune it


def train_and_save(cfg: DictConfig, tracker: Tracker,
                   ds_config: dict | None) -> dict[str, Any]:
    """set up -> fit -> finish. `ds_config`: the DeepSpeed dict built from cfg.deepspeed (None:
    no DeepSpeed). Every rank runs all three; only rank 0 writes."""
    started = time.perf_counter()
    recipe = set_up(cfg, tracker, ds_config)
    metrics, probabilities = fit(cfg, recipe)
    metrics["wall_time_s"] = time.perf_counter() - started
    if recipe.rank_zero:
        finish(cfg, recipe, tracker, ds_config, metrics, probabilities)
    distributed.barrier()
    return metrics


def set_up(cfg: DictConfig, tracker: Tracker, ds_config: dict | None) -> Recipe:
    """The order is ZeRO-3's: a random test model is materialised as a local dir first (after
    TrainingArguments exist, creating a model is a collective under ZeRO-3); TrainingArguments
    are built before `from_pretrained`, so ZeRO-3 partitions the weights as they load; the head
    is warm-started before LoRA wraps the model (PEFT copies the head it finds) and before the
    Trainer builds the optimizer (DeepSpeed keeps its own copy of the weights from then on)."""
    rank_zero = distributed.is_rank_zero()
    base_path = base_model_path(cfg.model, cfg.data.cache_dir, cfg.seed)
    if ds_config is not None and rank_zero:  # "will it fit", before loading
        total, largest = count_model_parameters(base_path, cfg.model.trust_remote_code)
        log.info("%s", estimate_model_state_memory(ds_config, total, largest,
                                                   distributed.world_size()))
    precision = resolve(cfg.training.mixed_precision, deepspeed=ds_config is not None)
    if rank_zero:
        log.info("precision: %s (%s)", precision.name, precision.reason)
    args = build_training_arguments(cfg.training, cfg.output_dir, cfg.seed, ds_config,
                                    cfg.objective.metric, cfg.tracking.secret_keys, precision)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer)
    if rank_zero:
        log.info("%s", format_diagnostics(data.metadata))
    model = build_model(cfg.model, data.label_map, tokenizer, base_path)
    loss_fn = build_loss(cfg.loss, data.tokenized["train"]["labels"], len(data.label_map.labels))
    resume_from = find_resume_checkpoint(cfg.resume, cfg.output_dir)
    comparison = warm_start(cfg, model, data, tokenizer, loss_fn, resume_from, precision)
    model = apply_lora(model, cfg.lora)
    if rank_zero:
        warn_if_short(cfg, model, tokenizer, data, ds_config)
    pruning = pruning_callback(cfg.objective.metric, cfg.output_dir)
    trainer = build_trainer(model, args, data.tokenized, tokenizer, loss_fn,
                            [TrackingCallback(tracker), *([pruning] if pruning else [])],
                            cfg.training.early_stopping_patience,
                            cfg.training.head_learning_rate,
                            cfg.lora.modules_to_save if cfg.lora.enable else HEAD_NAMES)
    return Recipe(trainer, tokenizer, data, base_path, precision, resume_from, comparison,
                  rank_zero, pruning=pruning)


def fit(cfg: DictConfig, recipe: Recipe) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train (resuming if asked), end with the best epoch's weights, evaluate, save the model;
    the metrics (with the probe's and the baseline's) and each split's class probabilities."""
    trainer, data = recipe.trainer, recipe.data
    if recipe.resume_from:
        log.info("resuming from %s", recipe.resume_from)
    with outputs.writing(os.path.join(cfg.output_dir, outputs.CHECKPOINT_DIR)):
        train_result = trainer.train(resume_from_checkpoint=recipe.resume_from)
    stop_if_pruned(recipe.pruning, cfg.output_dir)
    eval_metrics, eval_probs = evaluate_split(trainer, data.tokenized["validation"], "eval")
    test_metrics, test_probs = evaluate_split(trainer, data.tokenized["test"], "test")
    if recipe.rank_zero:  # from here until run_complete.json, the dir is not a finished run
        outputs.mark_unfinished(cfg.output_dir)
    save_model(trainer, cfg.output_dir, recipe.tokenizer, cfg.lora.enable)
    if recipe.rank_zero and cfg.baseline == "tfidf":
        fitted = baseline_metrics(data)
        if fitted is not None:
            baseline, tfidf_model, tfidf_probs = fitted
            recipe.comparison.update(baseline)
            if cfg.blend and blend_fits(tfidf_model):
                labels = {prefix: data.tokenized[split]["labels"]
                          for prefix, split in (("eval", "validation"), ("test", "test"))}
                recipe.comparison.update(blend_metrics({"eval": eval_probs, "test": test_probs},
                                                       tfidf_probs, labels, cfg.objective.metric))
                recipe.tfidf = tfidf_model
    metrics = {**train_result.metrics, **eval_metrics, **test_metrics, **recipe.comparison,
               "best_epoch": best_epoch(trainer),
               "resumed_from_step": checkpoint_step(recipe.resume_from) if recipe.resume_from
               else 0}
    test_pred = test_probs.argmax(axis=-1)
    hierarchy = hierarchy_metrics(test_pred, np.asarray(data.tokenized["test"]["labels"]),
                                  data.label_map.labels, cfg.metrics.hierarchy_prefixes)
    metrics.update({f"test_{k}": v for k, v in hierarchy.items()})
    return metrics, {"validation": eval_probs, "test": test_probs}


def finish(cfg: DictConfig, recipe: Recipe, tracker: Tracker, ds_config: dict | None,
           metrics: dict[str, Any], probabilities: dict[str, np.ndarray]) -> None:
    """Rank 0: the run's files, reports and MLflow record. Only now that the new model is saved:
    a rerun into a finished run's dir that fails earlier leaves that run's files as they were.
    Each file's write names it when it fails (a full disk); run_complete.json comes last."""
    run_dir, data, labels = cfg.output_dir, recipe.data, recipe.data.label_map.labels
    test_labels = np.asarray(data.tokenized["test"]["labels"])
    report_files: list[str] = []
    writes = [
        (outputs.RUN_CONFIG, lambda: outputs.save_run_config(run_dir, cfg)),
        (outputs.LABEL_MAP,
         lambda: outputs.write_json(run_dir, outputs.LABEL_MAP, data.label_map.to_json())),
        (outputs.DATASET_METADATA,
         lambda: outputs.write_json(run_dir, outputs.DATASET_METADATA, data.metadata)),
        (outputs.BLEND_DIR,
         lambda: save_blend(run_dir, recipe.tfidf, metrics.get("blend_weight"))),
        (outputs.METRICS, lambda: outputs.write_json(run_dir, outputs.METRICS, metrics)),
        (outputs.MODEL_METADATA, lambda: outputs.write_json(
            run_dir, outputs.MODEL_METADATA, model_metadata(cfg, recipe.trainer, ds_config,
                                                            recipe.base_path, recipe.precision))),
        (reports.REPORT_DIR, lambda: report_files.extend(reports.write_reports(
            run_dir, probabilities["test"].argmax(axis=-1), test_labels, labels))),
    ]
    for name, write in writes:
        with outputs.writing(os.path.join(run_dir, name)):
            write()
    for split, probs in probabilities.items():
        path = os.path.join(run_dir, reports.REPORT_DIR, f"predictions_{split}.csv")
        with outputs.writing(path):
            report_files.append(reports.write_predictions(
                run_dir, split, data.raw[split], data.texts(split), probs, labels,
                cfg.data.label_column))
    outputs.mark_finished(run_dir)
    prune_checkpoints(recipe.trainer, run_dir)  # only now: until here a rerun resumes from them
    tracker.log_metrics(metrics)
    log_artifacts(tracker, run_dir, report_files)
    if cfg.tracking.log_model:
        with models_load_whole(recipe.trainer):
            tracker.log_model(run_dir, input_example(data), len(labels),
                              cfg.tracking.registered_model_name)


def warm_start(cfg: DictConfig, model, data: PreparedData, tokenizer, loss_fn,
               resume_from: str | None, precision: Precision | None = None) -> dict[str, float]:
    """`model.head_init=probe`: start the head from a linear probe of the frozen model; return
    the probe's scores. A resumed run takes its head from the checkpoint instead."""
    if cfg.model.head_init != "probe":
        return {}
    if resume_from:
        log.info("head warm start: skipped, the head comes from %s", resume_from)
        return {}
    return warm_start_head(model, data.tokenized, DataCollatorWithPadding(tokenizer),
                           len(data.label_map.labels), tokenizer.pad_token_id,
                           loss_fn.weights.numpy() if loss_fn.weights is not None else None,
                           cfg.training.per_device_eval_batch_size, precision,
                           progress=not cfg.training.disable_tqdm)


def baseline_metrics(data: PreparedData):
    """TF-IDF + logistic regression on the same split's serialized text (rank 0 only): its
    metrics, the fitted model and its eval/test probabilities; None when skipped."""
    if data.serialization.get("pretokenized"):
        log.info("baseline: skipped, a tokenized DatasetDict has no train text to fit it on")
        return None
    label_ids = {split: data.tokenized[split]["labels"] for split in SPLITS}
    return tfidf_baseline((data.texts("train"), label_ids["train"]),
                          {"eval": (data.texts("validation"), label_ids["validation"]),
                           "test": (data.texts("test"), label_ids["test"])},
                          len(data.label_map.labels))


def model_metadata(cfg: DictConfig, trainer, ds_config, base_path: str,
                   precision: Precision) -> dict[str, Any]:
    """What actually trained: the engine class and ZeRO stage DeepSpeed reports, world size, the
    precision it computed in (and why)."""
    wrapped = trainer.model_wrapped
    engine_stage = (wrapped.zero_optimization_stage()
                    if hasattr(wrapped, "zero_optimization_stage") else None)
    return {
        "base_model": base_path,
        "model_class": type(trainer.accelerator.unwrap_model(trainer.model)).__name__,
        "wrapped_model_class": type(wrapped).__name__,
        "zero_stage_configured": zero_stage(ds_config),
        "zero_stage_engine": engine_stage,
        "world_size": trainer.args.world_size,
        "torch_threads": torch.get_num_threads(),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "lora": cfg.lora.enable,
        "parameters": count_parameters(trainer.model),
        "dtype": cfg.model.dtype,
        "mixed_precision": cfg.training.mixed_precision,
        "pooling": model_pooling(trainer.model),
        "precision": precision.name,
        "precision_reason": precision.reason,
        "trainer_mixed_precision": trainer.args.mixed_precision,
        "global_step": trainer.state.global_step,
        "lorasweep_version": __version__,
        "run_format": outputs.RUN_FORMAT,
    }


def log_artifacts(tracker: Tracker, run_dir: str, report_files) -> None:
    for name in (outputs.RUN_CONFIG, outputs.LABEL_MAP, outputs.METRICS, outputs.MODEL_METADATA,
                 outputs.DATASET_METADATA, outputs.COMPLETE):
        tracker.log_artifact(os.path.join(run_dir, name))
    tracker.log_artifact(os.path.join(run_dir, ".hydra"), artifact_path="hydra")
    for path in report_files:
        tracker.log_artifact(path, artifact_path="reports")


@contextmanager
def models_load_whole(trainer) -> Iterator[None]:
    """While ZeRO-3 is configured, transformers partitions every model loaded in the process
    across the ranks, a collective. MLflow loads the logged model on rank 0 alone (to check its
    input example) while the other ranks wait at the barrier after `finish`: a 2-rank ZeRO-3 run
    hung there. ZeRO-3 loading is off for that load, and on again after."""
    from transformers.integrations.deepspeed import (
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    config = getattr(trainer.args, "hf_deepspeed_config", None)
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            set_hf_deepspeed_config(config)


def input_example(data: PreparedData, rows: int = 3):
    """A few validation rows of the columns the run serializes: the MLflow model's input example
    (and the source of its input signature)."""
    split = data.raw["validation"]
    columns = data.serialization["text_columns"]
    return split.select(range(min(rows, len(split)))).select_columns(columns).to_pandas()


def objective_value(metrics: dict[str, Any], metric: str) -> float:
    """The float an Optuna sweep maximises; NaN/inf fails the trial instead of ranking it."""
    if metric not in metrics:
        available = ", ".join(sorted(k for k in metrics if k.startswith(("eval_", "test_"))))
        raise ConfigError(f"objective.metric={metric!r}: not among the run's metrics "
                          f"({available})")
    value = float(metrics[metric])
    if not math.isfinite(value):
        raise RuntimeError(f"objective {metric} is {value}: the run diverged")
    return value
