"""Predict labels for a table with a trained run: the run's model, tokenizer, labels and serializer.

    lorasweep-predict run_dir=multirun/runs/X input=rows.csv output=preds.parquet
    lorasweep-predict run_dir=... input=rows.parquet output=preds.jsonl top_k=5
    (or python -m lorasweep.predict ..., or python src/lorasweep/predict.py ... in a clone)

Each output row is its input row plus pred_label, pred_score and top1_label, top1_score, ...
Input rows are serialized with the same function and settings as the run's training rows.
A run that saved a blend (blend/: the model with its TF-IDF baseline) predicts with the blend;
blend=false gives the fine-tuned model alone.
"""

import os
from dataclasses import dataclass
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from lorasweep.cli.harness import exit_2_on_user_error, run_cli
from lorasweep.config import CONF_DIR, EXECUTION_WHITELIST, check_max_length
from lorasweep.data.tables import WRITERS
from lorasweep.errors import ConfigError
from lorasweep.runs import load as runs


@dataclass
class PredictConfig:
    run_dir: str = MISSING
    input: str = MISSING
    output: str = MISSING
    top_k: int = 3  # top1_label/top1_score ... topK_label/topK_score columns
    batch_size: int = 64  # rows per forward pass (batched by token length, output in input order)
    max_length: int | None = None  # None: the run's data.max_length
    device: str = "auto"  # auto: cuda when available; or cpu, cuda
    progress: bool = True
    blend: bool = True  # the run's blend with its TF-IDF baseline, when it saved one


ConfigStore.instance().store(name="base_predict", node=PredictConfig)


def validate_request(cfg) -> None:
    """Fail on bad settings before the (slow) model load, and before any output is written."""
    ext = os.path.splitext(cfg.output)[1].lower()
    if ext not in WRITERS:
        raise ConfigError(f"output={cfg.output}: unsupported extension '{ext}' "
                          f"(expected one of {', '.join(WRITERS)})")
    for key in ("top_k", "batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]}: expected a positive integer")
    runs.check_run_dir(cfg.run_dir)


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA device available")
    return torch.device(name)


def predict_file(cfg) -> dict[str, Any]:
    """Read `cfg.input`, predict with the run in `cfg.run_dir`, write `cfg.output`; a summary."""
    validate_request(cfg)
    # After the checks above: these import torch, transformers and scikit-learn.
    from lorasweep.data.tables import read_table, write_table
    from lorasweep.evaluation.blend import SavedBlend
    from lorasweep.model.precision import resolve
    from lorasweep.runs.inference import check_input_columns, label_metrics, predict_table

    table = read_table(cfg.input, "input")
    # Check the columns and max_length before the (slow) model load.
    run_cfg = runs.load_run_config(cfg.run_dir)
    settings = runs.run_serialization(cfg.run_dir, run_cfg)
    check_input_columns(table.column_names, settings, cfg.input)
    if cfg.max_length is not None:
        check_max_length(cfg.max_length, run_cfg.model, "max_length")
    model, tokenizer, label_map, run_cfg = runs.load_for_inference(cfg.run_dir)
    device = pick_device(cfg.device)
    model.to(device)
    # The run's training.mixed_precision rule on this device: bf16 where the run computed in bf16
    # and this hardware has it too.
    precision = resolve(run_cfg.training.mixed_precision, device.type)
    max_length = cfg.max_length or run_cfg.data.max_length
    blend = SavedBlend(cfg.run_dir) if cfg.blend and SavedBlend.exists(cfg.run_dir) else None
    frame = predict_table(model, tokenizer, label_map.labels, settings, table, max_length,
                          cfg.batch_size, cfg.top_k, cfg.progress, blend, precision)
    write_table(frame, cfg.output)
    return {"rows": len(frame), "output": os.path.abspath(cfg.output),
            "blend_weight": blend.weight if blend is not None else None,
            "precision": precision.name,
            "metrics": label_metrics(frame, run_cfg.data.label_column, label_map.labels),
            "label_column": run_cfg.data.label_column}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"lorasweep: wrote {summary['rows']} predictions to {summary['output']}"]
    if summary.get("blend_weight") is not None:
        lines.append(f"  the model blended with the run's TF-IDF baseline (model weight "
                     f"{summary['blend_weight']:.1f}); blend=false: the model alone")
    metrics = summary["metrics"]
    if metrics:
        unknown = (f", {metrics['unknown_labels']} with labels the run never saw"
                   if metrics["unknown_labels"] else "")
        lines.append(f"  against column {summary['label_column']!r} ({metrics['rows']} rows"
                     f"{unknown}): accuracy {metrics['accuracy']:.4f}, "
                     f"macro-F1 {metrics['f1_macro']:.4f}")
    return "\n".join(lines)


@hydra.main(config_path=CONF_DIR, config_name="predict", execution_whitelist=EXECUTION_WHITELIST)
def main(cfg: DictConfig) -> dict[str, Any]:
    summary = exit_2_on_user_error(predict_file, cfg)
    print(format_summary(summary), flush=True)
    return summary


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
