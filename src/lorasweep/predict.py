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
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from lorasweep.cli.harness import exit_2_on_user_error, run_cli
from lorasweep.config import CONF_DIR, EXECUTION_WHITELIST, PredictConfig, check_max_length
from lorasweep.data.tables import WRITERS
from lorasweep.errors import ConfigError
from lorasweep.outputs import RERUN_HINT, writing
from lorasweep.runs import load as runs

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


def predict_file(cfg) -> dict[str, Any]:
    """Read `cfg.input`, predict with the run in `cfg.run_dir`, write `cfg.output`; a summary."""
    validate_request(cfg)
    # After the checks above: these import torch, transformers and scikit-learn.
    from lorasweep.data.tables import read_table, write_table
    from lorasweep.runs.inference import (
        LoadedRun,
        check_input_columns,
        label_metrics,
        predict_table,
    )

    table = read_table(cfg.input, "input")
    # Check the columns and max_length before the (slow) model load.
    run_cfg = runs.load_run_config(cfg.run_dir)
    settings = runs.run_serialization(cfg.run_dir, run_cfg)
    check_input_columns(table.column_names, settings, f"input={cfg.input}")
    if cfg.max_length is not None:
        check_max_length(cfg.max_length, run_cfg.model, "max_length")
    run = LoadedRun.load(cfg.run_dir, cfg.device, cfg.max_length, cfg.blend)
    frame = predict_table(run, table, cfg.batch_size, cfg.top_k, cfg.progress)
    with writing(cfg.output, RERUN_HINT):
        write_table(frame, cfg.output)
    return {"rows": len(frame), "output": os.path.abspath(cfg.output),
            "blend_weight": run.blend.weight if run.blend is not None else None,
            "precision": run.precision.name,
            "metrics": label_metrics(frame, run.label_column, run.labels),
            "label_column": run.label_column}


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
